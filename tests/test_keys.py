"""Keys, quotas and token counting as pure rules: files read with their errors, who is who, when a
quota refuses and what it tells the client to wait. Milliseconds, no router."""

from __future__ import annotations

import pytest

from gguf_router.ini import ConfigError
from gguf_router.keys import Key, Level, digest, read_keys, section, without_section
from gguf_router.quotas import WINDOW, Quotas
from gguf_router.tokens import Meter
from gguf_router.errors import RouterError


def keys_file(tmp_path, text: str):
    path = tmp_path / "keys.ini"
    path.write_text(text)
    return path


def test_named_keys_are_read_with_their_role_models_and_limits(tmp_path):
    path = keys_file(tmp_path, section("alice", "sk-a", "inference", "qwen*, llama3", {"concurrency": 4})
                     + "[bob]\nkey = sk-b\nrole = read-only\n")
    (tmp_path / "keys.d").mkdir()
    (tmp_path / "keys.d" / "ci.ini").write_text("[ci]\nkey-sha256 = " + digest("sk-c").hex() + "\n"
                                                 "requests-per-minute = 60\n")
    ring = read_keys(path, ("sk-bare",), ())
    assert [k.name for k in ring.keys] == ["alice", "bob", "ci", "key-1"]
    alice = ring.find("sk-a")
    assert alice.role is Level.INFERENCE and alice.concurrency == 4 and alice.clear is None
    assert alice.may_use(("qwen-7b",)) and alice.may_use(("x", "llama3")) and not alice.may_use(("llama3-70b",))
    assert ring.find("sk-b").role is Level.READ and ring.find("sk-b").clear == "sk-b"
    assert ring.find("sk-c").requests_per_minute == 60 and ring.find("sk-c").role is Level.INFERENCE
    assert ring.find("sk-bare").name == "key-1" and ring.find("sk-bare").role is Level.ADMIN  # no admin keys
    assert ring.find("sk-") is None and ring.find("") is None
    assert ring.keyless_level is Level.PUBLIC


def test_bare_keys_keep_the_levels_they_always_had(tmp_path):
    none = tmp_path / "absent.ini"
    assert read_keys(none, (), ()).keyless_level is Level.ADMIN  # no keys: open
    both = read_keys(none, ("sk-u",), ("sk-adm",))
    assert both.find("sk-u").role is Level.INFERENCE and both.find("sk-adm").name == "admin-1"
    assert both.keyless_level is Level.PUBLIC and both.has_operators
    only_admin = read_keys(none, (), ("sk-adm",))
    assert only_admin.keyless_level is Level.INFERENCE and only_admin.has_operators
    only_api = read_keys(none, ("sk-u",), ())
    assert only_api.keyless_level is Level.PUBLIC and not only_api.has_operators  # everyone with a key is admin
    # A named admin key makes the bare API keys inference keys, and guards the rest.
    named = read_keys(keys_file(tmp_path, "[ops]\nkey = sk-ops\nrole = admin\n"), ("sk-u",), ())
    assert named.find("sk-u").role is Level.INFERENCE and named.keyless_level is Level.PUBLIC
    assert named.clear_key(Level.ADMIN) == "sk-ops"
    # A bare key that a file names too is that named key, once.
    same = read_keys(keys_file(tmp_path, "[ops]\nkey = sk-u\nrole = admin\n"), ("sk-u",), ())
    assert [k.name for k in same.keys] == ["ops"]
    # A bare admin key that a file names with a lesser role would not manage: refused, naming no key.
    with pytest.raises(ConfigError, match=r"admin key 1 \(admin-api-keys\) is also key \[alice\], whose role is "
                                          r"inference") as refused:
        read_keys(keys_file(tmp_path, "[alice]\nkey = sk-a\n"), (), ("sk-a",))
    assert "sk-a" not in str(refused.value)


@pytest.mark.parametrize("text, where, says", [
    ("[a]\nrole = admin\n", ":2", "needs exactly one of key-sha256"),
    ("[a]\nkey = x\nkey-sha256 = " + "0" * 64 + "\n", ":2", "not 2"),
    ("[a]\nkey-sha256 = abc\n", ":2", "64 hex digits"),
    ("[a]\nkey = x\nrole = root\n", ":3", "use one of read-only, inference, admin"),
    ("[a]\nkey = x\nconcurrency = -1\n", ":3", "whole number"),
    ("[a]\nkey = x\nmodel = q*\n", ":3", "unknown key setting 'model'"),
    ("[a b]\nkey = x\n", ":2", "letters, digits"),
    ("[a]\nkey = x\n[b]\nkey = x\n", "keys.ini", "are the same key"),
    ("[a]\nkey-file = /nonexistent/k\n", ":2", "cannot be read"),
    ("[key-1]\nkey = x\n", ":2", "how the keys of --api-key"),
    ("[a]\nkey = x\nmodels = ,\n", ":3", "names no model"),
])
def test_a_bad_keys_file_is_refused_naming_its_line(tmp_path, text, where, says):
    with pytest.raises(ConfigError) as refused:
        read_keys(keys_file(tmp_path, text), (), ())
    assert where in str(refused.value) and says in str(refused.value)


