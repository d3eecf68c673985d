"""The page at /, in headless Chromium (Debian's), driven by Playwright: list, load, chat, unload."""

import re
from pathlib import Path

import pytest

from conftest import BUSY_ARGS, CHROMIUM, chat
from gguf_router.keys import section

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (scripts/dev installs it)")


def state_of(page, model: str, state: str):
    """The model's state cell once it says exactly `state` (not "unloaded" for "loaded")."""
    return page.locator(f"tr[data-model='{model}'] td.state").filter(has_text=re.compile(f"^{state}$"))


def test_the_page_lists_loads_chats_and_unloads_live_with_an_api_key(start_router, page):
    router = start_router("--api-key", "page-key", "--models-max", "2", "--memory-budget", "1G")
    router.http.headers["Authorization"] = "Bearer page-key"
    page.goto(router.url + "/status")
    # without the key the page asks for it, then works with it
    page.locator("#key-form").wait_for(state="visible")
    page.fill("#key", "page-key")
    page.click("#key-form button")
    for model in ("tiny-a", "tiny-b", "tiny-c"):
        state_of(page, model, "unloaded").wait_for()

    page.click("tr[data-model='tiny-b'] button")  # Load
    state_of(page, "tiny-b", "loaded").wait_for(timeout=30_000)
    assert router.state("tiny-b") == "loaded"
    cells = page.locator("tr[data-model='tiny-b'] td")
    assert "MiB" in cells.nth(3).inner_text() and "MiB" in cells.nth(4).inner_text()  # estimate, use

    page.select_option("#picker", "tiny-b")
    page.fill("#prompt", "Tell me something")
    page.click("#send")
    page.wait_for_function("Number(document.getElementById('reply').dataset.chunks) >= 8")
    page.locator("#send:enabled").wait_for()
    assert page.inner_text("#reply").strip() != ""

    # a load by someone else (the API) shows up live too
    router.http.post("/models/load", json={"model": "tiny-c"})
    state_of(page, "tiny-c", "loaded").wait_for(timeout=30_000)
    # the budget bar: a segment for each running model, and the budget's figures
    page.locator("#budget-bar .counted[data-model='tiny-c']").wait_for()
    assert page.locator("#budget-bar .counted").count() == 2
    assert page.inner_text("#budget-text").startswith("memory budget 1.0 GiB: ")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web-page.png"), full_page=True)

    page.click("tr[data-model='tiny-b'] button")  # Unload
    state_of(page, "tiny-b", "unloaded").wait_for(timeout=30_000)
    assert router.state("tiny-b") == "unloaded"
    assert page.inner_text("#summary") == "1 of 3 models loaded"


def test_the_page_shows_an_admin_the_usage_per_key_and_a_scoped_key_its_models(start_router, page, tmp_path):
    keys = tmp_path / "keys.ini"
    keys.write_text(section("ops", "sk-page-ops", "admin") + section("alice", "sk-page-alice", "inference", "tiny-a"))
    router = start_router("--keys-file", str(keys))
    for _ in range(3):
        assert router.http.post("/v1/chat/completions", json=chat("tiny-a"),
                                headers={"Authorization": "Bearer sk-page-alice"}).status_code == 200
    page.goto(router.url + "/status")
    page.locator("#key-form").wait_for(state="visible")
    page.fill("#key", "sk-page-ops")
    page.click("#key-form button")
    row = page.locator("#usage tr[data-key='alice']")
    row.wait_for()
    assert [cell.inner_text() for cell in row.locator("td").all()][:3] == ["alice", "tiny-a", "3"]

    page.evaluate("localStorage.clear()")
    page.goto(router.url + "/status")
    page.locator("#key-form").wait_for(state="visible")
    page.fill("#key", "sk-page-alice")
    page.click("#key-form button")
    state_of(page, "tiny-a", "loaded").wait_for(timeout=30_000)
    assert page.locator("#models tbody tr").count() == 1  # only the models the key may use
    assert page.locator("#usage-section").is_hidden()


def answer(page) -> str:
    return page.get_by_label("Assistant message with actions").last.inner_text()


