"""Reads what the router needs from a GGUF header, and checks the file is whole.

gguf.GGUFReader maps the file and builds an array for every metadata element (a vocabulary of
150,000 tokens costs seconds); the router needs a handful of scalar keys and the tensor table, so
this walks the header with the gguf package's own type constants and skips everything else.
"""

from __future__ import annotations

import importlib.util
import struct
from dataclasses import dataclass, field
from pathlib import Path


def _gguf_constants():
    """The gguf package's constants module (the format's type tables) alone: the package itself
    imports numpy for a reader and writer the router never uses, a fifth of a second at start-up."""
    package = importlib.util.find_spec("gguf")
    spec = importlib.util.spec_from_file_location("gguf_router._gguf_constants",
                                                  Path(package.submodule_search_locations[0]) / "constants.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_constants = _gguf_constants()
GGML_QUANT_SIZES = _constants.GGML_QUANT_SIZES
GGUF_MAGIC = _constants.GGUF_MAGIC
GGMLQuantizationType = _constants.GGMLQuantizationType
GGUFValueType = _constants.GGUFValueType
LlamaFileType = _constants.LlamaFileType

_SCALAR = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
# Counts beyond these are not a real model but a corrupt or hostile header.
_MAX_ITEMS = 1 << 24
_MAX_STRING = 1 << 26
_MAX_KEPT_ARRAY = 1024  # per-layer arrays are kept; vocabularies and merges are only counted
# Types ggml's CPU backend repacks on x86-64 with AVX2 (ggml-cpu/repack.cpp), rows a multiple of 8.
_REPACKED = frozenset({GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_K, GGMLQuantizationType.IQ4_NL,
                       GGMLQuantizationType.MXFP4})


class InvalidGGUF(ValueError):
    pass


@dataclass(frozen=True)
class GGUFInfo:
    architecture: str
    name: str | None
    context_length: int | None
    n_params: int
    file_type: str | None
    size: int
    split_count: int
    # What the memory estimate needs: the architecture's own keys without the "ARCH." prefix
    # (scalars, and numeric arrays up to a layer count long, such as per-layer head counts),
    # the vocabulary size, and the bytes of tensor data in this file.
    hparams: dict = field(default_factory=dict, compare=False)
    n_vocab: int = 0
    tensor_bytes: int = 0
    repackable_bytes: int = 0  # layer weights the CPU backend copies into an interleaved layout (AVX2)

    def as_json(self) -> dict:
        return {
            "architecture": self.architecture,
            "name": self.name,
            "context_length": self.context_length,
            "n_params": self.n_params,
            "file_type": self.file_type,
            "size": self.size,
        }


class _Header:
    def __init__(self, f, size: int):
        self.f = f
        self.size = size

    def read(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise InvalidGGUF(f"truncated header at byte {self.f.tell()}")
        return data

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def count(self, what: str) -> int:
        n = self.unpack("<Q")
        if n > _MAX_ITEMS:
            raise InvalidGGUF(f"implausible {what} count {n}")
        return n

    def string(self) -> str:
        n = self.unpack("<Q")
        if n > _MAX_STRING:
            raise InvalidGGUF(f"implausible string length {n}")
        return self.read(n).decode("utf-8", errors="replace")

    def value(self, vtype: int, keep_arrays: bool = True):
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            return self.array() if keep_arrays else self.skip_array()
        try:
            return self.unpack(_SCALAR[GGUFValueType(vtype)])
        except (ValueError, KeyError):
            raise InvalidGGUF(f"unknown metadata value type {vtype}") from None

    def array(self) -> "list | int":
        """A short numeric array's values; for any other array, its length."""
        etype = self.unpack("<I")
        n = self.count("array element")
        if n <= _MAX_KEPT_ARRAY and etype not in (GGUFValueType.STRING, GGUFValueType.ARRAY):
            try:
                fmt = _SCALAR[GGUFValueType(etype)]
            except (ValueError, KeyError):
                raise InvalidGGUF(f"unknown array element type {etype}") from None
            return list(struct.unpack(f"<{n}{fmt[1]}", self.read(n * struct.calcsize(fmt))))
        self.skip_items(etype, n)
        return n

    def skip_array(self) -> int:
        """Skips an array; returns its length."""
        etype = self.unpack("<I")
        n = self.count("array element")
        self.skip_items(etype, n)
        return n

    def skip_items(self, etype: int, n: int) -> None:
        if etype == GGUFValueType.STRING:
            for _ in range(n):
                self.f.seek(self.unpack("<Q"), 1)
        elif etype == GGUFValueType.ARRAY:
            for _ in range(n):
                self.skip_array()
        else:
            try:
                self.f.seek(n * struct.calcsize(_SCALAR[GGUFValueType(etype)]), 1)
            except (ValueError, KeyError):
                raise InvalidGGUF(f"unknown array element type {etype}") from None
        if self.f.tell() > self.size:
            raise InvalidGGUF("truncated header inside an array")


def read_info(path: Path) -> GGUFInfo:
    """Raises InvalidGGUF (or OSError) for anything llama-server could not load."""
    with open(path, "rb", buffering=1 << 16) as f:
        size = f.seek(0, 2)
        f.seek(0)
        h = _Header(f, size)
        if size < 24 or h.unpack("<I") != GGUF_MAGIC:
            raise InvalidGGUF("not a GGUF file (bad magic)")
        version = h.unpack("<I")
        if version not in (2, 3):
            raise InvalidGGUF(f"unsupported GGUF version {version}")
        n_tensors = h.count("tensor")
        n_kv = h.count("metadata key")
        kv: dict[str, object] = {}
        for _ in range(n_kv):
            key = h.string()
            # The tokenizer's arrays (scores, types, merges) are only counted: per-layer arrays
            # are the architecture's, and reading the others would slow a scan of many files.
            kv[key] = h.value(h.unpack("<I"), keep_arrays=not key.startswith("tokenizer."))
        n_params = 0
        data_end = 0
        tensor_bytes = repackable_bytes = 0
        for _ in range(n_tensors):
            name = h.string()
            dims = [h.unpack("<Q") for _ in range(min(h.unpack("<I"), 8))]
            ttype, offset = h.unpack("<I"), h.unpack("<Q")
            elements = 1
            for d in dims:
                elements *= d
            try:
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
            except (ValueError, KeyError):
                raise InvalidGGUF(f"unknown tensor type {ttype}") from None
            n_params += elements
            tensor_bytes += elements // block * type_size
            if ttype in _REPACKED and name.startswith("blk.") and len(dims) > 1 and dims[1] % 8 == 0:
                repackable_bytes += elements // block * type_size
            data_end = max(data_end, offset + elements // block * type_size)
        alignment = kv.get("general.alignment") or 32
        data_start = -(-f.tell() // alignment) * alignment
    if n_tensors and data_start + data_end > size:
        raise InvalidGGUF(f"truncated: tensor data needs {data_start + data_end} bytes, file has {size}")
    arch = kv.get("general.architecture")
    if not isinstance(arch, str):
        raise InvalidGGUF("no general.architecture in the header")
    file_type = kv.get("general.file_type")
    try:
        file_type = LlamaFileType(file_type).name if file_type is not None else None
    except ValueError:
        file_type = str(file_type)
    ctx = kv.get(f"{arch}.context_length")
    prefix = arch + "."
    hparams = {k[len(prefix):]: v for k, v in kv.items() if k.startswith(prefix) and not isinstance(v, str)}
    tokens = kv.get("tokenizer.ggml.tokens")
    n_vocab = tokens if isinstance(tokens, int) else len(tokens) if isinstance(tokens, list) else 0
    return GGUFInfo(
        architecture=arch,
        name=kv.get("general.name") if isinstance(kv.get("general.name"), str) else None,
        context_length=int(ctx) if isinstance(ctx, int) else None,
        n_params=n_params,
        file_type=file_type,
        size=size,
        split_count=int(kv.get("split.count") or 1),
        hparams=hparams,
        n_vocab=n_vocab or int(hparams.get("vocab_size") or 0),
        tensor_bytes=tensor_bytes,
        repackable_bytes=repackable_bytes,
    )
