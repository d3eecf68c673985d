"""Who may call what, in-process (no children start): every route the app has, in every spelling
Sanic accepts, with no key, an inference key and an admin key; what each caller is shown; the
body labels, Host names and headers a browser or a careless client sends."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import httpx
import pytest
from sanic import Sanic

from gguf_router.app import create_app
from gguf_router.settings import default_ui_path, Settings

Sanic.test_mode = True  # several apps of one name in one process

BASE = "http://127.0.0.1:8080"
USER, ADMIN = "user-key", "admin-key"
CALLERS = {"no key": {}, "inference key": {"Authorization": f"Bearer {USER}"}, "admin key": {"X-Api-Key": ADMIN}}

# What the issue asks for, written out here rather than read from the app: managing models.
ADMIN_ROUTES = {("POST", "/models/load"), ("POST", "/models/unload"), ("POST", "/models/reload"),
                ("GET", "/models/logs"), ("GET", "/usage"), ("DELETE", "/models"), ("DELETE", "/v1/models"), ("POST", "/models"),
                ("POST", "/v1/models"), ("POST", "/slots/<slot_id:int>"), ("POST", "/props"), ("POST", "/lora-adapters")}
# The pages (the status page and llama.cpp's web UI, its files as the build made them) are open.
PUBLIC_ROUTES = {("GET", "/health"), ("GET", "/v1/health"), ("GET", "/"), ("GET", "/status"), ("GET", "/ui/<name:str>")}
PUBLIC_ROUTES |= {("GET", f"/{f.name}" + ("/<path:path>" if f.is_dir() else "")) for f in default_ui_path().glob("*")}


@contextlib.asynccontextmanager
async def serving(tmp_path: Path, llama_server: Path, models_dir: Path, **settings):
    """The app as the router builds it, started as Sanic starts it, with a client that calls it in-process."""
    (tmp_path / "presets.ini").touch()
    app = create_app(Settings(models_dir=models_dir, llama_server=llama_server, launcher="process",
                              models_preset=settings.pop("models_preset", tmp_path / "presets.ini"),
                              hf_cache=tmp_path / "hf", state_dir=tmp_path / "state", **settings))
    app.asgi = True
    await app._startup()
    await app._server_event("init", "before")
    await app._server_event("init", "after")
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as http:
            yield app, http
    finally:
        await app._server_event("shutdown", "before")
        await app._server_event("shutdown", "after")


def spellings(uri: str) -> list[str]:
    """The route's path and the other ways a client may write it."""
    path = uri.replace("<slot_id:int>", "0").replace("<name:str>", "app.js")
    if path.endswith("/<path:path>"):  # a folder of the web UI: a file in it
        folder = default_ui_path() / path.split("/")[1]
        path = "/" + min(f for f in folder.rglob("*") if f.is_file()).relative_to(default_ui_path()).as_posix()
    if path == "/":
        return [BASE + "/", BASE + "//"]
    last = path[-1]
    return [BASE + p for p in (path, path + "/", "/" + path, path.replace("/", "//", 2), path + "//", path.upper(),
                               path[:-1] + f"%{ord(last):02X}", path[:-1] + f"%{ord(last):02x}")]


def request_for(method: str, path: str) -> dict:
    """A request that, past its access check, names a model that does not exist: nothing starts."""
    if method == "POST":
        return {"json": {"model": "no-such-model", "prompt": "hi"}}
    if method in ("GET", "DELETE") and path.rstrip("/").endswith(("/models/logs", "/slots", "/lora-adapters",
                                                                  "/models")):
        return {"params": {"model": "no-such-model"}}
    return {}


def expected_level(method: str, uri: str, params: dict) -> str:
    if (method, uri) in PUBLIC_ROUTES:
        return "public"
    if (method, uri) in ADMIN_ROUTES or (uri in ("/models", "/v1/models") and params.get("reload") in ("1", "true", "on")):
        return "admin"
    return "key"


def allowed(level: str, caller: str) -> bool:
    return level == "public" or (level == "key" and caller != "no key") or caller == "admin key"


def walked_routes(app) -> list[tuple[str, str]]:
    return sorted((method, route.uri) for route in app.router.routes for method in route.methods)


