"""Benchmarks gguf-router against a direct llama-server and llama.cpp's own router, in one run.

Same machine, same tiny models, same llama-server binary; scenarios interleave the three targets
round by round so machine drift hits all alike. Prints one table and writes results/latest.json
and results/latest.png. Run it with `scripts/dev bench`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import psutil

from gguf_router.keys import section
from gguf_router.settings import BUILT_LLAMA_SERVER, CACHE_DIR
from gguf_router.tinymodels import write_tiny_model

ROUNDS = 3
ROOT = Path(__file__).parent.parent
RESULTS = ROOT / "bench" / "results"
LLAMA = Path(os.environ.get("GGUF_ROUTER_LLAMA_SERVER") or BUILT_LLAMA_SERVER)
REAL_MODELS = Path(os.environ.get("GGUF_ROUTER_REAL_MODELS") or CACHE_DIR / "real-models")
MEMORY_CASES = [(name, file, ctx) for name, file in (("SmolLM2-135M", "SmolLM2-135M-Instruct-Q4_1.gguf"),
                                                     ("Gemma-3-270M", "gemma-3-270m-Q4_K_M.gguf"))
                for ctx in (2048, 8192, 32768)]
QUESTION = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 4}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Target:
    def __init__(self, name: str, argv: list[str], port: int, env: dict | None = None):
        self.name, self.port = name, port
        self.url = f"http://127.0.0.1:{port}"
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)

    async def ready(self, session: aiohttp.ClientSession, path: str = "/health") -> float:
        while True:
            try:
                async with session.get(self.url + path) as r:
                    if r.status == 200:
                        return time.perf_counter() - self.started
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.001)

    def rss_mb(self) -> float:
        return psutil.Process(self.proc.pid).memory_info().rss / 2**20

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@dataclass(frozen=True)
class Tree:
    """gguf-router as an earlier commit had it: its `src` first on the path (`bench versus REV`)."""

    name: str
    src: Path


def checkout(rev: str, work: Path) -> Tree:
    """The `src` folder of `rev`, written out under `work` (the venv's dependencies serve it)."""
    out = work / "versus"
    out.mkdir()
    archive = subprocess.run(["git", "archive", rev, "src"], cwd=ROOT, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    short = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.strip()
    return Tree(f"gguf-router at {short}", out / "src")


def direct(models: Path, *extra: str) -> Target:
    port = free_port()
    return Target("direct", [str(LLAMA), "-m", str(models / "tiny-a.gguf"), "--alias", "tiny-a",
                             "--host", "127.0.0.1", "--port", str(port), *extra], port)


def llamacpp_router(models: Path, *extra: str) -> Target:
    """At --models-max 2 unless `extra` says otherwise (the last of a repeated flag counts)."""
    port = free_port()
    return Target("llama.cpp router", [str(LLAMA), "--models-dir", str(models), "--models-max", "2",
                                       "--host", "127.0.0.1", "--port", str(port), *extra], port)


def gguf_router(models: Path, *extra: str, tree: Tree | None = None) -> Target:
    port = free_port()
    name, env = (tree.name, {**os.environ, "PYTHONPATH": str(tree.src)}) if tree else ("gguf-router", None)
    return Target(name, [sys.executable, "-m", "gguf_router", "--models-dir", str(models),
                         "--models-max", "2", "--llama-server", str(LLAMA), "--log-level", "warning",
                         "--host", "127.0.0.1", "--port", str(port), *extra], port, env)


async def post(session, url, body, headers: dict | None = None) -> float:
    t = time.perf_counter()
    async with session.post(url, json=body, headers=headers) as r:
        await r.read()
        assert r.status == 200, (url, r.status)
    return time.perf_counter() - t


async def closed_loop(session, url, body, concurrency: int, requests: int,
                      headers: dict | None = None) -> tuple[list[float], float]:
    latencies: list[float] = []
    left = requests

    async def worker():
        nonlocal left
        while left > 0:
            left -= 1
            latencies.append(await post(session, url, body, headers))

    t = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - t


async def stream_one(session, url, body) -> tuple[float, list[float]]:
    t = time.perf_counter()
    first, gaps, last = None, [], None
    async with session.post(url, json=body) as r:
        async for _ in r.content.iter_any():
            now = time.perf_counter()
            if first is None:
                first = now - t
            else:
                gaps.append(now - last)
            last = now
    return first, gaps


def pct(values, q) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1000


async def small_requests(targets, session, rows):
    bodies = {
        "/tokenize": {"model": "tiny-a", "content": "hello world"},
        "/v1/chat/completions": {"model": "tiny-a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
    }
    for path, body in bodies.items():
        for conc, count in ((1, 200), (8, 400), (64, 640)):
            per = {t.name: ([], 0.0) for t in targets}
            for _ in range(ROUNDS):
                for t in targets:
                    lat, took = await closed_loop(session, t.url + path, body, conc, count)
                    per[t.name][0].extend(lat)
                    per[t.name] = (per[t.name][0], per[t.name][1] + took)
            for name, (lat, took) in per.items():
                rows.append({"scenario": f"{path} c={conc}", "target": name, "rps": len(lat) / took,
                             "p50_ms": pct(lat, 0.5), "p99_ms": pct(lat, 0.99)})


async def streams(targets, session, rows, rss):
    body = {"model": "tiny-a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 64,
            "stream": True, "ignore_eos": True}
    per = {t.name: ([], []) for t in targets}
    for _ in range(ROUNDS):
        for t in targets:
            task = asyncio.gather(*(stream_one(session, t.url + "/v1/chat/completions", body) for _ in range(64)))
            await asyncio.sleep(0.05)
            rss[t.name + " under 64 streams"] = t.rss_mb()
            for first, gaps in await task:
                per[t.name][0].append(first)
                per[t.name][1].extend(gaps)
    for name, (firsts, gaps) in per.items():
        rows.append({"scenario": "stream 64: first byte", "target": name, "p50_ms": pct(firsts, 0.5),
                     "p99_ms": pct(firsts, 0.99)})
        rows.append({"scenario": "stream 64: chunk gap", "target": name, "p50_ms": pct(gaps, 0.5),
                     "p99_ms": pct(gaps, 0.99)})


async def cold_starts(routers, session, models, rows):
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    bare = []
    for _ in range(5):
        t = direct(models)
        bare.append(await t.ready(session))
        t.stop()
    rows.append({"scenario": "cold start", "target": "bare llama-server start-to-ready", "p50_ms": pct(bare, 0.5)})
    cold: dict[str, list[float]] = {r.name: [] for r in routers}
    swap: dict[str, list[float]] = {r.name: [] for r in routers}
    for _ in range(9):
        for r in routers:  # interleaved, round by round, so drift hits both alike
            for m in ("tiny-a", "tiny-b", "tiny-c"):
                async with session.post(r.url + "/models/unload", json={"model": m}) as resp:
                    await resp.read()
            await asyncio.sleep(0.3)
            cold[r.name].append(await post(session, r.url + "/v1/chat/completions", {**chat, "model": "tiny-b"}))
            await post(session, r.url + "/v1/chat/completions", {**chat, "model": "tiny-a"})
            swap[r.name].append(await post(session, r.url + "/v1/chat/completions", {**chat, "model": "tiny-c"}))
    for r in routers:
        rows.append({"scenario": "cold start", "target": r.name, "p50_ms": pct(cold[r.name], 0.5),
                     "over_bare_ms": pct(cold[r.name], 0.5) - pct(bare, 0.5)})
        rows.append({"scenario": "swap at the limit", "target": r.name, "p50_ms": pct(swap[r.name], 0.5)})


# What a first request under socket activation is measured against: Sanic alone, answering the
# same request from the same socket the same way, with nothing of ours imported.
MINIMAL_SANIC = """
import socket
from sanic import Sanic
from sanic.response import json
app = Sanic("minimal")
@app.get("/health")
async def health(request):
    return json({"status": "ok"})
app.prepare(sock=socket.socket(fileno=3), single_process=True, access_log=False, motd=False)
Sanic.serve_single(app)
"""


def first_request(argv: list[str]) -> float:
    """Seconds from the first connection to its answer, with `argv` started by that connection
    (systemd-socket-activate execs it on the first connection, as systemd does)."""
    port = free_port()
    proc = subprocess.Popen(["systemd-socket-activate", "-l", f"127.0.0.1:{port}", *argv],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while "Listening on" not in proc.stderr.readline():
            pass
        started = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port)) as conn:
            conn.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert conn.recv(4096).startswith(b"HTTP/1.1 200")
            return time.perf_counter() - started
    finally:
        proc.kill()  # nothing was loaded; only the time to the first answer counts
        proc.wait(20)


def startup(models: Path, rows, before: Tree | None = None) -> None:
    """The first request under socket activation: gguf-router against a minimal Sanic app, or
    against the tree `before` (each run through `env`, so both pay for the same exec)."""
    empty = models.parent / "empty.conf"
    empty.touch()
    router = [sys.executable, "-m", "gguf_router", "--config", str(empty), "--models-dir", str(models),
              "--llama-server", str(LLAMA), "--log-level", "warning", "--state-dir", str(models.parent / "state")]
    here = ROOT / "src"
    argvs = ({before.name: ["env", f"PYTHONPATH={before.src}", *router], "gguf-router": ["env", f"PYTHONPATH={here}", *router]}
             if before else {"minimal Sanic app": [sys.executable, "-c", MINIMAL_SANIC], "gguf-router": router})
    times: dict[str, list[float]] = {name: [] for name in argvs}
    for _ in range(9):  # interleaved, so drift hits both alike
        for name, argv in argvs.items():
            times[name].append(first_request(argv))
    for name, values in times.items():
        rows.append({"scenario": "first request, socket activation", "target": name, "p50_ms": pct(values, 0.5)})


async def discovery(session, tiny: Path, rows):
    for n in (10, 1000, 10000):
        folder = Path(tempfile.mkdtemp(prefix=f"bench-{n}-"))
        data = tiny.read_bytes()
        for i in range(n):
            (folder / f"m{i:05d}.gguf").write_bytes(data)
        for make in (llamacpp_router, gguf_router):
            t = make(folder)
            took = await t.ready(session, "/v1/models")
            rows.append({"scenario": f"start-to-ready, {n} files", "target": t.name, "p50_ms": took * 1000,
                         "rss_mb": t.rss_mb()})
            t.stop()
        shutil.rmtree(folder)


def peak_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024


async def memory(session) -> list[dict]:
    """The router's estimate of each real model at each context against its measured peak: a bare
    llama-server started by hand, and the child gguf-router starts (same options, plus the
    router's own), each after loading and one short question."""
    work = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    presets = work / "presets.ini"
    presets.write_text("".join(f"[{name}-{ctx}]\nmodel = {REAL_MODELS / file}\nc = {ctx}\n" for name, file, ctx in MEMORY_CASES))
    port = free_port()
    router = Target("gguf-router", [sys.executable, "-m", "gguf_router", "--models-dir", str(work), "--models-max", "1",
                                    "--models-preset", str(presets), "--config", str(work / "none.conf"),
                                    "--state-dir", str(work), "--llama-server", str(LLAMA), "--log-level", "warning",
                                    "--host", "127.0.0.1", "--port", str(port)], port)
    (work / "none.conf").touch()
    rows = []
    try:
        await router.ready(session)
        for name, file, ctx in MEMORY_CASES:
            port = free_port()
            bare = Target("direct", [str(LLAMA), "-m", str(REAL_MODELS / file), "-c", str(ctx),
                                     "--host", "127.0.0.1", "--port", str(port)], port)
            await bare.ready(session)
            await post(session, bare.url + "/v1/chat/completions", QUESTION)
            direct_mb = peak_mb(bare.proc.pid)
            bare.stop()
            model = f"{name}-{ctx}"
            await post(session, router.url + "/v1/chat/completions", {**QUESTION, "model": model})
            async with session.get(router.url + "/models") as r:
                status = next(m["status"] for m in (await r.json())["data"] if m["id"] == model)
            child = next(p for p in psutil.Process(router.proc.pid).children() if model in p.cmdline())
            rows.append({"model": name, "ctx": ctx, "estimate_mb": status["memory_estimate_bytes"] / 2**20,
                         "direct_mb": direct_mb, "child_mb": peak_mb(child.pid)})
    finally:
        router.stop()
        shutil.rmtree(work)
    return rows


def memory_table(rows) -> str:
    lines = [f"{'model':14} {'-c':>6} {'estimate MiB':>13} {'llama-server peak':>18} {'error':>7} {'child of gguf-router':>20}"]
    for r in rows:
        lines.append(f"{r['model']:14} {r['ctx']:6} {r['estimate_mb']:13.1f} {r['direct_mb']:18.1f} "
                     f"{(r['estimate_mb'] - r['direct_mb']) / r['direct_mb']:+7.1%} {r['child_mb']:20.1f}")
    return "\n".join(lines)


def admission(rows) -> None:
    """What one admission decision costs with 10,000 models listed, 4 of them running and one
    request arriving for another: one step of the scheduler's pure core."""
    from gguf_router.policy import Limits
    from gguf_router.scheduling import inputs as ev
    from gguf_router.scheduling.effects import Stop
    from gguf_router.scheduling.records import Fleet, ModelSpec
    from gguf_router.scheduling.step import step

    specs = {f"m{i:05d}": ModelSpec(f"m{i:05d}", estimate=100 << 20) for i in range(10_000)}
    fleet, _ = step(Fleet(), ev.Configure(specs, Limits(4, 1 << 34)), 0.0)
    for ticket, model_id in enumerate(list(specs)[:4]):
        fleet, _ = step(fleet, ev.Arrive(ticket, model_id), ticket)
        fleet, _ = step(fleet, ev.Ready(model_id, 1, 1), ticket)
        fleet, _ = step(fleet, ev.Release(model_id), ticket)
    times = []
    for _ in range(2000):
        t = time.perf_counter()
        _, effects = step(fleet, ev.Arrive(99, "m09999"), 10.0)
        times.append(time.perf_counter() - t)
    assert [e.model for e in effects if isinstance(e, Stop)] == ["m00000"]
    rows.append({"scenario": "admission decision, 10000 models", "target": "gguf-router",
                 "p50_ms": pct(times, 0.5), "p99_ms": pct(times, 0.99)})


async def churn(session, rows, models: Path, names: list[str], clients: int, models_max: int, label: str,
                seconds: float = 30.0) -> None:
    """Many clients over more models than slots, for `seconds`: client i asks for names[(i + k) % n]
    on its k-th request, so every model is always wanted. Counted: the answers that came back, and
    how long each request waited for its answer (one still waiting at the end counts with what it
    has waited so far, so a starved client shows)."""
    for make in (llamacpp_router, gguf_router):
        target = make(models, "--models-max", str(models_max))
        waits: list[float] = []
        answered = failed = 0
        try:
            await target.ready(session)

            async def client(i: int) -> None:
                nonlocal answered, failed
                for k in itertools.count():
                    body = {**QUESTION, "model": names[(i + k) % len(names)]}
                    t = time.perf_counter()
                    try:
                        async with session.post(target.url + "/v1/chat/completions", json=body) as r:
                            await r.read()
                            answered, failed = answered + (r.status == 200), failed + (r.status != 200)
                    finally:
                        waits.append(time.perf_counter() - t)

            tasks = [asyncio.create_task(client(i)) for i in range(clients)]
            await asyncio.sleep(seconds)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            target.stop()
        rows.append({"scenario": f"churn {label}", "target": target.name, "rps": answered / seconds,
                     "p50_ms": pct(waits, 0.5), "p99_ms": pct(waits, 0.99), "answered": answered,
                     "failed": failed})
        print(f"  {label}: {target.name}: {answered} answered, {failed} failed, p50 wait "
              f"{pct(waits, 0.5) / 1000:.1f} s, p99 {pct(waits, 0.99) / 1000:.1f} s", file=sys.stderr)


# Option sets for `devices` (and bench/gpu-check): the server's default (4 slots, one unified
# cache), quantized cache, split slots, unified slots, partial offload, no flash attention.
DEVICE_CASES = [{"c": "2048"}, {"c": "8192", "ctk": "q8_0", "ctv": "q8_0", "fa": "on"}, {"c": "4096", "np": "4"},
                {"c": "4096", "np": "2", "kvu": "true"}, {"c": "4096", "ngl": "12"}, {"c": "2048", "fa": "off"}]


def device_rows(llama: Path, device, models: list[tuple[str, Path]], cases: list[dict], probe=None) -> list[tuple]:
    """What the router counts each model at on `device` (projection.py) beside what its child
    allocates there (its -lv 4 load log), for every option set; and llama-fit-params' own compute
    figure, which the router does not take. `probe(pid)`: more figures of the running child."""
    from gguf_router import projection
    from gguf_router.ggufinfo import read_info
    from gguf_router.memory import MiB, estimate

    fit_params = llama.with_name("llama-fit-params")
    found = []
    for name, path in models:
        info = read_info(path)
        for case in cases:
            options = {"ngl": "all", **case}
            projected = projection.project(fit_params, path, options, device, estimate(info, options, has_device=True))
            raw = subprocess.run(projection.fit_argv(fit_params, path, options, device), capture_output=True,
                                 text=True).stdout
            fit_compute = projection.parse_print(raw).get(device.name, (0, 0, 0))[2]
            argv = [str(llama), "-m", str(path), "--host", "127.0.0.1", "-lv", "4", *device.child_args(), "--fit", "off"]
            for key, value in options.items():
                argv += [f"-{key}"] if value == "true" else [f"-{key}", value]
            port = free_port()
            extra = None
            with tempfile.NamedTemporaryFile() as log:
                child = subprocess.Popen([*argv, "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline and child.poll() is None:
                    try:
                        if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).status == 200:
                            extra = probe(child.pid) if probe else None
                            break
                    except OSError:
                        pass
                    time.sleep(0.1)
                child.kill()
                child.wait()
                logged = projection.allocated(Path(log.name).read_text(errors="replace"), device)
            total = sum(logged.values())
            found.append((name, " ".join(f"{k}={v}" for k, v in case.items()), projected.model / MiB,
                          logged["model"] / MiB, projected.context / MiB, logged["KV"] / MiB, projected.compute / MiB,
                          logged["compute"] / MiB, fit_compute / MiB,
                          100 * (projected.total - total) / total if total else float("nan"), extra))
    return found


def print_device_rows(found: list[tuple], title: str, extra: str | None = None) -> None:
    header = ["model", "options", "model proj", "model child", "KV proj", "KV child", "compute proj",
              "compute child", "fit-params compute", "total error %"] + ([extra] if extra else [])
    print(title)
    print(" | ".join(header))
    for r in found:
        cells = [r[0], r[1], *(f"{v:.1f}" for v in r[2:10])] + ([str(r[10])] if extra else [])
        print(" | ".join(cells))


def devices() -> None:
    """The projection beside the child's buffers on one ggml-rpc-server device, both real models."""
    from gguf_router.devices import Device

    port = free_port()
    server = subprocess.Popen([str(LLAMA.with_name("ggml-rpc-server")), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    device = Device(f"127.0.0.1:{port}", "RPC0", f"127.0.0.1:{port}", 0, 0, 0, rpc=True)
    try:
        time.sleep(1)
        found = device_rows(LLAMA, device, [(name, REAL_MODELS / file) for name, file, _ in MEMORY_CASES[::3]],
                            DEVICE_CASES)
    finally:
        server.kill()
        server.wait()
    print_device_rows(found, "projection vs the child's buffers on one ggml-rpc-server device, MiB")


async def churns(session, rows, work: Path) -> None:
    tiny = work / "churn-tiny"
    names = ["tiny-a", "tiny-b", "tiny-c", "tiny-d"]
    for seed, name in enumerate(names):
        write_tiny_model(tiny / f"{name}.gguf", seed=seed)
    await churn(session, rows, tiny, names, clients=24, models_max=2, label="24 clients, 4 tiny, max 2")
    real = work / "churn-real"
    real.mkdir()
    files = [f for _, f, _ in MEMORY_CASES[::3]]
    for f in files:
        (real / f).symlink_to(REAL_MODELS / f)
    await churn(session, rows, real, [Path(f).stem for f in files], clients=8, models_max=1,
                label="8 clients, 2 real, max 1")


async def keys(session, models: Path, work: Path, rows) -> None:
    """/tokenize at c=8 by one of 50 named keys, with its quotas and usage accounting, against the
    same router with one plain --api-key (whose usage is counted too), interleaved; llama-server and
    llama.cpp's router with that plain key beside them."""
    plain, named = "sk-plain-bench", {f"team-{i}": f"sk-team-{i}" for i in range(50)}
    keys_file = work / "keys.ini"
    (work / "none.ini").touch()
    keys_file.write_text("".join(section(name, key, "inference", "tiny-*", {
        "concurrency": 64, "requests-per-minute": 10**6, "tokens-per-minute": 10**9}) for name, key in named.items()))
    targets = [(direct(models, "--api-key", plain), plain), (llamacpp_router(models, "--api-key", plain), plain),
               (gguf_router(models, "--api-key", plain, "--keys-file", str(work / "none.ini"),
                            "--state-dir", str(work / "state-plain")), plain),
               (gguf_router(models, "--keys-file", str(keys_file), "--state-dir", str(work / "state-named")),
                named["team-7"])]
    targets[-1][0].name = "gguf-router, named keys"
    body = {"model": "tiny-a", "content": "hello world"}
    per: dict[str, tuple[list[float], float]] = {t.name: ([], 0.0) for t, _ in targets}
    try:
        for t, key in targets:
            await t.ready(session)
            await post(session, t.url + "/tokenize", body, {"Authorization": f"Bearer {key}"})
        for _ in range(ROUNDS * 2):
            for t, key in targets:
                latencies, took = await closed_loop(session, t.url + "/tokenize", body, 8, 400,
                                                    {"Authorization": f"Bearer {key}"})
                per[t.name] = (per[t.name][0] + latencies, per[t.name][1] + took)
    finally:
        for t, _ in targets:
            t.stop()
    for name, (latencies, took) in per.items():
        rows.append({"scenario": "/tokenize c=8, with a key", "target": name, "rps": len(latencies) / took,
                     "p50_ms": pct(latencies, 0.5), "p99_ms": pct(latencies, 0.99)})


def download(work: Path, rows) -> None:
    """Gemma-3-270M (253 MB) from the loopback hub of the tests, by `gguf-router pull` (no router
    up: it downloads by itself), by llama.cpp's own downloader (`llama-server -hf`, timed until the
    file is in the cache) and by curl, each into an empty cache, round by round."""
    sys.path.insert(0, str(ROOT / "tests"))
    from hub_server import HubServer

    repo, name = "bench/gemma-3-270m-GGUF", "gemma-3-270m-Q4_K_M.gguf"
    hub = HubServer()
    hub.add(repo, {name: REAL_MODELS / name})
    hub.start()
    size = (REAL_MODELS / name).stat().st_size
    env = {**os.environ, "MODEL_ENDPOINT": hub.url}
    closed = f"http://127.0.0.1:{free_port()}"

    def by_pull(cache: Path) -> None:
        subprocess.run([sys.executable, "-m", "gguf_router", "pull", "--url", closed, "--config", str(work / "none.conf"),
                        f"{repo}:Q4_K_M"], env={**env, "LLAMA_CACHE": str(cache)}, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def by_llama_cpp(cache: Path) -> None:
        proc = subprocess.Popen([str(LLAMA), "-hf", f"{repo}:Q4_K_M", "--port", str(free_port()), "-c", "256"],
                                env={**env, "LLAMA_CACHE": str(cache)}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            while not any(p.name == name for p in cache.rglob(name)):  # the snapshot's link: the download ended
                if proc.poll() is not None:
                    raise RuntimeError("llama-server -hf exited")
                time.sleep(0.005)
        finally:
            proc.kill()
            proc.wait()

    def by_router(cache: Path) -> float:
        """POST /models to a running router, timed to its download_finished event (its start not counted)."""
        port = free_port()
        router = subprocess.Popen([sys.executable, "-m", "gguf_router", "--port", str(port), "--config", str(work / "none.conf"),
                                   "--models-preset", str(work / "none.conf"), "--keys-file", str(work / "none.conf"),
                                   "--state-dir", str(cache / "state"), "--llama-server", str(LLAMA), "--log-level", "warning"],
                                  env={**env, "LLAMA_CACHE": str(cache)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while True:
                try:
                    events = urllib.request.urlopen(f"http://127.0.0.1:{port}/models/sse")
                    break
                except OSError:
                    time.sleep(0.02)
            events.readline()
            started = time.perf_counter()
            urllib.request.urlopen(urllib.request.Request(
                f"http://127.0.0.1:{port}/models", data=json.dumps({"model": f"{repo}:Q4_K_M"}).encode(),
                headers={"Content-Type": "application/json"}))
            for line in events:
                if b'"download_finished"' in line:
                    return time.perf_counter() - started
                if b'"download_failed"' in line:
                    raise RuntimeError(line)
        finally:
            router.terminate()
            router.wait()

    def by_curl(cache: Path) -> None:
        cache.mkdir()
        subprocess.run(["curl", "-sfL", "-o", str(cache / name), f"{hub.url}/{repo}/resolve/main/{name}"], check=True)

    (work / "none.conf").touch()
    times: dict[str, list[float]] = {"gguf-router pull": [], "gguf-router POST /models": [], "llama.cpp -hf": [],
                                     "curl": []}
    runs = {"gguf-router pull": by_pull, "gguf-router POST /models": by_router, "llama.cpp -hf": by_llama_cpp,
            "curl": by_curl}
    try:
        by_curl(work / "warm")  # the file in the page cache and the hub's hashes made, for all alike
        for round_ in range(ROUNDS):
            for label, run in runs.items():
                cache = work / f"dl-{round_}-{len(times[label])}-{label.split()[-1].strip('/')}"
                started = time.perf_counter()
                took = run(cache)
                times[label].append(took if took is not None else time.perf_counter() - started)
                shutil.rmtree(cache)
    finally:
        hub.stop()
    for label, values in times.items():
        rows.append({"scenario": "download 253 MB, loopback hub", "target": label,
                     "rps": size / 2**20 / (pct(values, 0.5) / 1000), "p50_ms": pct(values, 0.5),
                     "p99_ms": max(values) * 1000})
        print(f"  download: {label}: median {pct(values, 0.5) / 1000:.2f} s ({size / 2**20 / (pct(values, 0.5) / 1000):.0f}"
              f" MiB/s), {pct(values, 0.5) / pct(times['curl'], 0.5):.2f} x curl's time", file=sys.stderr)


async def balancer(session, models: Path, rows) -> None:
    """What HAProxy in front adds: the same small chat through it and to the router directly,
    interleaved (one host; `gguf-router haproxy-config` and `haproxy-sync` as the README runs them)."""
    haproxy = shutil.which("haproxy")
    if not haproxy or os.geteuid() != 0:
        print("balancer: skipped (needs root and Debian's haproxy)", file=sys.stderr)
        return
    work = models.parent / "balancer"
    work.mkdir()
    router = gguf_router(models)
    port = free_port()
    (work / "balancer.conf").write_text(
        f"[balancer]\nlisten = 127.0.0.1:{port}\nsync-listen = 127.0.0.1:{free_port()}\n"
        f"runtime-socket = {work}/haproxy.sock\nmap-file = {work}/models.map\n[hosts]\none = {router.url}\n")
    command = [sys.executable, "-m", "gguf_router"]
    config = subprocess.run([*command, "haproxy-config", "--config", str(work / "balancer.conf")],
                            check=True, capture_output=True, text=True).stdout
    (work / "haproxy.cfg").write_text(config)
    await router.ready(session)
    sync = subprocess.Popen([*command, "haproxy-sync", "--config", str(work / "balancer.conf"), "--log-level", "warning"])
    front = None
    try:
        while not (work / "models.map").exists():
            await asyncio.sleep(0.05)
        front = subprocess.Popen([haproxy, "-db", "-f", str(work / "haproxy.cfg")], stdout=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        body = {"model": "tiny-a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        while True:  # routable once the map has tiny-a and the health check saw the host
            try:
                await post(session, url + "/v1/chat/completions", body)
                break
            except (AssertionError, aiohttp.ClientError):
                await asyncio.sleep(0.1)
        for conc, count in ((1, 200), (8, 400)):
            per = {"gguf-router": ([], 0.0), "HAProxy -> gguf-router": ([], 0.0)}
            for _ in range(ROUNDS):
                for name, base in (("gguf-router", router.url), ("HAProxy -> gguf-router", url)):
                    lat, took = await closed_loop(session, base + "/v1/chat/completions", body, conc, count)
                    per[name] = (per[name][0] + lat, per[name][1] + took)
            for name, (lat, took) in per.items():
                rows.append({"scenario": f"balancer chat c={conc}", "target": name, "rps": len(lat) / took,
                             "p50_ms": pct(lat, 0.5), "p99_ms": pct(lat, 0.99)})
            per = {name: lat for name, (lat, _) in per.items()}
            rows.append({"scenario": f"balancer chat c={conc}", "target": "added by HAProxy (p50)",
                         "p50_ms": pct(per["HAProxy -> gguf-router"], 0.5) - pct(per["gguf-router"], 0.5)})
    finally:
        for proc in (front, sync):
            if proc is not None:
                proc.terminate()
                proc.wait(10)
        router.stop()


def refused_bodies(models: Path, rows) -> None:
    """Ten clients without the key, each pushing a 62 MB body at once (what a LAN probe tried):
    how much more memory each server holds at its peak than before."""
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Content-Length: 62000000\r\n\r\n")

    def push(port: int) -> None:
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(head)
            try:
                for _ in range(62):
                    s.sendall(b"x" * (1 << 20))
            except OSError:
                pass  # refused and closed

    for make in (direct, llamacpp_router, gguf_router):
        target = make(models, "--api-key", "bench-key")
        try:
            for _ in range(3000):
                try:
                    with socket.create_connection(("127.0.0.1", target.port)):
                        break
                except OSError:
                    time.sleep(0.01)
            time.sleep(1)  # settled
            before = peak = psutil.Process(target.proc.pid).memory_info().rss
            pushers = [threading.Thread(target=push, args=(target.port,)) for _ in range(10)]
            for t in pushers:
                t.start()
            while any(t.is_alive() for t in pushers):
                peak = max(peak, psutil.Process(target.proc.pid).memory_info().rss)
                time.sleep(0.005)
            rows.append({"scenario": "RSS MB added, 10 x 62 MB keyless", "target": target.name,
                         "p50_ms": (peak - before) / 2**20})
        finally:
            target.stop()


def table(rows) -> str:
    by = {}
    for r in rows:
        by.setdefault(r["scenario"], {})[r["target"]] = r
    lines = [f"{'scenario':34} {'target':34} {'req/s':>9} {'p50 ms':>9} {'p99 ms':>9} {'vs direct':>10} {'x reference':>12}"]
    for scenario, targets in by.items():
        base = targets.get("direct", {}).get("p50_ms")
        ref = next((r["p50_ms"] for name, r in targets.items()
                    if name in ("llama.cpp router", "minimal Sanic app") or name.startswith("gguf-router at ")), None)
        for name, r in targets.items():
            p50 = r.get("p50_ms")
            lines.append(
                f"{scenario:34} {name:34} {r.get('rps', 0):9.0f} {p50:9.3f} {r.get('p99_ms', 0):9.3f} "
                f"{(f'{p50 - base:+.3f} ms' if base is not None and name != 'direct' else ''):>10} "
                f"{(f'x{p50 / ref:.2f}' if ref and name == 'gguf-router' else ''):>12}")
    return "\n".join(lines)


def chart(rows, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    scenarios = list(dict.fromkeys(r["scenario"] for r in rows))
    targets = ["direct", "llama.cpp router", "gguf-router"]
    fig, ax = plt.subplots(figsize=(12, 6))
    width = 0.27
    for i, target in enumerate(targets):
        values = [next((r["p50_ms"] for r in rows if r["scenario"] == s and r["target"] == target), 0) for s in scenarios]
        ax.barh([y + i * width for y in range(len(scenarios))], values, width, label=target)
    ax.set_yticks([y + width for y in range(len(scenarios))], scenarios, fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("p50 latency / time, ms (log scale)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


async def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="gguf-router-bench-"))
    models = work / "models"
    for seed, name in enumerate(("tiny-a", "tiny-b", "tiny-c")):
        write_tiny_model(models / f"{name}.gguf", seed=seed)
    rows, rss, memory_rows = [], {}, []
    # Under llama-server's 5 s keep-alive (cpp-httplib): a connection idle longer is closed under us.
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=4)
    # `scripts/dev bench discovery`, `... memory`, `... admission`, `... startup`, `... balancer`,
    # `... refused`, `... churn`, `... keys`, `... download` or `... devices`: that part alone; `... versus REV`: this tree against
    # the commit REV in start-up, cold start and small requests
    only = sys.argv[1] if sys.argv[1:] in (["discovery"], ["memory"], ["admission"], ["startup"], ["balancer"],
                                           ["refused"], ["churn"], ["keys"], ["download"], ["devices"]) \
        or sys.argv[1:2] == ["versus"] else None
    before = checkout(sys.argv[2], work) if only == "versus" else None
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        if only in (None, "memory"):
            print("memory ...", file=sys.stderr)
            memory_rows = await memory(session)
        # The routers alone for `startup` (their cold starts; the first request comes below).
        targets = {None: lambda: [direct(models), llamacpp_router(models), gguf_router(models)],
                   "startup": lambda: [llamacpp_router(models), gguf_router(models)],
                   "versus": lambda: [gguf_router(models, tree=before), gguf_router(models)]}.get(only, list)()
        try:
            for t in targets:
                await t.ready(session)
                rss[t.name + " idle"] = t.rss_mb()
                await post(session, t.url + "/tokenize", {"model": "tiny-a", "content": "warm"})
            if only in (None, "versus"):
                print("small requests ...", file=sys.stderr)
                await small_requests(targets, session, rows)
            if only is None:
                print("streams ...", file=sys.stderr)
                await streams(targets, session, rows, rss)
            if targets:
                print("cold starts ...", file=sys.stderr)
                await cold_starts(targets[-2:], session, models, rows)
        finally:
            for t in targets:
                t.stop()
        if only in (None, "discovery"):
            print("discovery ...", file=sys.stderr)
            await discovery(session, models / "tiny-a.gguf", rows)
        if only in (None, "balancer"):
            print("balancer ...", file=sys.stderr)
            await balancer(session, models, rows)
        if only in (None, "churn"):
            print("churn ...", file=sys.stderr)
            await churns(session, rows, work)
        if only in (None, "keys"):
            print("keys ...", file=sys.stderr)
            await keys(session, models, work, rows)
    if only in (None, "admission"):
        admission(rows)
    if only in (None, "startup", "versus"):
        print("first request under socket activation ...", file=sys.stderr)
        startup(models, rows, before)
    if only in (None, "refused"):
        print("refused bodies ...", file=sys.stderr)
        refused_bodies(models, rows)
    if only in (None, "download"):
        print("downloads ...", file=sys.stderr)
        download(work, rows)
    if only in (None, "devices"):
        print("device projections ...", file=sys.stderr)
        devices()
    shutil.rmtree(work)
    for name, mb in rss.items():
        rows.append({"scenario": "RSS MB (router process)", "target": name, "p50_ms": mb})
    if rows:
        print(table(rows))
    if memory_rows:
        print(memory_table(memory_rows))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{only or 'latest'}.json").write_text(
        json.dumps({"rows": rows, "memory": memory_rows, "when": time.strftime("%F %T")}, indent=1))
    if only is None:
        chart([r for r in rows if "RSS" not in r["scenario"]], RESULTS / "latest.png")
        print(f"wrote {RESULTS / 'latest.json'} and latest.png", file=sys.stderr)


if __name__ == "__main__":
    asyncio.run(main())
