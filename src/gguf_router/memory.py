"""What a model costs in memory: estimated from its GGUF header and the options its child runs with.

llama-server's memory is, in order of size: the weights (mapped from the file, or read into
memory with --no-mmap), the KV cache (allocated and zeroed at start, so resident at once:
cells x layers x (K + V) per cell), the compute buffer (reserved for the largest batch, but
only touched as far as the batches really served reach), the output buffer, and the process
itself (code, threads, the tokenizer's tables). The sizes follow llama.cpp's own rules at build
b11434: llama_context (n_ctx padded to 256, per-sequence split unless the KV cache is unified,
batch limits), llama_kv_cache and llama_kv_cache_iswa (a sliding-window layer keeps
n_swa x sequences + n_ubatch cells, padded to 256), and the server's defaults (4 slots sharing
one unified cache when --parallel is not given).

The estimate is what a loaded child holds after its first requests; `growth` is what it may
add when serving long prompts (the rest of the compute buffer) and through llama-server's
prompt cache (bounded by --cache-ram). The unit's MemoryMax covers both.

An architecture whose cache layout is not one of the plain attention ones known here (recurrent,
hybrid, latent-attention, or new) gets a conservative estimate, flagged as such: full-context
KV for every layer and a quarter more on top.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from .ggufinfo import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFInfo
from .sizes import size_text


MiB = 1 << 20
GiB = 1 << 30

# Architectures whose KV cache is plain attention (full, or sliding-window per layer): the
# layout this module computes exactly. Others are estimated conservatively.
PLAIN_ATTENTION = frozenset("""
    llama llama4 deci falcon gpt2 gptj gptneox mpt baichuan starcoder refact bloom stablelm qwen
    qwen2 qwen2moe qwen2vl qwen3 qwen3moe qwen3vl qwen3vlmoe phi2 phi3 phimoe plamo plamo3
    codeshell orion internlm2 minicpm gemma gemma2 gemma3 starcoder2 xverse command-r cohere2
    cohere2moe dbrx olmo olmo2 olmoe arctic chatglm glm4 glm4moe bitnet jais nemotron exaone
    exaone4 exaone-moe granite granitemoe granite_swa chameleon plm bailingmoe bailingmoe2 dots1
    arcee afmoe ernie4_5 ernie4_5-moe hunyuan-moe hunyuan-dense smollm3 gpt-oss seed_oss grovemoe
    apertus smallthinker mistral3 mellum
""".split())
# Which layers use the sliding window when the GGUF does not say: (n_pattern, dense_first), as
# each architecture's load_swa_pattern call sets it in llama.cpp.
SWA_PATTERNS = {
    "gemma2": (2, False), "gemma3": (6, False), "cohere2": (4, False), "cohere2moe": (4, True),
    "exaone4": (4, False), "exaone-moe": (4, False), "olmo2": (4, False), "plamo3": (8, False),
    "llama4": (4, False), "gpt-oss": (2, False), "afmoe": (4, False), "smallthinker": (4, True),
    "mellum": (4, False),
}
KV_PAD = 256
MAX_LAYERS = 4096  # real models have a few hundred at most
# The process beyond its buffers, fitted to llama-server b11434 on x86-64 (tests/test_memory.py
# holds the whole estimate to 10 % of real children): code, libraries and threads; the
# tokenizer's tables per vocabulary entry; the graph's objects per layer; the slots' token
# state per context cell.
PROCESS_BASE = 16.5 * MiB
PER_VOCAB_TOKEN = 176
PER_LAYER = 0.35 * MiB
PER_CONTEXT_CELL = 40


def _cpu_repacks() -> bool:
    """Whether ggml's CPU backend keeps an interleaved copy of Q4 layer weights (x86-64 with AVX2)."""
    try:
        return " avx2" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


