"""The Hugging Face hub cache that `llama-server -hf` downloads into, read and pruned with
llama.cpp's rules (common/hf-cache.cpp, common/download.cpp): `models--USER--REPO/`, the
snapshot `refs/main` names, `USER/REPO:QUANT` for each model file, files found by quant tag.
Here: listing, resolving and removing what is there; downloads.py writes into it.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Iterator

DRAFT_PREFIXES = ("mtp-", "dspark-", "dflash-", "eagle3-")
SPLIT = re.compile(r"^(.+)-([0-9]{5})-of-([0-9]{5})$", re.IGNORECASE)
_QUANT = re.compile(r"[-.]([A-Z0-9_]+)$", re.IGNORECASE)
# (fullmatch: a $ would let a trailing newline through)
_COMMIT = re.compile(r"[0-9a-f]{40}")
_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
DEFAULT_TAGS = ("Q4_K_M", "Q8_0")  # what llama.cpp picks when a repo is named without a quant


def is_companion(name: str) -> bool:
    """mmproj, draft and imatrix files ride along with a model; they are never models themselves."""
    return "mmproj" in name or "imatrix" in name or name.startswith(DRAFT_PREFIXES)


def valid_repo(repo_id: str) -> bool:
    return bool(_REPO.fullmatch(repo_id)) and len(repo_id) <= 256


def split_repo_tag(name: str) -> tuple[str, str]:
    """`user/repo:Q8_0` -> (`user/repo`, `Q8_0`); no tag -> (`user/repo`, "")."""
    repo, _, tag = name.partition(":")
    return repo, tag


def repo_folder(root: Path, repo_id: str) -> Path:
    return root / ("models--" + repo_id.replace("/", "--"))


def snapshot(repo: Path) -> Path | None:
    """The snapshot refs/main points at (else any valid ref), as llama.cpp picks it."""
    refs = repo / "refs"
    commits = []
    try:
        for ref in sorted(refs.iterdir(), key=lambda r: r.name != "main"):
            commit = ref.read_text().strip() if ref.is_file() else ""
            if _COMMIT.fullmatch(commit):
                commits.append(commit)
    except OSError:
        return None
    for commit in commits:
        folder = repo / "snapshots" / commit
        if folder.is_dir():
            return folder
    return None


def preset_file(root: Path | None, repo_id: str) -> Path:
    """Where a presets repository's preset.ini is in the cache (it may not be there)."""
    repo = repo_folder(root or Path("/nonexistent"), repo_id)
    snap = snapshot(repo)
    return (snap or repo / "snapshots" / "none") / "preset.ini"


def _files(snap: Path) -> list[Path]:
    return sorted(p for p in snap.rglob("*.gguf") if p.is_file())


def _tag(path: Path) -> tuple[str, bool]:
    """The file's quant tag (upper case, "" if none) and whether it is a first (or only) shard."""
    stem = path.name[: -len(".gguf")]
    split = SPLIT.match(stem)
    if split:
        stem = split.group(1)
    quant = _QUANT.search(stem)
    return (quant.group(1).upper() if quant else ""), (split is None or int(split.group(2)) == 1)


def cached_models(root: Path) -> Iterator[tuple[str, Path, Path | None]]:
    """(`user/repo:QUANT`, first file, mmproj) for every model in the cache."""
    try:
        repos = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError:
        return
    for repo in repos:
        if not repo.name.startswith("models--") or not repo.is_dir():
            continue
        repo_id = repo.name[len("models--"):].replace("--", "/")
        snap = snapshot(Path(repo.path))
        if snap is None:
            continue
        files = _files(snap)
        relative = [f.relative_to(snap).as_posix() for f in files]
        seen = set()
        for p, path in zip(files, relative):
            tag, first = _tag(p)
            if not tag or not first or is_companion(p.name) or tag in seen:
                continue
            seen.add(tag)
            mmproj = best_mmproj(relative, path)
            yield f"{repo_id}:{tag}", p, snap / mmproj if mmproj else None


