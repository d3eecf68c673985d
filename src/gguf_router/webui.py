"""The pages: llama.cpp's web UI at / (built from its source by scripts/build-ui, or installed by
the package), and the router's own status page at /status (memory, queue, models, logs).

Both are open without a key, as llama.cpp serves its UI; what they fetch is not. The UI's files
are served as llama-server serves its embedded copy: index.html revalidated on every load and
cross-origin isolated, the service worker and manifests revalidated, the hashed rest cached for good.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sanic import Request, Sanic
from sanic.response import file, redirect

from .access import Level
from .errors import RouterError, shown
from .settings import Settings

log = logging.getLogger(__name__)

STATUS_PAGE = Path(__file__).parent / "web"  # the status page: static files, no build step
STATUS_FILES = {path.name: path for path in STATUS_PAGE.iterdir() if path.is_file()}
ISOLATED = {"Cross-Origin-Embedder-Policy": "require-corp", "Cross-Origin-Opener-Policy": "same-origin"}
REVALIDATED = frozenset({"index.html", "sw.js", "manifest.webmanifest", "build.json", "_app/version.json"})


async def status_page(request: Request, name: str = "index.html"):
    """The status page's files, by name: nothing else under /ui/ exists."""
    path = STATUS_FILES.get(name)
    if path is None:
        raise RouterError(404, f"no page file '{shown(name)}'")
    return await file(path, headers={"Cache-Control": "no-cache"})


def ui_folder(settings: Settings) -> Path | None:
    """The built UI to serve at /, if it is to be served and is there."""
    return settings.ui_path if settings.ui and (settings.ui_path / "index.html").is_file() else None


def add_page_routes(app: Sanic, settings: Settings) -> None:
    app.add_route(status_page, "/status", name="status_page", error_format="json", ctx_access=Level.PUBLIC)
    app.add_route(status_page, "/ui/<name:str>", name="status_page_files", error_format="json",
                  ctx_access=Level.PUBLIC)
    folder = ui_folder(settings)
    if folder is None:
        if settings.ui:
            log.info("llama.cpp's web UI is not in %s (scripts/build-ui builds it): / shows the status page",
                        settings.ui_path)

        async def to_status(request: Request):
            return redirect("/status")
        app.add_route(to_status, "/", name="ui_index", error_format="json", ctx_access=Level.PUBLIC)
        return
    root = folder.resolve()

    async def ui_file(request: Request, path: str = "index.html"):
        found = (root / path).resolve()
        if not found.is_relative_to(root) or not found.is_file():
            raise RouterError(404, f"no UI file '{shown(path)}'")
        name = found.relative_to(root).as_posix()
        headers = {"Cache-Control": "no-cache" if name in REVALIDATED else "public, max-age=31536000, immutable"}
        return await file(found, headers={**headers, **(ISOLATED if name == "index.html" else {})})

    # A route for each top-level file and folder of the build: the UI's own paths, and no
    # catch-all that would answer for paths the API does not have.
    app.add_route(ui_file, "/", name="ui_index", error_format="json", ctx_access=Level.PUBLIC)
    for number, entry in enumerate(sorted(root.iterdir())):
        name = f"ui_{number}"  # (Sanic wants a name per route; the file's might clash)
        if entry.is_dir():
            async def in_folder(request: Request, path: str, _folder: str = entry.name):
                return await ui_file(request, f"{_folder}/{path}")
            app.add_route(in_folder, f"/{entry.name}/<path:path>", name=name, error_format="json",
                          ctx_access=Level.PUBLIC)
        elif entry.is_file():
            async def top(request: Request, _name: str = entry.name):
                return await ui_file(request, _name)
            app.add_route(top, f"/{entry.name}", name=name, error_format="json", ctx_access=Level.PUBLIC)
