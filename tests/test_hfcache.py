"""The Hugging Face cache, read and pruned with llama.cpp's rules, without processes."""

import os

import pytest

from gguf_router import hfcache
from gguf_router.catalog import build, read_presets
from gguf_router.discovery import Discovery
from gguf_router.ini import ConfigError
from gguf_router.settings import Settings

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cached_repo(root, repo_id: str, *names: str, blobs: bool = False):
    """A repo as `llama-server -hf` leaves it: refs/main, a snapshot of (symlinks to) blobs."""
    repo = hfcache.repo_folder(root, repo_id)
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "blobs").mkdir()
    for name in names:
        if blobs:
            blob = repo / "blobs" / f"blob-{name}"
            blob.write_bytes(b"GGUF")
            (snap / name).symlink_to(os.path.relpath(blob, snap))
        else:
            (snap / name).write_bytes(b"GGUF")
    return repo, snap


def test_a_repo_without_a_quant_resolves_as_llama_cpp_does(tmp_path):
    _, snap = cached_repo(tmp_path, "u/r", "m-F16.gguf", "m-Q8_0.gguf", "m-Q4_K_M-00001-of-00002.gguf",
                          "m-Q4_K_M-00002-of-00002.gguf", "mmproj-m-F16.gguf", "mtp-m-Q4_K_M.gguf")
    mmproj = snap / "mmproj-m-F16.gguf"
    assert hfcache.resolve(tmp_path, "u/r") == (snap / "m-Q4_K_M-00001-of-00002.gguf", mmproj)  # Q4_K_M first
    assert hfcache.resolve(tmp_path, "u/r:q8_0") == (snap / "m-Q8_0.gguf", mmproj)  # tags ignore case
    assert hfcache.resolve(tmp_path, "u/r", "m-F16.gguf") == (snap / "m-F16.gguf", mmproj)
    assert hfcache.resolve(tmp_path, "u/r:IQ2_XS") is None  # a named quant that is not there
    assert hfcache.resolve(tmp_path, "u/r", "nope.gguf") is None
    assert hfcache.resolve(tmp_path, "u/other") is None
    assert hfcache.resolve(tmp_path, "../../etc") is None  # not a repo id
    _, only = cached_repo(tmp_path, "u/one", "weights-F32.gguf")
    assert hfcache.resolve(tmp_path, "u/one") == (only / "weights-F32.gguf", None)  # no tag: the only model


def test_removing_a_quant_keeps_the_others_and_their_blobs(tmp_path):
    repo, snap = cached_repo(tmp_path, "u/r", "m-Q8_0.gguf", "m-F16.gguf", blobs=True)
    assert hfcache.remove(tmp_path, "u/r:Q8_0")
    assert sorted(p.name for p in snap.iterdir()) == ["m-F16.gguf"]
    assert sorted(p.name for p in (repo / "blobs").iterdir()) == ["blob-m-F16.gguf"]
    assert [model_id for model_id, _, _ in hfcache.cached_models(tmp_path)] == ["u/r:F16"]
    assert not hfcache.remove(tmp_path, "u/r:Q8_0")  # nothing left to remove
    assert hfcache.remove(tmp_path, "u/r") and not repo.exists()  # no tag: the whole repo


def test_removing_a_model_never_deletes_what_a_link_out_of_the_cache_points_at(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "m-Q8_0.gguf").write_bytes(b"GGUF")  # a model file kept elsewhere, linked into the cache
    (shared / "other").mkdir()
    (shared / "other" / "m-F16.gguf").write_bytes(b"GGUF")
    cache = tmp_path / "hub"
    repo, snap = cached_repo(cache, "u/r", "m-Q4_0.gguf", blobs=True)
    (snap / "m-Q8_0.gguf").symlink_to(shared / "m-Q8_0.gguf")
    assert hfcache.remove(cache, "u/r:Q8_0")
    assert not (snap / "m-Q8_0.gguf").exists() and (shared / "m-Q8_0.gguf").read_bytes() == b"GGUF"
    # a repo folder that is itself a link: the link goes, never the folder it points at
    (cache / "models--u--linked").symlink_to(shared)
    assert hfcache.remove(cache, "u/linked") and (shared / "other" / "m-F16.gguf").exists()
    # a snapshot folder linked out of the cache: its files are not the cache's to delete
    linked, _ = cached_repo(cache, "u/snap")
    (linked / "snapshots" / COMMIT).rmdir()
    (linked / "snapshots" / COMMIT).symlink_to(shared / "other")
    assert [m for m, _, _ in hfcache.cached_models(cache) if m.startswith("u/snap")] == ["u/snap:F16"]
    assert not hfcache.remove(cache, "u/snap:F16") and (shared / "other" / "m-F16.gguf").exists()
    # a snapshots folder linked out of the cache: not even the links in it are the cache's
    outside = tmp_path / "outside-snapshots"
    (outside / COMMIT).mkdir(parents=True)
    (outside / COMMIT / "m-Q8_0.gguf").symlink_to(shared / "m-Q8_0.gguf")
    moved = hfcache.repo_folder(cache, "u/moved")
    (moved / "refs").mkdir(parents=True)
    (moved / "refs" / "main").write_text(COMMIT)
    (moved / "snapshots").symlink_to(outside)
    assert not hfcache.remove(cache, "u/moved:Q8_0") and (outside / COMMIT / "m-Q8_0.gguf").is_symlink()
    # the whole repo: rmtree removes the links inside and leaves their targets
    (snap / "m-Q8_0.gguf").symlink_to(shared / "m-Q8_0.gguf")
    assert hfcache.remove(cache, "u/r") and not repo.exists() and (shared / "m-Q8_0.gguf").exists()