CPU_REPACKS = _cpu_repacks()


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    kv_cache: int
    compute: int  # the compute buffer as llama.cpp reserves it (largest batch)
    output: int
    process: int
    extra: int  # mmproj, draft model, LoRA adapters
    device: int  # what --n-gpu-layers would place on a GPU (not part of `host`)
    prompt_cache: int  # what llama-server's prompt cache may grow to (--cache-ram)
    n_ctx: int
    conservative: str | None = None  # why the layout was not known, when it was not
    device_weights: int = 0  # of `device`, the weights not on the host (the rest: the offloaded layers' KV cache)

    @property
    def host(self) -> int:
        """Host memory after load and the first requests: what the router counts for the model."""
        total = self.weights + self.kv_cache + self.output + self.process + self.extra - self.device
        return int(total * 1.25) if self.conservative else total

    @property
    def growth(self) -> int:
        """What serving may add: long prompts fill the compute buffer; the prompt cache fills up."""
        return self.compute + self.prompt_cache

    def as_json(self) -> dict:
        parts = {"weights": self.weights, "kv_cache": self.kv_cache, "compute": self.compute,
                 "output": self.output, "process": self.process, "extra": self.extra,
                 "device": self.device, "prompt_cache_max": self.prompt_cache}
        return {"host_bytes": self.host, "growth_bytes": self.growth, "n_ctx": self.n_ctx,
                "parts": parts, "conservative": self.conservative}


def memory_limits(estimate: MemoryEstimate, floor: int = 0) -> tuple[int, int]:
    """(MemoryMax, MemoryHigh) for a model's unit. MemoryMax is a kill line, so it sits above
    everything the model may legitimately hold: the estimate (or the peak an earlier run
    reached, if higher), what serving may add, 10 % for the estimate's error (the tests hold it
    to 10 %) and 64 MiB for the C library's arenas and the kernel's own accounting. MemoryHigh,
    where the kernel starts reclaiming, sits at 90 % of it: above the estimate, so a healthy
    child is never slowed."""
    base = max(estimate.host, floor)
    memory_max = int(base * 1.1 + estimate.growth + 64 * MiB)
    return memory_max, int(memory_max * 0.9)


def memory_line(estimate: MemoryEstimate) -> str:
    """One line for check-config and the log: the estimate, its parts and the unit limit from it."""
    e = estimate
    parts = [f"weights {size_text(e.weights)}", f"KV cache {size_text(e.kv_cache)} for {e.n_ctx} tokens",
             f"compute {size_text(e.compute)}", f"process {size_text(e.process + e.output)}"]
    if e.extra:
        parts.append(f"mmproj/draft/LoRA {size_text(e.extra)}")
    if e.device:
        parts.append(f"{size_text(e.device)} on the GPU, not counted")
    memory_max, _ = memory_limits(e)
    line = (f"memory: {size_text(e.host)} ({', '.join(parts)}); may grow by {size_text(e.growth)}; "
            f"unit MemoryMax {size_text(memory_max)}")
    return line + (f"; conservative: {e.conservative}" if e.conservative else "")


