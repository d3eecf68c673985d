"""What a model will take on a device, before it starts: llama.cpp's own projection, and ours.

`llama-fit-params --fit-print on` (built beside llama-server) loads a GGUF's metadata, reserves
the graph with the exact options given, reads no weights, and prints one line per device it
would use: `NAME MODEL CONTEXT COMPUTE ` in MiB, then `Host MODEL CONTEXT COMPUTE `. It takes
llama.cpp's common options only (the server's unified cache, mmproj and draft model are refused),
and two of its figures are not what llama-server b11434 allocates, as measured against children
on ggml-rpc-server devices (`scripts/dev bench devices`):
- compute: it reserves the logits of every token of a ubatch (its n_outputs_max defaults to
  n_batch), where llama-server keeps one output per slot (n_outputs_max = slots): 520 MiB
  projected for Gemma-3-270M's 262k vocabulary, 21 MiB allocated. memory.py's compute buffer,
  which follows the server's rules, is taken instead;
- context: the server's default is 4 slots sharing one unified cache, which it cannot be told;
  with a sliding-window model (Gemma 3) that holds more cells than one slot and fewer than 4
  split ones. Then memory.py's KV cache of the offloaded layers is taken; otherwise its own.
So llama-fit-params gives the weights' placement (by layer, -ts, -ot, MoE experts) and the plain
cache; the mmproj's and draft model's file sizes are added to the device, since it counts neither.

Where it cannot answer (not built, the device busy, an option it refuses), the router's own
split of memory.py's estimate stands in: the layers' share of the weights, marked conservative.

One run costs a fifth of a second and opens the device (on an RPC server, its one client slot),
so answers are cached by file, options and device for the router's life.
"""

from __future__ import annotations

import logging
import re
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from .devices import Device
from .memory import MiB, MemoryEstimate, slots

log = logging.getLogger(__name__)

ASK_TIMEOUT = 5.0  # seconds: a projection takes well under one; longer means the device is busy
RETRY_AFTER = 60.0  # seconds before a device that did not answer is asked again for the same model
# The child's options that change what it allocates, as llama-fit-params takes them; the others
# (sampling, the server's own) change nothing it projects, and many it would refuse.
PROJECTED = {"c": "--ctx-size", "b": "--batch-size", "ub": "--ubatch-size", "ctk": "--cache-type-k",
             "ctv": "--cache-type-v", "fa": "--flash-attn", "ts": "--tensor-split", "sm": "--split-mode",
             "mg": "--main-gpu", "ot": "--override-tensor", "ncmoe": "--n-cpu-moe", "ngl": "--n-gpu-layers"}
# Flags, by their positive names as the child's options give them ("true" or "false"): what to
# pass when on, and when off.
SWITCHES = {("swa-full", "swa-full"): ("--swa-full", None), ("cmoe", "cpu-moe"): ("--cpu-moe", None),
            ("kvo", "kv-offload"): (None, "--no-kv-offload")}


@dataclass(frozen=True)
class Projection:
    device: str  # the device's id
    model: int  # bytes of weights on the device
    context: int  # KV cache (and recurrent state) on the device
    compute: int  # compute buffer on the device
    extra: int  # mmproj, draft model and LoRA adapters (memory.py's `extra`), counted on the device
    host: int  # what the projection puts on the host (weights not offloaded, host compute)
    host_model: int  # of that, weights: the layers not offloaded, and the token embeddings, always
    source: str  # "llama-fit-params", or "estimate" when ours stands in
    conservative: str | None = None  # why it is an upper bound, when it is ours

    @property
    def total(self) -> int:
        return self.model + self.context + self.compute + self.extra

    def as_json(self) -> dict:
        return {"device": self.device, "bytes": self.total, "model": self.model, "context": self.context,
                "compute": self.compute, "extra": self.extra, "host": self.host, "host_model": self.host_model,
                "source": self.source,
                "conservative": self.conservative}


