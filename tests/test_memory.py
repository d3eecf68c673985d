"""Memory: the estimate in /models against what real llama-server children really hold.

The accuracy test loads each model (tiny, SmolLM2-135M, Gemma-3-270M) at three context sizes
and with options that change memory, asks it one short question, and compares the estimate with
the child's peak resident memory (VmHWM, read from /proc by the test itself).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import GEMMA, SMOL, chat
from gguf_router.ggufinfo import GGUFInfo, read_info
from gguf_router.memory import MiB, estimate, floor_after, memory_limits
from gguf_router.scheduling.floors import Floors


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


# (section name, model file, preset lines): each model at 2048, 8192 and 32768 tokens, plus
# options that change memory in other ways.
CASES = [
    *[(f"tiny-{c}", "tiny", [f"c = {c}"]) for c in (2048, 8192, 32768)],
    *[(f"smol-{c}", SMOL, [f"c = {c}"]) for c in (2048, 8192, 32768)],
    *[(f"gemma-{c}", GEMMA, [f"c = {c}"]) for c in (2048, 8192, 32768)],
    ("smol-q8-cache", SMOL, ["c = 16384", "cache-type-k = q8_0", "cache-type-v = q8_0", "flash-attn = on"]),
    ("smol-2-slots", SMOL, ["c = 16384", "parallel = 2"]),
    ("smol-read-in", SMOL, ["c = 4096", "load-mode = none", "ubatch-size = 256"]),
    ("gemma-swa-full", GEMMA, ["c = 16384", "swa-full = true"]),
]


@pytest.mark.slow
def test_estimate_is_within_ten_percent_of_real_children(start_router, real_models, models_dir, tmp_path):
    presets = tmp_path / "presets.ini"
    files = {"tiny": models_dir / "tiny-a.gguf", SMOL: real_models / SMOL, GEMMA: real_models / GEMMA}
    presets.write_text("".join(f"[{name}]\nmodel = {files[file]}\n" + "".join(f"{line}\n" for line in lines)
                               for name, file, lines in CASES))
    router = start_router("--models-max", "1", "--models-preset", str(presets), models=tmp_path)
    rows, misses = [], []
    for name, _, _ in CASES:
        reply = router.http.post("/v1/chat/completions", json=chat(name, "What is the capital of France?", max_tokens=4))
        assert reply.status_code == 200, reply.text
        status = router.models()[name]["status"]
        measured = peak_rss(router.child_pid(name))
        estimated = status["memory_estimate_bytes"]
        error = (estimated - measured) / measured
        rows.append(f"{name:16} estimate {estimated / MiB:7.1f} MiB  measured {measured / MiB:7.1f} MiB  {error:+.1%}")
        if abs(error) > 0.10:
            misses.append(name)
        # What the router reads of its child agrees with the kernel, and it is shown.
        assert status["memory_peak_bytes"] <= measured and status["memory_bytes"] > 0
        assert status["memory_estimate"]["conservative"] is None
    print("\n".join(rows))
    assert not misses, "estimate off by more than 10 %:\n" + "\n".join(rows)


def info(arch: str, **hparams) -> GGUFInfo:
    base = {"block_count": 4, "embedding_length": 256, "attention.head_count": 8, "attention.head_count_kv": 2,
            "context_length": 4096, "feed_forward_length": 512}
    return GGUFInfo(arch, None, 4096, 10_000_000, None, 20_000_000, 1, {**base, **hparams}, 32000, 20_000_000)


def test_kv_cache_follows_llama_cpp_rules():
    plain = info("llama")
    # 4 layers x 4096 cells x 2 kv heads x 32 dims x (K + V) x 2 bytes (f16)
    assert estimate(plain, {}).kv_cache == 4 * 4096 * 2 * 32 * 2 * 2
    assert estimate(plain, {"c": "1000"}).n_ctx == 1024  # padded to 256
    assert estimate(plain, {"ctk": "q8_0", "ctv": "q8_0"}).kv_cache == 4 * 4096 * 2 * 32 * 2 * 34 // 32
    # Two slots without a unified cache: each gets half, padded to 256, so 1000 -> 2 x 512.
    assert estimate(plain, {"c": "1000", "np": "2"}).n_ctx == 1024
    assert estimate(plain, {"c": "1300", "np": "2"}).n_ctx == 2 * 768
    # Sliding window (gemma3: 5 of each 6 layers): n_swa x 4 slots + ubatch cells, padded.
    gemma = info("gemma3", **{"block_count": 6, "attention.sliding_window": 512, "attention.key_length": 256,
                              "attention.value_length": 256, "attention.head_count_kv": 1})
    per_cell = 256 * 2 * 2
    assert estimate(gemma, {"c": "32768"}).kv_cache == (32768 + 5 * 2560) * per_cell
    assert estimate(gemma, {"c": "32768", "swa-full": "true"}).kv_cache == 6 * 32768 * per_cell
    # A GGUF's own pattern wins over the architecture's.
    pattern = info("gemma3", **{"block_count": 2, "attention.sliding_window": 512, "attention.key_length": 256,
                                "attention.value_length": 256, "attention.head_count_kv": 1,
                                "attention.sliding_window_pattern": [True, False]})
    assert estimate(pattern, {"c": "32768"}).kv_cache == (32768 + 2560) * per_cell


def test_unknown_layouts_get_a_conservative_estimate_never_zero():
    for odd in (info("some-new-arch"), info("mamba2", **{"ssm.state_size": 128}),
                info("deepseek2", **{"attention.kv_lora_rank": 512})):
        e = estimate(odd, {})
        assert e.conservative and e.host > e.weights + e.kv_cache > 0
    assert estimate(info("llama"), {}).conservative is None
    hostile = estimate(info("llama", block_count=10**12), {"np": "0", "c": "-5"})  # quickly, and not zero
    assert hostile.conservative.startswith("implausible block count") and hostile.host > 0


def test_gpu_layers_count_apart_from_host_only_where_there_is_a_gpu():
    plain = info("llama")
    on_cpu = estimate(plain, {"ngl": "99"})
    on_gpu = estimate(plain, {"ngl": "99"}, has_device=True)
    assert on_cpu.device == 0 and on_gpu.device > on_gpu.kv_cache
    assert on_gpu.host == on_cpu.host - on_gpu.device


def test_limits_and_floors(tmp_path):
    e = estimate(info("llama"), {"cram": "100"})
    memory_max, memory_high = memory_limits(e)
    assert e.host + e.growth < memory_high < memory_max
    floors = Floors(tmp_path / "floors.json")
    floor = floor_after(1000 * MiB, 0)
    floors.record("m", ("llama-server", "-c", "4096"), floor)
    assert floor == 1200 * MiB == floor_after(1000 * MiB, floor) and memory_limits(e, floor)[0] > floor
    again = Floors(tmp_path / "floors.json")  # a restarted router remembers
    assert again.get("m", ("llama-server", "-c", "4096")) == floor
    assert again.get("m", ("llama-server", "-c", "8192")) == 0  # other options: no longer meaningful


def test_header_keeps_what_the_estimate_needs(real_models):
    smol, gemma = read_info(real_models / SMOL), read_info(real_models / GEMMA)
    assert (smol.n_vocab, smol.hparams["attention.head_count_kv"], smol.hparams["block_count"]) == (49152, 3, 30)
    assert (gemma.n_vocab, gemma.hparams["attention.sliding_window"], gemma.hparams["attention.key_length"]) == (262144, 512, 256)
    assert 0.95 * smol.size < smol.tensor_bytes < smol.size