def test_an_unreadable_line_is_not_shown_and_a_named_file_must_exist(tmp_path):
    with pytest.raises(ConfigError) as refused:
        read_keys(keys_file(tmp_path, "[a]\nkey = x\nsk-pasted-here-by-mistake\n"), (), ())
    assert "keys.ini:3" in str(refused.value) and "sk-pasted" not in str(refused.value)
    with pytest.raises(ConfigError, match="does not exist"):
        read_keys(tmp_path / "typo.ini", (), (), named=True)
    held = tmp_path / "two-keys"
    held.write_text("# two keys\nsk-one\nsk-two\n")
    with pytest.raises(ConfigError, match="holds 2 keys"):
        read_keys(keys_file(tmp_path, f"[a]\nkey-file = {held}\n"), (), ())
    assert "sk-" not in repr(read_keys(keys_file(tmp_path, "[a]\nkey = sk-secret\n"), (), ()))


def test_a_section_is_removed_and_nothing_else():
    text = "; team keys\n[a]\nkey = x\n\n[b] ; the CI\nkey = y\n[c]\nkey = z\n"
    assert without_section(text, "b") == "; team keys\n[a]\nkey = x\n\n[c]\nkey = z\n"
    assert without_section(text, "d") is None


def test_concurrency_is_reserved_before_anything_waits():
    quotas, key = Quotas(), Key("carol", concurrency=2)
    quotas.reserve(key, 0.0)
    quotas.reserve(key, 0.0)
    with pytest.raises(RouterError) as refused:
        quotas.reserve(key, 0.0)
    assert refused.value.status == 429 and refused.value.headers["Retry-After"] == "1"
    assert refused.value.type == "rate_limit_error"
    quotas.reserve(Key("other", concurrency=2), 0.0)  # another key is not affected
    quotas.release(key, 0, 1.0)
    quotas.reserve(key, 1.0)
    assert quotas.in_flight("carol") == 2


def test_requests_per_minute_acts_at_exactly_its_setting_and_says_when():
    quotas, key = Quotas(), Key("dave", requests_per_minute=3)
    for at in (0.0, 10.0, 20.0):
        quotas.reserve(key, at)
        quotas.release(key, 0, at + 1)
    with pytest.raises(RouterError) as refused:
        quotas.reserve(key, 30.0)
    assert refused.value.headers["Retry-After"] == str(int(WINDOW - 30))  # when the first leaves the window
    quotas.reserve(key, WINDOW + 0.5)  # it has


def test_tokens_per_minute_counts_what_ended_and_waits_for_enough_to_leave():
    quotas, key = Quotas(), Key("erin", tokens_per_minute=100)
    for at, tokens in ((0.0, 60), (5.0, 50)):
        quotas.reserve(key, at)
        quotas.release(key, tokens, at + 1)
    with pytest.raises(RouterError) as refused:
        quotas.reserve(key, 10.0)
    # 110 used: under 100 once the first 60 (ended at 1 s) leave the window, at 61 s
    assert refused.value.headers["Retry-After"] == str(61 - 10)
    quotas.reserve(key, 61.5)


def test_tokens_are_read_from_usage_timings_or_the_pieces_a_cut_stream_sent():
    whole = Meter()
    whole.feed(b'{"choices":[],"usage":{"completion_tokens":8,"prompt_tokens":54,"total_tokens":62},'
               b'"timings":{"prompt_n":54,"predicted_n":8}}')
    assert (whole.used().prompt, whole.used().completion) == (54, 8)
    stream = Meter()
    stream.stream = True
    events = (b'data: {"choices":[{"delta":{"content":"t"}}]}\n\n' * 3
              + b'data: {"choices":[{"delta":{}}],"timings":{"cache_n":53,"prompt_n":1,"predicted_n":3}}\n\n')
    for i in range(0, len(events), 7):  # fields split between chunks are still found
        stream.feed(events[i:i + 7])
    assert (stream.used().prompt, stream.used().completion) == (54, 3)
    cut = Meter()
    cut.stream = True
    cut.feed(b'data: {"choices":[{"delta":{"role":"assistant","content":null}}]}\n\n'
             + b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n' * 5)
    assert cut.used().completion == 5
    tokenize = Meter()
    tokenize.feed(b'{"tokens":[1,2,3]}')
    assert tokenize.used().total == 0
    counting = Meter(counted=False)  # /v1/messages/count_tokens: it tells a count, it uses none
    counting.feed(b'{"input_tokens":1234}')
    assert counting.used().total == 0
    batch = Meter()  # /completion with a list of prompts: one answer each, all counted
    batch.feed(b'[{"content":"a","tokens_evaluated":3,"tokens_predicted":4},'
               b'{"content":"b","tokens_evaluated":5,"tokens_predicted":6}]')
    assert (batch.used().prompt, batch.used().completion) == (8, 10)
