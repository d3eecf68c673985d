from gguf_router.ggufinfo import InvalidGGUF, read_info
from gguf_router.tinymodels import write_tiny_model

import pytest


def test_reads_what_llama_server_reports(tmp_path):
    info = read_info(write_tiny_model(tmp_path / "m.gguf", context_length=4096))
    # llama-server's own /models meta for this model says n_params 127552, n_ctx_train 4096.
    assert (info.architecture, info.context_length, info.n_params, info.file_type) == ("llama", 4096, 127552, "ALL_F32")
    assert info.size == (tmp_path / "m.gguf").stat().st_size


@pytest.mark.parametrize("damage, reason", [
    (lambda data: b"NOPE" + data[4:], "bad magic"),
    (lambda data: data[: len(data) // 2], "truncated"),
    (lambda data: data[:40], "truncated"),
    (lambda data: b"", "bad magic"),
])
def test_damaged_files_are_refused_with_the_reason(tmp_path, damage, reason):
    good = write_tiny_model(tmp_path / "good.gguf").read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(damage(good))
    with pytest.raises(InvalidGGUF, match=reason):
        read_info(bad)