async def test_every_route_in_every_spelling_answers_each_caller_by_its_level(tmp_path, llama_server, models_dir):
    async with serving(tmp_path, llama_server, models_dir, api_keys=(USER,), admin_api_keys=(ADMIN,)) as (app, http):
        routes = walked_routes(app)
        assert len(routes) > 40 and ("POST", "/models/load") in routes
        reached = 0
        for method, uri in routes:
            if uri == "/models/sse":
                continue  # a stream that never ends: its own test below
            for query in ({}, {"reload": "1"}, {"reload": "true"}, {"reload": "on"}) if uri in ("/models", "/v1/models") \
                    else ({},):
                level = expected_level(method, uri, query)
                for spelling in spellings(uri):
                    extra = request_for(method, uri)
                    extra["params"] = {**extra.get("params", {}), **query}
                    for caller, headers in CALLERS.items():
                        reply = await http.request(method, spelling, headers=headers, **extra)
                        what = f"{caller}: {method} {spelling} {query} -> {reply.status_code} {reply.text[:200]}"
                        if reply.status_code in (404, 405):
                            assert spelling != spellings(uri)[0], what  # only other spellings may miss
                            continue
                        if allowed(level, caller):
                            assert reply.status_code not in (401, 403), what
                            reached += 1
                        else:
                            assert reply.status_code == (403 if caller == "inference key" else 401), what
                            assert reply.json()["error"]["type"] in ("authentication_error", "permission_error")
        assert reached > 200
        # nothing was loaded, whoever asked
        listed = (await http.get("/models", headers=CALLERS["admin key"])).json()["data"]
        assert {m["status"]["value"] for m in listed} == {"unloaded"}


async def test_the_event_stream_needs_a_key_and_starts_with_one(tmp_path, llama_server, models_dir):
    async with serving(tmp_path, llama_server, models_dir, api_keys=(USER,)) as (_, http):
        assert (await http.get("/models/sse")).status_code == 401
        assert (await http.get("/models/sse/")).status_code == 401


async def test_with_only_admin_keys_inference_is_open_and_managing_is_not(tmp_path, llama_server, models_dir):
    async with serving(tmp_path, llama_server, models_dir, admin_api_keys=(ADMIN,)) as (_, http):
        for path in ("/models/load", "/models/load/", "/models/unload/", "/models/reload/"):
            reply = await http.post(path, json={"model": "tiny-b"})
            assert reply.status_code == 401, path
        assert (await http.get("/models/", params={"reload": "1"})).status_code == 401
        assert (await http.delete("/models/", params={"model": "tiny-b"})).status_code == 401
        assert (await http.get("/v1/models")).status_code == 200
        refused = await http.post("/props", json={"model": "tiny-a", "n_ctx": 1})
        assert refused.status_code == 401
        assert (await http.post("/props", json={"model": "no-such"}, headers=CALLERS["admin key"])).status_code == 400


async def test_autoload_asked_for_under_no_autoload_is_managing_models(tmp_path, llama_server, models_dir):
    async with serving(tmp_path, llama_server, models_dir, api_keys=(USER,), admin_api_keys=(ADMIN,),
                       models_autoload=False) as (_, http):
        for value in ("true", "1", "TRUE", "yes", "on"):
            reply = await http.post("/v1/chat/completions", params={"autoload": value}, headers=CALLERS["inference key"],
                                    json={"model": "tiny-a", "messages": [{"role": "user", "content": "hi"}]})
            assert reply.status_code == 403, value
        # not asking to load is inference: the model is not loaded, which is what it is told
        reply = await http.post("/v1/chat/completions", headers=CALLERS["inference key"],
                                json={"model": "tiny-a", "messages": [{"role": "user", "content": "hi"}]})
        assert reply.status_code == 400 and reply.json()["error"]["message"] == "model is not loaded"
        reply = await http.post("/v1/chat/completions", params={"autoload": "false"}, headers=CALLERS["inference key"],
                                json={"model": "tiny-a"})
        assert reply.status_code == 400
        listed = (await http.get("/models", headers=CALLERS["admin key"])).json()["data"]
        assert {m["status"]["value"] for m in listed} == {"unloaded"}