def fit_argv(fit_params: Path, model: Path, options: Mapping[str, str], device: Device) -> list[str]:
    """llama-fit-params' command line for the child's options (`options`: every name each is
    known by, as catalog._option_names gives them) placed on `device`."""
    argv = [str(fit_params), "--model", str(model)]
    for short, flag in PROJECTED.items():
        long = flag.lstrip("-")
        value = options.get(short, options.get(long))
        if value is not None:
            argv += [flag, value]
    for (short, long), flags in SWITCHES.items():
        value = options.get(short, options.get(long))
        if value is not None and (flag := flags[value != "true"]):
            argv.append(flag)
    # Split slots as the server has them; a unified cache as one slot of the whole context.
    n_slots, unified = slots(options)
    if n_slots > 1 and not unified:
        argv += ["--parallel", str(n_slots)]
    return [*argv, *device.child_args(), "--fit", "off", "--fit-print", "on"]


def parse_print(text: str) -> dict[str, tuple[int, int, int]]:
    """Each device's (and `Host`'s) (model, context, compute) in bytes from --fit-print's stdout."""
    found = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 4 and all(p.isdigit() for p in parts[1:]):
            found[parts[0]] = tuple(int(p) * MiB for p in parts[1:])
    return found


def own_split(device: Device, memory: MemoryEstimate, why: str) -> Projection:
    """memory.py's estimate split the way -ngl places it (the weights evenly by layer)."""
    return Projection(device.id, memory.device_weights, memory.device - memory.device_weights, memory.compute,
                      memory.extra, memory.host, memory.weights - memory.device_weights, "estimate", why)


# libllama's load lines (at -lv 4): `load_tensors: RPC0[127.0.0.1:50052] model buffer size = 92.10 MiB`.
_BUFFER = re.compile(r"(\S+) (model|KV|compute) buffer size = +([\d.]+) MiB")


def allocated(log: str, device: Device) -> dict[str, int]:
    """What a child's load log says it allocated on `device`: model, KV and compute bytes. Its
    buffers are named for their buffer type: CUDA0, or an RPC server's RPC0[ENDPOINT]."""
    found = {"model": 0, "KV": 0, "compute": 0}
    for name, kind, mib in _BUFFER.findall(log):
        if (name.endswith(f"[{device.id}]") if device.rpc else name == device.name):
            found[kind] += int(float(mib) * MiB)
    return found


_cache: dict[tuple, tuple[float, Projection]] = {}
_lock = threading.Lock()


def project(fit_params: Path, model: Path, options: Mapping[str, str], device: Device,
            memory: MemoryEstimate, ask: bool = True, timeout: float = ASK_TIMEOUT) -> Projection:
    """Blocking. What the model takes on `device` with these options. `ask` False: a device a
    child holds (an RPC server would keep the question waiting); an earlier answer, or ours."""
    argv = fit_argv(fit_params, model, options, device)
    try:
        stat = model.stat()
        stamp = (stat.st_size, stat.st_mtime_ns)
    except OSError:
        stamp = None
    key = (tuple(argv), stamp)
    with _lock:
        cached = _cache.get(key)
    if cached is not None and (cached[1].source != "estimate" or time.monotonic() < cached[0] or not ask):
        return cached[1]
    if not ask:
        return own_split(device, memory, "the device was busy with another model when it was projected")
    projection = _ask(argv, device, memory, options, timeout)
    with _lock:
        _cache[key] = (time.monotonic() + RETRY_AFTER, projection)
    return projection


def _ask(argv: list[str], device: Device, memory: MemoryEstimate, options: Mapping[str, str],
         timeout: float) -> Projection:
    if not Path(argv[0]).is_file():
        return own_split(device, memory, f"{Path(argv[0]).name} is not built beside llama-server")
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        log.warning("device %s: llama-fit-params did not answer within %g s (the device is busy); "
                    "the router's own estimate stands in", device.id, timeout)
        return own_split(device, memory, "llama-fit-params did not answer (the device was busy)")
    except OSError as exc:
        return own_split(device, memory, f"llama-fit-params cannot run: {exc}")
    rows = parse_print(done.stdout)
    if done.returncode != 0 or device.name not in rows or "Host" not in rows:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        log.warning("device %s: llama-fit-params failed (exit code %s: %s); the router's own estimate stands in",
                    device.id, done.returncode, last[:200])
        return own_split(device, memory, f"llama-fit-params failed: {last[:200]}")
    model_bytes, context, _ = rows[device.name]
    n_slots, unified = slots(options)
    if n_slots > 1 and unified:
        context = memory.device - memory.device_weights
    return Projection(device.id, model_bytes, context, memory.compute, memory.extra, sum(rows["Host"]),
                      rows["Host"][0], "llama-fit-params")
