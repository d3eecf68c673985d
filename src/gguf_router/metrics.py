"""`GET /metrics` in Prometheus' text format: the router's own figures, then each loaded child's
llama-server metrics with a `model` label added.

Scraping reads what is already known and asks only children that are loaded: it never loads a
model, never counts as a use of one (LRU order stays as it was) and skips a child that is slow.
"""

from __future__ import annotations

import asyncio
import re
from collections import defaultdict
from typing import Callable

from .scheduling.records import STATUS

CHILD_TIMEOUT = 2.0


def count_request(request, response) -> None:
    """Requests answered, by model, endpoint and status (a response hook)."""
    route = request.route.path if request.route else "unmatched"
    named = getattr(request.ctx, "model_id", "")
    # Only ids of models that exist become labels: a client's made-up names all count as "unknown",
    # as do names of models its key may not use (routing.scoped).
    model = (not getattr(request.ctx, "out_of_scope", False) and request.app.ctx.router.scheduler.canonical(named)) \
        or ("unknown" if named else "")
    request.app.ctx.request_counts[(model, "/" + route.lstrip("/"), response.status)] += 1
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(.*)$")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(**labels) -> str:
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items()) + "}"


class Family:
    def __init__(self, name: str, kind: str, help: str):
        self.name, self.kind, self.help = name, kind, help
        self.samples: list[str] = []

    def add(self, value, suffix: str = "", **labels) -> None:
        self.samples.append(f"{self.name}{suffix}{_labels(**labels) if labels else ''} {value}")

    def text(self) -> str:
        return "\n".join([f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}", *self.samples])


def router_families(router, models: list, request_counts: dict, admin: bool) -> list[Family]:
    state = Family("gguf_router_model_state", "gauge", "1 for the state each model is in")
    states = list(dict.fromkeys(STATUS.values())) + ["invalid"]
    counters = {
        "loads": Family("gguf_router_model_loads_total", "counter", "llama-server starts that became ready"),
        "evictions": Family("gguf_router_model_evictions_total", "counter", "unloads to make room (LRU)"),
        "crashes": Family("gguf_router_model_crashes_total", "counter", "children that exited on their own"),
        "oom_kills": Family("gguf_router_model_oom_kills_total", "counter", "children killed for memory"),
        "restarts": Family("gguf_router_model_restarts_total", "counter", "restarts after a crash"),
        "unresponsive": Family("gguf_router_model_unresponsive_total", "counter",
                               "children killed for not answering /health within their health timeout"),
    }
    load_seconds = Family("gguf_router_model_load_seconds", "summary", "time from start to ready")
    in_flight = Family("gguf_router_requests_in_flight", "gauge", "requests being served, by model")
    queued = Family("gguf_router_requests_queued", "gauge", "requests waiting for their model to load")
    memory = Family("gguf_router_model_memory_bytes", "gauge",
                    "memory of a loaded model's llama-server (its unit's cgroup, else its resident set)")
    peak = Family("gguf_router_model_memory_peak_bytes", "gauge", "the most memory a loaded model's llama-server has held")
    estimate = Family("gguf_router_model_memory_estimate_bytes", "gauge",
                      "host memory a model is estimated to need once loaded, from its GGUF and options")
    limit = Family("gguf_router_model_memory_limit_bytes", "gauge", "the memory limit enforced on a loaded model's unit")
    for m in models:
        record, stats = m.record, m.record.stats
        current = "invalid" if m.file.error else m.state
        for value in states:
            state.add(int(value == current), model=m.id, state=value)
        for key, family in counters.items():
            family.add(getattr(stats, key), model=m.id)
        load_seconds.add(round(stats.load_seconds, 6), "_sum", model=m.id)
        load_seconds.add(stats.loads, "_count", model=m.id)
        in_flight.add(record.in_flight, model=m.id)
        queued.add(record.waiting, model=m.id)
        if m.config.memory is not None:
            estimate.add(m.config.memory.host, model=m.id)
        if m.serving and (use := record.memory) is not None:
            memory.add(use.current, model=m.id)
            peak.add(record.peak, model=m.id)
            if use.limit is not None:
                limit.add(use.limit, model=m.id)
    requests = Family("gguf_router_requests_total", "counter", "requests answered, by model, endpoint and status")
    for (model_id, endpoint, status), count in sorted(request_counts.items()):
        requests.add(count, model=model_id, endpoint=endpoint, code=status)
    import psutil  # imported with the first scrape, not before the router serves

    process = psutil.Process()
    with process.oneshot():
        cpu = process.cpu_times()
        own = [
            ("process_resident_memory_bytes", "gauge", "the router's resident memory", process.memory_info().rss),
            ("process_cpu_seconds_total", "counter", "the router's CPU time", round(cpu.user + cpu.system, 3)),
            ("process_open_fds", "gauge", "the router's open file descriptors", process.num_fds()),
            ("process_start_time_seconds", "gauge", "when the router started (unix time)", process.create_time()),
        ]
    fleet = router.scheduler.fleet
    waited = Family("gguf_router_queue_wait_seconds", "summary", "time requests waited for their model to load")
    waited.add(round(fleet.waited[1], 6), "_sum")
    waited.add(fleet.waited[0], "_count")
    refused = Family("gguf_router_requests_refused_total", "counter",
                     "requests refused before reaching a model: queue full, queue timeout, never fits the budget")
    for reason, count in fleet.refused.items():
        refused.add(count, reason=reason)
    budget = Family("gguf_router_memory_budget_bytes", "gauge", "memory the models may hold together")
    if fleet.limits.budget is not None:
        budget.add(fleet.limits.budget)
    reserved = Family("gguf_router_memory_reserved_bytes", "gauge", "memory the running models are counted at")
    reserved.add(fleet.reserved)
    # By key name (never the key), as usage counts them since the router started; for admins only.
    key_requests = Family("gguf_router_key_requests_total", "counter", "requests routed to a model, by key, model "
                          "and status")
    for (key, model_id, code), count in sorted(router.usage.requests.items()) if admin else ():
        key_requests.add(count, key=key, model=model_id, code=code)
    key_tokens = Family("gguf_router_key_tokens_total", "counter", "tokens the children reported, by key, model and "
                        "kind (prompt, completion)")
    for (key, model_id, kind), count in sorted(router.usage.tokens.items()) if admin else ():
        key_tokens.add(count, key=key, model=model_id, kind=kind)
    device_budget = Family("gguf_router_device_budget_bytes", "gauge", "device memory the models on it may hold")
    device_total = Family("gguf_router_device_memory_bytes", "gauge", "device memory as llama-server lists it")
    device_reserved = Family("gguf_router_device_reserved_bytes", "gauge", "what the models on it are counted at")
    held = fleet.on_devices()
    for device in (router.devices or {}).values():
        device_budget.add(device.budget, device=device.id)
        device_total.add(device.total, device=device.id)
        device_reserved.add(held.get(device.id, (0, ()))[0], device=device.id)
    families = [state, *counters.values(), load_seconds, in_flight, queued, memory, peak, estimate, limit, requests,
                waited, refused, budget, reserved, device_budget, device_total, device_reserved, key_requests,
                key_tokens]
    for name, kind, help, value in own:
        family = Family(f"gguf_router_{name}", kind, help)
        family.add(value)
        families.append(family)
    return families


def relabel(text: str, model_id: str, families: dict[str, list[str]], headers: dict[str, list[str]]) -> None:
    """Adds model="id" to every sample of a child's metrics, grouped by family."""
    for line in text.splitlines():
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                headers.setdefault(parts[2], [])
                if not any(h.split(None, 3)[1] == parts[1] for h in headers[parts[2]]):
                    headers[parts[2]].append(line)
            continue
        match = _SAMPLE.match(line)
        if not match:
            continue
        name, labels, value = match.groups()
        inner = labels[1:-1] if labels else ""
        extra = f'model="{_escape(model_id)}"' + ("," + inner if inner else "")
        families[name].append(f"{name}{{{extra}}} {value}")


async def render(router, request_counts: dict, visible: Callable[[str], bool], admin: bool) -> str:
    """`visible`: the models the caller's key may know of; `admin`: it sees every key's figures too."""
    models = [m for m in router.scheduler.views() if visible(m.id)]  # one look serves both parts
    counts = {labels: n for labels, n in request_counts.items() if not labels[0] or labels[0] == "unknown"
              or visible(labels[0])}
    parts = [family.text() for family in router_families(router, models, counts, admin)]
    loaded = [m for m in models if m.serving]

    import aiohttp  # imported when first needed, not before the router serves

    async def scrape(model):
        try:
            url = router.session.connector.url(model, "/metrics")
            async with router.session.get(url, timeout=aiohttp.ClientTimeout(total=CHILD_TIMEOUT)) as reply:
                return model.id, (await reply.text()) if reply.status == 200 else ""
        except Exception:  # a slow or dying child is left out of this scrape, not the whole scrape
            return model.id, ""

    families: dict[str, list[str]] = defaultdict(list)
    headers: dict[str, list[str]] = {}
    for model_id, text in await asyncio.gather(*(scrape(m) for m in loaded)):
        relabel(text, model_id, families, headers)
    for name, samples in families.items():
        parts.append("\n".join([*headers.get(name, []), *samples]))
    return "\n".join(parts) + "\n"
