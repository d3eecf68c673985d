"""A pytest plugin for running llama.cpp's own router tests against gguf-router (see
test_llama_router.py): their models are already in LLAMA_CACHE, so the suite's download step has
nothing to do; what they download comes from the loopback hub (MODEL_ENDPOINT)."""

# llama.cpp's router downloads on POST /models even when started with --offline, as the suite
# starts it (its download child gets none of the router's flags); gguf-router's --offline means
# no download at all, so these start without it.
DOWNLOADING = {"test_router_download_model", "test_router_delete_model"}


def pytest_runtest_call(item):
    if item.originalname in DOWNLOADING:
        item.module.server.offline = False


def pytest_sessionstart(session):
    import utils  # the suite's own helpers, imported by its conftest already

    utils.ServerPreset.load_all = staticmethod(lambda: None)