def _type_bytes(name: str | None, elements: int) -> int:
    try:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType[(name or "f16").upper()]]
    except KeyError:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType.F16]
    return -(-elements // block) * size


def _per_layer(value, n_layer: int, default: int) -> list[int]:
    if isinstance(value, list) and value:
        return [int(v) for v in value[:n_layer]] + [int(value[-1])] * max(0, n_layer - len(value))
    return [int(value if isinstance(value, (int, float)) and value else default)] * n_layer


def _swa_layers(info: GGUFInfo, n_layer: int) -> list[bool]:
    pattern = info.hparams.get("attention.sliding_window_pattern")
    if isinstance(pattern, list):
        return [bool(v) for v in pattern[:n_layer]] + [False] * max(0, n_layer - len(pattern))
    n, dense_first = SWA_PATTERNS.get(info.architecture, (0, False))
    if isinstance(pattern, int):
        n = pattern
    if dense_first:
        return [n == 0 or il % n != 0 for il in range(n_layer)]
    return [n == 0 or il % n < n - 1 for il in range(n_layer)]


def _flag(options: dict[str, str], *names: str) -> bool | None:
    for name in names:
        if name in options:
            return options[name] not in ("false", "off", "0")
    return None


def _number(options: dict[str, str], default: float, *names: str) -> float:
    for name in names:
        if name in options:
            try:
                return float(options[name])
            except ValueError:
                pass
    return default


def _file_size(path: str) -> int:
    try:
        return Path(path).stat().st_size
    except OSError:
        return 0


def shard_bytes(path: Path, split_count: int) -> int:
    """Tensor files of a split model beyond its first shard (`-00001-of-00003.gguf`)."""
    match = re.search(r"-(\d{5})-of-(\d{5})\.gguf$", path.name)
    if split_count <= 1 or not match:
        return 0
    stem = path.name[:match.start()]
    return sum(_file_size(str(path.with_name(f"{stem}-{i:05d}-of-{split_count:05d}.gguf")))
               for i in range(2, split_count + 1))


def slots(options: dict[str, str]) -> tuple[int, bool]:
    """llama-server's parallel slots, and whether they share one unified KV cache."""
    n_parallel = int(_number(options, -1, "np", "parallel"))
    unified = _flag(options, "kvu", "kv-unified")
    if n_parallel < 0:  # the server's auto: 4 slots sharing one cache
        n_parallel, unified = 4, True if unified is None else unified
    return max(n_parallel, 1), bool(unified)


def estimate(info: GGUFInfo, options: dict[str, str], weights: int | None = None,
             has_device: bool = False) -> MemoryEstimate:
    """`options`: the child's llama-server options, by every name each is known by (`c`,
    `ctx-size` ...), as the preset merge produced them; `weights`: tensor bytes of all shards."""
    hp = info.hparams
    n_layer = int(hp.get("block_count") or 1)
    if not 0 < n_layer <= MAX_LAYERS:  # a corrupt or hostile header: estimate, but do not trust it
        n_layer = MAX_LAYERS
    n_embd = int(hp.get("embedding_length") or 0)
    heads = _per_layer(hp.get("attention.head_count"), n_layer, 1)
    heads_kv = _per_layer(hp.get("attention.head_count_kv"), n_layer, heads[0])
    head_k = int(hp.get("attention.key_length") or (n_embd // max(heads[0], 1)))
    head_v = int(hp.get("attention.value_length") or (n_embd // max(heads[0], 1)))
    n_vocab = info.n_vocab or int(hp.get("vocab_size") or 32000)
    weights = info.tensor_bytes if weights is None else weights

    conservative = None
    if n_layer == MAX_LAYERS:
        conservative = f"implausible block count {hp.get('block_count')!r}"
    elif info.architecture not in PLAIN_ATTENTION:
        conservative = f"the cache layout of architecture {info.architecture!r} is not known to the estimator"
    elif any(key.startswith(("ssm.", "wkv.", "shortconv.")) or key == "attention.kv_lora_rank" for key in hp):
        conservative = "recurrent or latent-attention layers"

    # llama_context: the context, padded; split per sequence unless unified; batch limits.
    n_ctx = int(_number(options, 0, "c", "ctx-size"))
    if n_ctx <= 0:  # 0: the context the model was trained with
        n_ctx = int(info.context_length or 4096)
    n_parallel, unified = slots(options)
    n_ctx = -(-n_ctx // KV_PAD) * KV_PAD
    n_ctx_seq = n_ctx if unified else -(-(n_ctx // n_parallel) // KV_PAD) * KV_PAD
    n_ctx = n_ctx if unified else n_ctx_seq * n_parallel
    n_batch = min(n_ctx, int(_number(options, 2048, "b", "batch-size")))
    n_ubatch = min(n_batch, int(_number(options, 512, "ub", "ubatch-size")))
    streams = 1 if unified else n_parallel
    type_k, type_v = options.get("ctk") or options.get("cache-type-k"), options.get("ctv") or options.get("cache-type-v")

    # llama_kv_cache(_iswa): cells per layer, times K and V rows of each layer's kv heads.
    n_swa = int(hp.get("attention.sliding_window") or 0)
    swa = _swa_layers(info, n_layer) if n_swa > 0 and not conservative else [False] * n_layer
    if _flag(options, "swa-full"):
        swa = [False] * n_layer
    swa_cells = -(-min(n_ctx_seq, n_swa * (n_parallel if unified else 1) + n_ubatch) // KV_PAD) * KV_PAD
    kv_layers = []
    for il in range(n_layer):
        cells = (swa_cells if swa[il] else n_ctx_seq) * streams
        kv_layers.append(_type_bytes(type_k, cells * head_k * heads_kv[il])
                         + _type_bytes(type_v, cells * head_v * heads_kv[il]))
    kv_cache = sum(kv_layers)

    # The compute buffer (ggml's graph allocator, worst case of one ubatch of n_ubatch tokens):
    # the widest layer's activations, the attention mask over every cell a token may see (f16
    # with flash attention, which llama.cpp turns on by itself on the CPU), without flash
    # attention the scores of every head over them too, and the last tokens' logits.
    # Allocated at start but only touched as far as the batches served reach: growth.
    flash = (options.get("fa") or options.get("flash-attn") or "auto") in ("on", "auto", "true", "1")
    n_ff = max(_per_layer(hp.get("feed_forward_length"), n_layer, 4 * n_embd))
    activations = n_ubatch * 4 * max(12 * n_embd, 3 * n_ff + 2 * n_embd)
    cells_seen = n_ctx_seq + (swa_cells if any(swa) else 0)
    if flash:
        attention = cells_seen * n_ubatch * 2
    else:
        attention = cells_seen * n_ubatch * 4 + n_ctx_seq * n_ubatch * max(heads) * 4
    output = n_vocab * 4 * n_parallel  # logits of the last token of each sequence (output_reserve)
    compute = activations + attention + output
    process = int(PROCESS_BASE + PER_VOCAB_TOKEN * n_vocab + PER_LAYER * n_layer + PER_CONTEXT_CELL * n_ctx)
    if CPU_REPACKS:
        weights += info.repackable_bytes

    extra = 0
    for name in ("mmproj", "md", "model-draft", "lora"):
        if name in options:
            extra += sum(_file_size(p) for p in options[name].split(","))

    # --n-gpu-layers on a build with a GPU: that share of the layers' weights and cache goes there.
    device = device_weights = 0
    layers = next((options[n] for n in ("ngl", "gpu-layers", "n-gpu-layers") if n in options), "0")
    n_gpu = -1 if layers in ("all", "auto") else _number({"ngl": layers}, 0, "ngl")
    if has_device and n_gpu:
        on_device = min(n_layer, int(n_gpu) if n_gpu >= 0 else n_layer)
        # The output layer goes with the last repeating one: all of them offloaded, it is too.
        per_layer_weights = weights / (n_layer + 1)
        device = device_weights = int(per_layer_weights * (on_device + (on_device == n_layer)))
        if _flag(options, "kvo", "kv-offload") is not False:
            device += sum(kv_layers[n_layer - on_device:])

    prompt_cache = int(_number(options, 8192, "cram", "cache-ram"))
    prompt_cache = (math.inf if prompt_cache < 0 else prompt_cache * MiB)
    if conservative:
        kv_cache = max(kv_cache, sum(_type_bytes(type_k, n_ctx * head_k * h) + _type_bytes(type_v, n_ctx * head_v * h)
                                     for h in heads))
    return MemoryEstimate(weights, kv_cache, compute, output, process, extra, device,
                          int(min(prompt_cache, 64 * GiB)), n_ctx, conservative, device_weights)


FLOOR_MARGIN = 1.2  # a model killed for memory is taken to need its peak plus a fifth from then on


def floor_after(peak: int, known: int) -> int:
    """What a model killed for memory at `peak` is taken to need at least, beside what was known."""
    return max(int(peak * FLOOR_MARGIN), known)