def resolve(root: Path, name: str, hf_file: str = "") -> tuple[Path, Path | None] | None:
    """The file (and mmproj) `-hf name [--hf-file F]` would load from the cache, or None."""
    repo_id, tag = split_repo_tag(name)
    if not valid_repo(repo_id):
        return None
    snap = snapshot(repo_folder(root, repo_id))
    if snap is None:
        return None
    chosen = choose([p.relative_to(snap).as_posix() for p in _files(snap)], tag, hf_file)
    if chosen is None:
        return None
    model, mmproj = chosen
    return snap / model, snap / mmproj if mmproj else None


def choose(paths: list[str], tag: str, hf_file: str = "") -> tuple[str, str | None] | None:
    """Of a repository's GGUF paths (its snapshot's, or the hub's tree), the model file (and
    mmproj) llama.cpp picks: the named file; else the first model file of the tag (Q4_K_M, then
    Q8_0, then any when the name has no tag); None when there is none."""
    paths = [p for p in paths if p.endswith(".gguf")]
    if hf_file:
        return (hf_file, best_mmproj(paths, hf_file)) if hf_file in paths else None
    models = [p for p in paths if not is_companion(p.rsplit("/", 1)[-1]) and _tag(Path(p))[1]]
    for wanted in [tag] if tag else DEFAULT_TAGS:
        pattern = re.compile(re.escape(wanted) + "[.-]", re.IGNORECASE)
        for p in models:
            if pattern.search(p):
                return p, best_mmproj(paths, p)
    if not tag and models:
        return models[0], best_mmproj(paths, models[0])
    return None


def best_mmproj(paths: list[str], model: str) -> str | None:
    """The mmproj llama.cpp gives a model (find_best_sibling, common/download.cpp): a GGUF whose
    path holds "mmproj", in the model's folder or one above it; the deepest folder first, then
    the quant closest in bits to the model's (Q4_K_M: 4, F16: 16), then the first listed."""
    folders = model.split("/")[:-1]
    bits = _bits(model)
    best, best_rank = None, None
    for path in paths:
        own = path.split("/")[:-1]
        if not path.endswith(".gguf") or "mmproj" not in path or own != folders[:len(own)]:
            continue
        rank = (-len(own), abs(_bits(path) - bits))
        if best_rank is None or rank < best_rank:
            best, best_rank = path, rank
    return best


def _bits(path: str) -> int:
    number = re.search(r"[0-9]+", _tag(Path(path))[0])
    return int(number.group()) if number else 0


def parts(paths: list[str], model: str) -> list[str]:
    """A split model's every part (`x-00001-of-00003.gguf` ...), in order; else the file alone."""
    split = SPLIT.match(model[: -len(".gguf")])
    if split is None:
        return [model]
    prefix, count = split.group(1), split.group(3)
    return sorted(p for p in paths if (m := SPLIT.match(p[: -len(".gguf")])) and m.group(1) == prefix
                  and m.group(3) == count)


def remove(root: Path, model_id: str) -> bool:
    """Deletes a cached model's files (`user/repo:QUANT`: that quant's files and the blobs no
    other file of the repo still links to; no tag: the whole repo). False if nothing was there.
    Only what lies inside the repo's own folder of the cache is deleted: a link out of it (a
    shared model file linked into the cache layout) is removed, never what it points at."""
    repo_id, tag = split_repo_tag(model_id)
    if not valid_repo(repo_id):
        return False
    repo = repo_folder(root, repo_id)
    if not tag:
        if repo.is_symlink():
            repo.unlink()
            return True
        if not repo.is_dir():
            return False
        shutil.rmtree(repo)  # it removes the links inside, never follows them
        return True
    snap = snapshot(repo)
    if snap is None:
        return False
    own = Path(root).resolve() / repo.name
    if snap.resolve() != own / "snapshots" / snap.name:
        return False  # the repo, its snapshots or this snapshot is a link out of the cache: not ours
    doomed = [p for p in _files(snap) if _tag(p)[0] == tag.upper()]
    # Entries whose folder is a link out of the snapshot are not ours either.
    doomed = [p for p in doomed if p.parent.resolve().is_relative_to(own)]
    blobs = {p.resolve() for p in doomed if p.is_symlink()}
    for p in doomed:
        p.unlink(missing_ok=True)  # a link, or a file of the snapshot's own
    kept = {p.resolve() for p in snap.rglob("*") if p.is_symlink()}
    for blob in blobs - kept:
        if blob.is_relative_to(own):
            blob.unlink(missing_ok=True)
    return bool(doomed)