def test_llama_cpps_web_ui_picks_a_model_streams_and_resumes_after_a_reload(start_router, page):
    """llama.cpp's own UI (scripts/build-ui) at /: its model selector loads the model it picks,
    the answer streams, and a page reloaded mid-answer picks the stream up again."""
    router = start_router(*BUSY_ARGS)
    page.goto(router.url + "/")
    # Random weights end early, and a long answer is wanted: the UI's own "custom JSON" setting.
    page.evaluate("""localStorage.setItem('LlamaUi.config', JSON.stringify(
        {customJson: JSON.stringify({ignore_eos: true, max_tokens: 3000})}))""")
    page.reload()
    page.get_by_role("button", name="tiny-a").click()  # the selector, on the first model
    page.get_by_role("option", name="tiny-b").click()
    page.locator("textarea").fill("Tell me a long story")
    page.keyboard.press("Enter")
    page.wait_for_function("""() => [...document.querySelectorAll('[aria-label="Assistant message with actions"]')]
        .some(e => e.innerText.trim().length > 200)""", timeout=60_000)
    assert router.metric("gguf_router_requests_in_flight", model="tiny-b") == 1  # mid-answer
    before = len(answer(page))
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "ui-streaming.png"))

    page.reload()
    page.wait_for_function(f"""() => [...document.querySelectorAll('[aria-label="Assistant message with actions"]')]
        .some(e => e.innerText.trim().length > {before})""", timeout=60_000)
    router.wait_for(lambda: router.metric("gguf_router_requests_in_flight", model="tiny-b") == 0, timeout=120,
                    what="the answer to end")
    page.screenshot(path=str(ARTIFACTS / "ui-resumed.png"))
    page.get_by_text(re.compile(r"\b3,?000 tokens")).wait_for(timeout=30_000)  # the whole answer, as the UI counts it
    assert router.state("tiny-b") == "loaded" and router.state("tiny-a") == "unloaded"  # what the selector loaded


def test_llama_cpps_web_ui_stop_ends_the_generation_in_the_child(start_router, page):
    """The UI's Stop (an abort, and DELETE /v1/stream): the router, which keeps a resumable
    generation going when its client leaves, ends this one, in the child."""
    router = start_router("-c", "32768", "-np", "1")  # the context alone would end it after tens of seconds
    page.goto(router.url + "/")
    page.evaluate("""localStorage.setItem('LlamaUi.config', JSON.stringify(
        {customJson: JSON.stringify({ignore_eos: true, max_tokens: 100000})}))""")
    page.reload()
    page.locator("textarea").fill("Go on forever")
    page.keyboard.press("Enter")
    page.wait_for_function("""() => [...document.querySelectorAll('[aria-label="Assistant message with actions"]')]
        .some(e => e.innerText.trim().length > 200)""", timeout=60_000)
    assert router.metric("gguf_router_requests_in_flight", model="tiny-a") == 1
    page.get_by_role("button", name="Stop generation").first.click()
    router.wait_for(lambda: router.metric("gguf_router_requests_in_flight", model="tiny-a") == 0, timeout=10,
                    what="the stopped generation to end")


def test_the_status_page_shows_a_download_with_its_progress_and_cancels_it(start_router, page, tmp_path):
    from gguf_router.tinymodels import write_tiny_model
    from hub_server import HubServer

    name = "org/slow-GGUF:Q8_0"
    hub = HubServer()
    hub.add("org/slow-GGUF", {"slow-Q8_0.gguf": write_tiny_model(tmp_path / "slow-Q8_0.gguf", seed=3)})
    hub.rate = 64 << 10  # seconds for the file: time to see it and cancel it
    hub.start()
    try:
        router = start_router(env={"MODEL_ENDPOINT": hub.url, "LLAMA_CACHE": str(tmp_path / "hf")})
        page.goto(router.url + "/status")
        assert router.http.post("/models", json={"model": name}).status_code == 200
        row = page.locator(f"tr[data-model='{name}']")
        page.wait_for_function(f"""() => {{ const bar = document.querySelector("tr[data-model='{name}'] progress");
            return bar && bar.value > 0 && bar.value < 1; }}""")
        assert row.locator("td.state").inner_text().startswith("downloading")
        row.get_by_role("button", name="Cancel").click()
        row.wait_for(state="detached")
        assert name not in router.models() and not list((tmp_path / "hf").rglob("*.gguf*"))
    finally:
        hub.stop()
