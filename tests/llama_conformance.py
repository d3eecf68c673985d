"""A pytest plugin for running llama.cpp's own router tests against gguf-router (see
test_llama_router.py): their models are already in LLAMA_CACHE, so the suite's download step has
nothing to do, and the tests that need the network are skipped, saying so."""

import pytest

NEEDS_NETWORK = {
    "test_router_remote_preset": "needs the network: its presets come from a Hugging Face repository",
    "test_router_download_model": "needs the network: POST /models downloads from Hugging Face",
}


def pytest_sessionstart(session):
    import utils  # the suite's own helpers, imported by its conftest already

    utils.ServerPreset.load_all = staticmethod(lambda: None)


def pytest_collection_modifyitems(items):
    for item in items:
        if item.originalname in NEEDS_NETWORK:
            item.add_marker(pytest.mark.skip(reason=NEEDS_NETWORK[item.originalname]))
