"""Writes tiny random-weight llama GGUF models (about 0.5 MB) that a real llama-server loads in
tens of milliseconds: the demo folder of the README's first command, and the tests' fixtures.

Random weights produce random text; the vocabulary keeps it plain ASCII by marking every
non-printable byte token unused, so streamed output is always valid UTF-8.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

DEMO_MODELS = ("tiny-a", "tiny-b", "tiny-c")


def _vocab():
    T = gguf.TokenType
    tokens = ["<unk>", "<s>", "</s>"]
    types = [T.UNKNOWN, T.CONTROL, T.CONTROL]
    for b in range(256):
        tokens.append(f"<0x{b:02X}>")
        types.append(T.BYTE if 0x20 <= b < 0x7F or b in (0x09, 0x0A) else T.UNUSED)
    tokens.append("\u2581")  # SentencePiece's word boundary
    types.append(T.NORMAL)
    printable = [chr(c) for c in range(0x21, 0x7F)]
    tokens += printable
    types += [T.NORMAL] * len(printable)
    scores = [0.0] * 259 + [-1.0] + [-2.0 - i / 1000 for i in range(len(printable))]
    return tokens, scores, types


def write_tiny_model(path: Path, seed: int = 0, context_length: int = 2048,
                     dim: int = 64, layers: int = 2, heads: int = 4, ff: int = 128) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tokens, scores, types = _vocab()
    head_dim = dim // heads

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(path.stem)
    w.add_context_length(context_length)
    w.add_embedding_length(dim)
    w.add_block_count(layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(len(tokens))
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(True)

    def matrix(rows: int, cols: int, scale: float = 0.2):
        return (rng.standard_normal((rows, cols)) * scale).astype(np.float32)

    def ones(n: int):
        return np.ones(n, dtype=np.float32)

    w.add_tensor("token_embd.weight", matrix(len(tokens), dim, 1.0))
    for i in range(layers):
        for name, tensor in (
            ("attn_norm", ones(dim)), ("attn_q", matrix(dim, dim)), ("attn_k", matrix(dim, dim)),
            ("attn_v", matrix(dim, dim)), ("attn_output", matrix(dim, dim)), ("ffn_norm", ones(dim)),
            ("ffn_gate", matrix(ff, dim)), ("ffn_up", matrix(ff, dim)), ("ffn_down", matrix(dim, ff)),
        ):
            w.add_tensor(f"blk.{i}.{name}.weight", tensor)
    w.add_tensor("output_norm.weight", ones(dim))
    w.add_tensor("output.weight", matrix(len(tokens), dim, 1.0))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_demo_folder(folder: Path) -> list[Path]:
    """The README's demo: three distinct tiny models; existing files are kept."""
    written = []
    for seed, name in enumerate(DEMO_MODELS):
        path = Path(folder) / f"{name}.gguf"
        if not path.exists():
            write_tiny_model(path, seed=seed)
        written.append(path)
    return written
