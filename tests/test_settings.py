import pytest
from pydantic import ValidationError

from gguf_router.cli import parse_settings


def test_router_flags_are_parsed_and_the_rest_goes_to_children(tmp_path):
    s = parse_settings(["-c", "8192", "--models-dir", str(tmp_path), "--models-max", "2",
                        "--threads", "2", "--no-models-autoload", "--no-mmap", "-ngl", "99"])
    assert s.models_dir == tmp_path and s.models_max == 2 and s.models_autoload is False
    assert s.child_args == ("-c", "8192", "--threads", "2", "--no-mmap", "-ngl", "99")


def test_defaults_match_llama_server(monkeypatch):
    for var in ("GGUF_ROUTER_PORT", "GGUF_ROUTER_HOST", "GGUF_ROUTER_MODELS_MAX"):
        monkeypatch.delenv(var, raising=False)
    s = parse_settings([])
    assert (s.host, s.port, s.models_max, s.models_autoload) == ("127.0.0.1", 8080, 4, True)


def test_command_line_beats_environment_beats_default(monkeypatch):
    monkeypatch.setenv("GGUF_ROUTER_MODELS_MAX", "7")
    monkeypatch.setenv("GGUF_ROUTER_PORT", "9000")
    monkeypatch.setenv("GGUF_ROUTER_API_KEYS", "k1, k2")
    s = parse_settings(["--port", "9100"])
    assert (s.port, s.models_max, s.api_keys) == (9100, 7, ("k1", "k2"))


def test_api_keys_repeat_or_comma(monkeypatch):
    monkeypatch.delenv("GGUF_ROUTER_API_KEYS", raising=False)
    assert parse_settings(["--api-key", "a,b", "--api-key", "c"]).api_keys == ("a", "b", "c")


@pytest.mark.parametrize("argv, message", [
    (["-m", "/x.gguf"], "set by the router"),
    (["--alias=foo"], "set by the router"),
    (["--models-max", "-1"], "greater than or equal to 0"),
    (["--log-level", "loud"], "unknown log level"),
])
def test_bad_settings_are_refused_by_name(argv, message):
    with pytest.raises(ValidationError, match=message):
        parse_settings(argv)