async def test_only_admins_see_command_lines_presets_and_their_secrets(tmp_path, llama_server, models_dir):
    presets = tmp_path / "secret-presets.ini"
    presets.write_text("[tiny-a]\nhf-token = hf_commandlinesecret\nenvironment = HF_TOKEN=hf_environmentsecret\n")
    async with serving(tmp_path, llama_server, models_dir, api_keys=(USER,), admin_api_keys=(ADMIN,),
                       models_preset=presets) as (_, http):
        for path in ("/models", "/v1/models"):
            seen = (await http.get(path, headers=CALLERS["inference key"])).text
            assert "hf_commandlinesecret" not in seen and "hf_environmentsecret" not in seen
            status = {m["id"]: m["status"] for m in json.loads(seen)["data"]}["tiny-a"]
            assert status["value"] == "unloaded" and "args" not in status and "preset" not in status
            assert "memory_estimate_bytes" in status
            admin = {m["id"]: m["status"] for m in (await http.get(path, headers=CALLERS["admin key"])).json()["data"]}
            assert "hf_commandlinesecret" in admin["tiny-a"]["args"]
            assert "HF_TOKEN=hf_environmentsecret" in admin["tiny-a"]["preset"]


async def test_bodies_must_be_labelled_json_so_a_browser_must_ask_first(tmp_path, llama_server, models_dir):
    body = json.dumps({"model": "no-such", "messages": []})
    async with serving(tmp_path, llama_server, models_dir) as (_, http):
        for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
            headers = {"Content-Type": kind} if kind else {}
            reply = await http.post("/v1/chat/completions", content=body, headers=headers)
            assert reply.status_code == 415, kind
            assert "application/json" in reply.json()["error"]["message"]
        for kind in ("application/json", "application/json; charset=utf-8", "Application/JSON"):
            reply = await http.post("/v1/chat/completions", content=body, headers={"Content-Type": kind})
            assert reply.status_code == 400 and "not found" in reply.json()["error"]["message"], kind
        # an endpoint that takes files takes a form
        form = await http.post("/v1/audio/transcriptions", data={"model": "no-such"}, files={"file": b"RIFF"})
        assert form.status_code == 400 and "not found" in form.json()["error"]["message"]
        # a body-less POST needs no label
        assert (await http.post("/models/reload")).status_code == 200


async def test_a_keyless_router_answers_only_for_the_host_names_it_serves(tmp_path, llama_server, models_dir):
    async with serving(tmp_path, llama_server, models_dir, server_names=("llm.lan",)) as (_, http):
        for host in ("localhost:8080", "127.0.0.1:8080", "[::1]:8080", "192.168.1.20", "llm.lan", "LLM.LAN:8080",
                     "app.localhost"):
            assert (await http.get("/v1/models", headers={"Host": host})).status_code == 200, host
        for host in ("evil.example", "evil.example:8080", "127.0.0.1.nip.io", "localhost.evil.example"):
            reply = await http.get("/v1/models", headers={"Host": host})
            assert reply.status_code == 421 and "--server-name" in reply.json()["error"]["message"], host
            chat = await http.post("/v1/chat/completions", json={"model": "tiny-a"}, headers={"Host": host})
            assert chat.status_code == 421
        assert (await http.get("/health", headers={"Host": "evil.example"})).status_code == 200
    async with serving(tmp_path, llama_server, models_dir, api_keys=(USER,)) as (_, http):
        # with keys, a rebinding page has no key: the name does not matter
        reply = await http.get("/v1/models", headers={"Host": "evil.example", **CALLERS["inference key"]})
        assert reply.status_code == 200


async def test_one_request_two_labels_is_refused(tmp_path, llama_server, models_dir):
    async with serving(tmp_path, llama_server, models_dir) as (_, http):
        body = json.dumps({"model": "no-such"}).encode()
        reply = await http.post("/v1/chat/completions", content=body,
                                headers=[("Content-Type", "application/json"), ("Content-Type", "text/plain")])
        assert reply.status_code == 400 and "more than one content-type" in reply.json()["error"]["message"]


async def test_a_huge_or_odd_model_name_is_cut_and_escaped_in_the_error(tmp_path, llama_server, models_dir):
    async with serving(tmp_path, llama_server, models_dir) as (_, http):
        reply = await http.post("/v1/chat/completions", json={"model": "x" * (30 << 20)})
        message = reply.json()["error"]["message"]
        assert reply.status_code == 400 and len(message) < 300 and message.endswith("...' not found")
        reply = await http.post("/v1/chat/completions", json={"model": "a\nINFO forged line\x1b[31m"})
        assert reply.json()["error"]["message"] == "model 'a\\nINFO forged line\\x1b[31m' not found"


