import shutil

from gguf_router.discovery import Discovery
from gguf_router.tinymodels import write_tiny_model


def test_models_dir_follows_llama_cpp_rules(tmp_path):
    root = tmp_path / "models"
    root.mkdir()
    tiny = write_tiny_model(tmp_path / "tiny.gguf")
    root_file = root / "plain.gguf"
    shutil.copy(tiny, root_file)
    shutil.copy(tiny, root / "mmproj-plain.gguf")  # a companion, not a model
    vision = root / "vision"
    vision.mkdir()
    shutil.copy(tiny, vision / "vision-Q4_K_M.gguf")
    shutil.copy(tiny, vision / "mmproj-F16.gguf")
    sharded = root / "big"
    sharded.mkdir()
    shutil.copy(tiny, sharded / "big-00001-of-00002.gguf")
    shutil.copy(tiny, sharded / "big-00002-of-00002.gguf")
    (root / "notes.txt").write_text("not a model")

    found = Discovery(root, None).scan()

    assert sorted(found) == ["big", "plain", "vision"]
    assert found["plain"].path == root_file and found["plain"].mmproj is None
    assert found["vision"].path == vision / "vision-Q4_K_M.gguf"
    assert found["vision"].mmproj == vision / "mmproj-F16.gguf"
    assert found["big"].path == sharded / "big-00001-of-00002.gguf"
    assert all(m.source == "models_dir" and m.error is None for m in found.values())


def test_invalid_file_is_listed_with_its_reason(tmp_path, caplog):
    (tmp_path / "broken.gguf").write_bytes(b"this is not gguf at all, not at all")
    discovery = Discovery(tmp_path, None)
    found = discovery.scan()
    assert found["broken"].error == "not a GGUF file (bad magic)"
    discovery.scan()
    assert caplog.text.count("broken.gguf") == 1  # logged once, not on every rescan


def test_hf_cache_models_appear_and_models_dir_wins(tmp_path):
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--someone--Tiny-GGUF"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    tiny = write_tiny_model(tmp_path / "t.gguf")
    shutil.copy(tiny, snap / "tiny-Q8_0.gguf")
    shutil.copy(tiny, snap / "tiny-F16-00001-of-00002.gguf")
    shutil.copy(tiny, snap / "tiny-F16-00002-of-00002.gguf")
    shutil.copy(tiny, snap / "mmproj-tiny-F16.gguf")
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(tiny, models / "local.gguf")

    found = Discovery(models, cache).scan()

    assert sorted(found) == ["local", "someone/Tiny-GGUF:F16", "someone/Tiny-GGUF:Q8_0"]
    q8 = found["someone/Tiny-GGUF:Q8_0"]
    assert q8.source == "cache" and q8.path == snap / "tiny-Q8_0.gguf"
    assert q8.mmproj == snap / "mmproj-tiny-F16.gguf"
    assert found["someone/Tiny-GGUF:F16"].path.name == "tiny-F16-00001-of-00002.gguf"

