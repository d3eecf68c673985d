"""The `gguf-router` command: llama-server's router flags; every other flag goes to each child."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import typing
from pathlib import Path

from . import __version__
from .errors import RouterError, shown
from .ini import ConfigError
from .llama_options import LlamaServerError, ask_early
from .settings import Settings, flags, load_settings, setting_type

USAGE = """\
gguf-router [ROUTER OPTIONS] [LLAMA-SERVER OPTIONS...]
       gguf-router check-config [ROUTER OPTIONS] [LLAMA-SERVER OPTIONS...]
       gguf-router ps | load MODEL | unload MODEL | logs MODEL [-f]
       gguf-router key add NAME [--role R] [--models GLOBS] [--concurrency N] ... | key list | key remove NAME
       gguf-router usage [--since 24h] [--by key|model|both]
       gguf-router demo-models DIR
       gguf-router haproxy-config | haproxy-sync [--config /etc/gguf-router/balancer.conf]

Routes OpenAI API requests, by their "model" field, to one llama-server per model.
Options not listed here (-c 8192, --threads 4, -ngl 99, ...) are passed to every llama-server.
Each option can also be set in the environment as GGUF_ROUTER_<NAME> (e.g. GGUF_ROUTER_MODELS_MAX=2)
or in the [router] section of /etc/gguf-router/gguf-router.conf (models-max = 2); the command line
wins over the environment, which wins over the file. check-config checks the config and presets
files and prints the command line each model would be started with.
"""


def parser() -> argparse.ArgumentParser:
    """The router's flags, as the Settings fields declare them; every other option is a child's."""
    p = argparse.ArgumentParser(prog="gguf-router", usage=USAGE, allow_abbrev=False,
                                argument_default=argparse.SUPPRESS)
    p.add_argument("--version", action="version", version=f"gguf-router {__version__}")
    for item, names in flags():
        kind = setting_type(item.name)
        meta = item.metadata
        if kind is bool:  # a switch: its flag says the opposite of the default; the other spelling is accepted
            p.add_argument(*names, dest=item.name, action="store_false" if item.default else "store_true",
                           help=meta["help"])
            opposites = [f"--{n[5:]}" for n in names if n.startswith("--no-")] if item.default \
                else [f"--no-{item.name.replace('_', '-')}"]
            p.add_argument(*opposites, dest=item.name, action="store_true" if item.default else "store_false",
                           help=argparse.SUPPRESS)
        elif typing.get_origin(kind) is tuple:
            p.add_argument(*names, dest=item.name, action="append", metavar=meta["metavar"], help=meta["help"])
        elif typing.get_origin(kind) is typing.Literal:
            p.add_argument(*names, dest=item.name, choices=typing.get_args(kind), metavar=meta["metavar"],
                           help=meta["help"])
        else:
            p.add_argument(*names, dest=item.name, type=kind if kind in (int, float, Path) else None,
                           metavar=meta["metavar"], help=meta["help"])
    return p


def parse_command_line(argv: list[str]) -> dict:
    """The settings given on the command line, by field name; the rest goes to children."""
    args, child_args = parser().parse_known_args(argv)
    given = vars(args)
    for name, value in given.items():
        if isinstance(value, list):  # a repeatable flag: joined as the environment would give it
            given[name] = ",".join(value)
    if child_args:
        given["child_args"] = tuple(child_args)
    return given


def parse_settings(argv: list[str]) -> Settings:
    return load_settings(parse_command_line(argv))


class OneLineFormatter(logging.Formatter):
    """One line per event: a newline in a file name (or anything else logged) is shown escaped,
    never read as a line of its own in the journal."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = shown(record.message, None)
        return super().formatMessage(record)