def catalog(tmp_path, llama_server, preset_text: str, **settings):
    cache = tmp_path / "hub"
    cached_repo(cache, "u/main", "main-Q4_K_M.gguf")
    cached_repo(cache, "u/draft", "draft-Q8_0.gguf")
    presets_file = tmp_path / "presets.ini"
    presets_file.write_text(preset_text)
    settings = Settings(llama_server=llama_server, hf_cache=cache, models_preset=presets_file, memory_budget="off",
                        **settings)
    presets, cli = read_presets(settings)
    return build(settings, Discovery(None, cache), presets, cli, tmp_path), cache


def test_a_preset_names_cache_files_and_dedup_hides_their_entries(tmp_path, llama_server):
    text = "[mine]\nhf-repo = u/main\nhfd = u/draft\ndedup-cache-models = on\n"
    found, cache = catalog(tmp_path, llama_server, text)
    mine = found.models["mine"]
    snap = hfcache.repo_folder(cache, "u/main") / "snapshots" / COMMIT
    assert mine.argv[-2:] == ("--model", str(snap / "main-Q4_K_M.gguf"))
    draft = hfcache.repo_folder(cache, "u/draft") / "snapshots" / COMMIT / "draft-Q8_0.gguf"
    assert str(draft) in mine.argv and "--hf-repo" not in mine.argv
    assert found.models["u/main:Q4_K_M"].hidden and found.models["u/draft:Q8_0"].hidden
    shown, _ = catalog(tmp_path / "2", llama_server, "[mine]\nhf-repo = u/main\n")
    assert not shown.models["u/main:Q4_K_M"].hidden  # only with dedup-cache-models


def test_a_preset_repo_not_cached_waits_for_its_first_load_or_offline_is_an_error_saying_what_to_do(
        tmp_path, llama_server):
    found, _ = catalog(tmp_path / "1", llama_server, "[x]\nhf-repo = u/absent\n")
    assert "x" not in found.models and found.unfetched == {"x": "u/absent"}  # downloaded on first load
    with pytest.raises(ConfigError, match=r"presets.ini:2: hf-repo = u/absent is not in the Hugging Face cache .*"
                                          r"fetch it into that cache first: gguf-router pull u/absent"):
        catalog(tmp_path, llama_server, "[x]\nhf-repo = u/absent\n", offline=True)
    with pytest.raises(ConfigError, match=r"belongs in a model's own section"):
        catalog(tmp_path / "2", llama_server, "[*]\nhf-repo = u/main\n")


def test_a_models_mmproj_is_the_one_llama_cpp_picks():
    paths = ["mmproj-F16.gguf", "mmproj-Q8_0.gguf", "model-Q4_K_M.gguf", "model-F16.gguf",
             "vision/mmproj-Q4_0.gguf", "big/model-Q8_0.gguf", "big/mmproj-F32.gguf"]
    assert hfcache.choose(paths, "Q4_K_M") == ("model-Q4_K_M.gguf", "mmproj-Q8_0.gguf")  # closest in bits
    assert hfcache.choose(paths, "F16") == ("model-F16.gguf", "mmproj-F16.gguf")
    # one in the model's own folder before one above it; one in another folder never
    assert hfcache.choose(paths, "Q8_0") == ("big/model-Q8_0.gguf", "big/mmproj-F32.gguf")
    assert hfcache.best_mmproj(["vision/mmproj-Q4_0.gguf"], "model-Q4_K_M.gguf") is None