def test_a_route_that_does_not_say_who_may_call_it_stops_the_router():
    from gguf_router.access import Level, check_routes

    app = Sanic("no_level")

    async def handler(request):
        return None

    app.add_route(handler, "/said", ctx_access=Level.READ)
    check_routes(app)
    app.add_route(handler, "/forgotten", name="forgotten")
    with pytest.raises(RuntimeError, match="routes without an access level: /forgotten"):
        check_routes(app)


async def test_without_keys_a_page_of_another_site_gets_nothing_but_health(tmp_path, llama_server, models_dir):
    """A page on any site can reach http://127.0.0.1:8080 (an address: the Host check lets it
    through) with requests a browser sends without asking: an <img src=> GET, a body-less POST."""
    cross = {"Sec-Fetch-Site": "cross-site"}
    async with serving(tmp_path, llama_server, models_dir, cors_origins=("https://app.example",)) as (_, http):
        for method, path, params in (("GET", "/models", {"reload": "1"}), ("GET", "/props", {"model": "tiny-a"}),
                                     ("GET", "/slots", {"model": "tiny-a"}), ("POST", "/models/reload", {}),
                                     ("GET", "/v1/models", {})):
            for headers in (cross, {"Sec-Fetch-Site": "same-site"}, {"Origin": "https://evil.example"},
                            {"Origin": "null"}):
                reply = await http.request(method, path, params=params, headers=headers)
                assert reply.status_code == 403 and "--cors-origin" in reply.json()["error"]["message"], (path, headers)
        assert (await http.get("/health", headers=cross)).status_code == 200
        # the router's own page, a user typing the address, a named origin, a client that is no browser
        for headers in ({"Sec-Fetch-Site": "same-origin", "Origin": BASE}, {"Sec-Fetch-Site": "none"},
                        {"Sec-Fetch-Site": "cross-site", "Origin": "https://app.example"}, {}):
            assert (await http.get("/v1/models", headers=headers)).status_code == 200, headers
        listed = (await http.get("/models")).json()["data"]
        assert {m["status"]["value"] for m in listed} == {"unloaded"}


async def test_a_models_props_and_metrics_under_no_autoload_need_an_admin_to_load_it(tmp_path, llama_server, models_dir):
    async with serving(tmp_path, llama_server, models_dir, api_keys=(USER,), admin_api_keys=(ADMIN,),
                       models_autoload=False) as (_, http):
        for path in ("/props", "/metrics", "/slots", "/lora-adapters"):
            reply = await http.get(path, params={"model": "tiny-a", "autoload": "true"}, headers=CALLERS["inference key"])
            assert reply.status_code == 403, path
        assert (await http.get("/props", headers=CALLERS["inference key"])).status_code == 200
        listed = (await http.get("/models", headers=CALLERS["admin key"])).json()["data"]
        assert {m["status"]["value"] for m in listed} == {"unloaded"}


async def test_llama_cpps_localhost_keyword_allows_any_loopback_origin_on_any_port(tmp_path, llama_server, models_dir):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    async with serving(tmp_path, llama_server, models_dir, cors_origins=("localhost",)) as (_, http):
        for origin in ("http://localhost:5173", "http://127.0.0.1:3000", "http://[::1]:8000", "https://localhost"):
            answer = await http.options("/v1/chat/completions", headers={"Origin": origin, **preflight})
            assert answer.status_code == 200 and answer.text == "", origin
            assert answer.headers["access-control-allow-origin"] == origin
            assert "Authorization" in answer.headers["access-control-allow-headers"]
            listed = await http.get("/v1/models", headers={"Origin": origin, "Sec-Fetch-Site": "cross-site"})
            assert listed.status_code == 200 and listed.headers["access-control-allow-origin"] == origin
        for origin in ("http://localhost.evil.example", "http://evil.example", "null", "http://127.0.0.2:80"):
            answer = await http.options("/v1/chat/completions", headers={"Origin": origin, **preflight})
            assert "access-control-allow-origin" not in answer.headers, origin