def setup_logging(settings: Settings) -> None:
    stamp = "%(asctime)s " if settings.log_timestamps else ""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter(f"{stamp}%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
    # Sanic's per-request and startup chatter would bury the events that matter.
    logging.getLogger("sanic").setLevel(max(logging.WARNING, root.level))


def fail(message: str) -> None:
    print(f"gguf-router: {message}", file=sys.stderr)
    sys.exit(2)


def check_config(argv: list[str]) -> None:
    """Prints what the router would serve and how, or the first config error (exit 1)."""
    from . import tls
    from .catalog import build, read_presets
    from .discovery import Discovery
    from .memory import memory_line

    try:
        settings = parse_settings(argv)
        presets, child_options = read_presets(settings)
        runtime_dir = settings.runtime_dir or Path("$RUNTIME_DIR")
        catalog = build(settings, Discovery(settings.models_dir, settings.hf_cache), presets, child_options, runtime_dir)
        tls.check(settings)
        keys = settings.keyring()
    except (ConfigError, LlamaServerError) as exc:
        print(f"gguf-router: config error: {exc}", file=sys.stderr)
        sys.exit(1)
    print(f"config file:  {settings.config or 'none (defaults)'}")
    print(f"presets:      {', '.join(map(str, presets.files)) or 'none'}")
    print(f"llama-server: {settings.llama_server}")
    print(f"TLS:          {settings.tls_cert_file or 'off'}")
    from .keys import ROLE_NAMES
    roles = ", ".join(f"{k.name} ({ROLE_NAMES[k.role]})" for k in keys.keys)
    print(f"keys:         {roles}" if keys else "keys:         none: anyone who reaches the port may use it")
    print(f"models dir:   {settings.models_dir or 'none'}")
    for warning in catalog.warnings:
        print(f"warning: {warning}")
    for model_id, config in sorted(catalog.models.items()):
        notes = [config.file.source]
        if config.aliases:
            notes.append("aliases " + ", ".join(config.aliases))
        if config.load_on_startup:
            notes.append("load-on-startup")
        if config.file.error:
            notes.append(f"NOT USABLE: {config.file.error}")
        print(f"\n{model_id} ({'; '.join(notes)})\n  {shlex.join(config.argv)}")
        if config.memory:
            print(f"  {memory_line(config.memory)}")


def balancer(command: str, argv: list[str]) -> None:
    """Several hosts behind HAProxy: print its config, or keep its model map current."""
    from .balancer import settings as balancer_settings

    p = argparse.ArgumentParser(prog=f"gguf-router {command}", allow_abbrev=False)
    p.add_argument("--config", type=Path, default=balancer_settings.DEFAULT_PATH,
                   help="[balancer] options and [hosts] (default %(default)s)")
    p.add_argument("--log-level", default="info", type=str.lower, choices=("debug", "info", "warning", "error"))
    args = p.parse_args(argv)
    try:
        settings = balancer_settings.load(args.config)
        if command == "haproxy-sync":
            settings.api_keys()  # readable now, rather than at the first host it follows
    except ConfigError as exc:
        fail(str(exc))
    if command == "haproxy-config":
        from .balancer.haproxy import render

        sys.stdout.write(render(settings))
        return
    from .balancer.sync import main as sync

    setup_logging(Settings(log_level=args.log_level))
    sync(settings)


def remote_presets(settings: Settings) -> None:
    """--hf-repo: its preset.ini fetched (as llama.cpp does, unless offline), else the cached one used."""
    log = logging.getLogger("gguf_router")
    log.warning("presets from the Hugging Face repository %s: use only presets you trust (they choose the "
                "options every model runs with)", settings.hf_repo)
    if settings.offline:
        return
    from .downloads import Failed, fetch_presets

    try:
        path = fetch_presets(settings.hf_cache, settings.hf_repo)
        log.info("presets of %s: %s", settings.hf_repo, path)
    except (RouterError, Failed, OSError) as exc:
        cached = settings.preset_files()[0]
        if not cached.is_file():
            fail(f"--hf-repo {settings.hf_repo}: {getattr(exc, 'message', exc)}")
        log.warning("presets of %s not fetched (%s): the cached ones are used", settings.hf_repo,
                    getattr(exc, "message", exc))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in ("ps", "load", "unload", "logs", "usage", "pull"):
        from .control import main as control

        try:
            return control(argv[0], argv[1:], load_settings)
        except ConfigError as exc:
            fail(str(exc))
    if argv[:1] == ["key"]:
        from .keyadmin import key

        try:
            return key(argv[1:], load_settings)
        except ConfigError as exc:
            fail(str(exc))
    if argv[:1] == ["check-config"]:
        return check_config(argv[1:])
    if argv[:1] and argv[0] in ("haproxy-config", "haproxy-sync"):
        return balancer(argv[0], argv[1:])
    if argv[:1] == ["demo-models"]:
        from .tinymodels import write_demo_folder

        if len(argv) != 2:
            fail("usage: gguf-router demo-models DIR")
        for path in write_demo_folder(Path(argv[1])):
            print(path)
        return
    given = parse_command_line(argv)
    try:
        settings = load_settings(given)
    except ConfigError as exc:
        fail(str(exc))
    setup_logging(settings)
    if not settings.llama_server.exists():
        fail(f"no llama-server at {settings.llama_server}: install the gguf-router-llama-server package, "
             "build one with scripts/build-llama-server, or name yours: llama-server = PATH in the [router] section of /etc/gguf-router/gguf-router.conf, "
             "--llama-server PATH or GGUF_ROUTER_LLAMA_SERVER")
    if settings.models_dir is not None and not settings.models_dir.is_dir():
        fail(f"--models-dir {settings.models_dir} is not a folder")
    ask_early(settings.llama_server)
    if settings.hf_repo:
        remote_presets(settings)

    from sanic import Sanic

    import socket

    from .access import Level, beyond_loopback
    from .app import GuardedProtocol, create_app
    from .systemd import listen_sockets

    log = logging.getLogger("gguf_router")
    sockets = listen_sockets()
    try:
        app = create_app(settings, lambda: load_settings(given))
    except (ConfigError, LlamaServerError) as exc:
        fail(str(exc))
    hosts = [sock.getsockname()[0] for sock in sockets if sock.family in (socket.AF_INET, socket.AF_INET6)] \
        if sockets else [settings.host]
    if app.ctx.router.config.keys.keyless_level > Level.PUBLIC and any(map(beyond_loopback, hosts)):
        log.warning("no API key is set and the router listens beyond this machine (%s): anyone who reaches the port "
                    "may use it; set api-key-file in %s", ", ".join(hosts) or "*",
                    settings.config or "/etc/gguf-router/gguf-router.conf")
    run = dict(single_process=True, access_log=False, motd=False, protocol=GuardedProtocol,
               ssl=app.ctx.router.tls)
    scheme = "https" if app.ctx.router.tls else "http"
    if sockets:
        # Every socket the unit lists (TCP, IPv6, unix ...), one app serving them all.
        for sock in sockets:
            log.info("listening on %s (socket activation, %s)", sock.getsockname() or "an unnamed socket", scheme)
            app.prepare(sock=sock, **run)
        Sanic.serve_single(app)
    else:
        log.info("listening on %s://%s:%d", scheme, settings.host, settings.port)
        app.run(host=settings.host, port=settings.port, **run)


if __name__ == "__main__":
    main()
