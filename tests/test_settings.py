from pathlib import Path

import pytest

from gguf_router.cli import parse_settings
from gguf_router.ini import ConfigError

ROUTER_VARS = ("GGUF_ROUTER_PORT", "GGUF_ROUTER_HOST", "GGUF_ROUTER_MODELS_MAX", "GGUF_ROUTER_API_KEYS",
               "GGUF_ROUTER_CONFIG", "GGUF_ROUTER_MODELS_AUTOLOAD", "GGUF_ROUTER_LLAMA_SERVER",
               "GGUF_ROUTER_MEMORY_BUDGET", "GGUF_ROUTER_LAUNCHER", "GGUF_ROUTER_MODELS_DIR")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in ROUTER_VARS:
        monkeypatch.delenv(var, raising=False)


def conf(tmp_path, text: str) -> str:
    path = tmp_path / "gguf-router.conf"
    path.write_text(text)
    return str(path)


def test_router_flags_are_parsed_and_the_rest_goes_to_children(tmp_path):
    s = parse_settings(["-c", "8192", "--models-dir", str(tmp_path), "--models-max", "2",
                        "--threads", "2", "--no-models-autoload", "--no-mmap", "-ngl", "99"])
    assert s.models_dir == tmp_path and s.models_max == 2 and s.models_autoload is False
    assert s.child_args == ("-c", "8192", "--threads", "2", "--no-mmap", "-ngl", "99")


def test_defaults_match_llama_server():
    s = parse_settings([])
    assert (s.host, s.port, s.models_max, s.models_autoload) == ("127.0.0.1", 8080, 4, True)


def test_command_line_beats_environment_beats_file_beats_default(monkeypatch, tmp_path):
    path = conf(tmp_path, "[router]\nport = 9200\nmodels-max = 3\nhost = 0.0.0.0\nmodels_autoload = off\n")
    monkeypatch.setenv("GGUF_ROUTER_MODELS_MAX", "7")
    monkeypatch.setenv("GGUF_ROUTER_PORT", "9000")
    monkeypatch.setenv("GGUF_ROUTER_API_KEYS", "k1, k2")
    s = parse_settings(["--config", path, "--port", "9100"])
    assert (s.port, s.models_max, s.host, s.models_autoload, s.api_keys) == (9100, 7, "0.0.0.0", False, ("k1", "k2"))
    assert s.models_preset is None and s.stop_timeout == 10.0  # defaults where no one says


def test_api_keys_repeat_or_comma_plus_a_key_file(tmp_path):
    assert parse_settings(["--api-key", "a,b", "--api-key", "c"]).api_keys == ("a", "b", "c")
    keys = tmp_path / "keys"
    keys.write_text("# admin\nsecret-1\n\n  secret-2  \n")
    s = parse_settings(["--config", conf(tmp_path, f"[router]\napi-key-file = {keys}\n"), "--api-key", "x"])
    assert s.all_api_keys() == ("x", "secret-1", "secret-2")


@pytest.mark.parametrize("text, where, message", [
    ("[router]\nmodels-max = lots\n", ":2: models-max", "valid integer"),
    ("[router]\nport = 80\n\nmodel-dir = /x\n", ":4", "unknown key 'model-dir'"),
    ("[server]\nport = 80\n", ":2", "unknown section [server]"),
    ("[router]\nthis is not ini\n", ":2", "expected [section] or key = value"),
    ("[router]\nlog-level = loud\n", ":2: log-level", "unknown log level"),
])
def test_a_bad_config_file_is_refused_with_file_line_and_key(tmp_path, text, where, message):
    path = conf(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        parse_settings(["--config", path])
    assert caught.value.where.startswith(path + where)
    assert message in caught.value.message


def test_a_named_config_file_must_exist(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        parse_settings(["--config", str(tmp_path / "nope.conf")])


@pytest.mark.parametrize("argv, where, message", [
    (["--models-max", "-1"], "--models-max", "give a number at least 0"),
    (["--port", "70000"], "--port", "between 0 and 65535"),
    (["--log-level", "loud"], "--log-level", "unknown log level"),
    (["--max-body", "huge"], "--max-body", "not a size"),
    (["--tls-cert-file", "/etc/cert.pem"], "tls-key-file", "set both or neither"),
    # `--api-key "$UNSET"`: a blank key would leave the router open without a word
    (["--api-key", ""], "--api-keys", "a key is empty"),
    (["--api-key", "k1", "--admin-api-key", " "], "--admin-api-keys", "a key is empty"),
])
def test_bad_command_line_values_are_refused_by_name(argv, where, message):
    with pytest.raises(ConfigError) as caught:
        parse_settings(argv)
    assert caught.value.where == where and message in caught.value.message


@pytest.mark.parametrize("var, value, message", [
    ("GGUF_ROUTER_STOP_TIMEOUT", "0", "give a number above 0"),
    ("GGUF_ROUTER_MODELS_AUTOLOAD", "maybe", "not a boolean"),
    ("GGUF_ROUTER_LAUNCHER", "docker", "unknown launcher"),
    ("GGUF_ROUTER_API_KEYS", "", "a key is empty"),
    ("GGUF_ROUTER_API_KEYS", "k1,,k2", "a key is empty"),
])
def test_bad_environment_values_name_the_variable(monkeypatch, var, value, message):
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError) as caught:
        parse_settings([])
    assert caught.value.where == f"environment {var}" and message in caught.value.message


def test_llama_servers_cors_origins_spelling_is_the_routers_own():
    # Passed on to the children, it would reach no browser: their CORS headers never pass the router.
    s = parse_settings(["--cors-origins", "localhost,https://a.example", "--cors-origin", "https://b.example"])
    assert s.cors_origins == ("localhost", "https://a.example", "https://b.example") and s.child_args == ()


def test_environment_values_take_their_field_types(monkeypatch, tmp_path):
    monkeypatch.setenv("GGUF_ROUTER_MODELS_AUTOLOAD", "off")
    monkeypatch.setenv("GGUF_ROUTER_QUEUE_TIMEOUT", "2.5")
    monkeypatch.setenv("GGUF_ROUTER_MODELS_DIR", str(tmp_path))
    monkeypatch.setenv("GGUF_ROUTER_CORS_ORIGINS", "https://a.example, https://b.example")
    monkeypatch.setenv("GGUF_ROUTER_MEMORY_BUDGET", " 80% ")
    s = parse_settings([])
    assert (s.models_autoload, s.queue_timeout, s.models_dir) == (False, 2.5, tmp_path)
    assert s.cors_origins == ("https://a.example", "https://b.example") and s.memory_budget == "80%"


def test_the_default_llama_server_is_the_one_on_the_path_then_the_packaged_one(tmp_path, monkeypatch):
    from gguf_router import settings

    own = tmp_path / "bin" / "llama-server"
    own.parent.mkdir()
    own.write_text("#!/bin/sh\n")
    own.chmod(0o755)
    packaged = tmp_path / "lib" / "llama-server"
    monkeypatch.setattr(settings, "PACKAGED_LLAMA_SERVER", packaged)
    monkeypatch.setenv("PATH", str(own.parent))
    assert parse_settings([]).llama_server == own  # an admin's own build (CUDA, Vulkan) wins
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert parse_settings([]).llama_server == settings.BUILT_LLAMA_SERVER  # nothing installed
    packaged.parent.mkdir()
    packaged.touch()
    assert parse_settings([]).llama_server == packaged
    assert parse_settings(["--llama-server", "/opt/x/llama-server"]).llama_server == Path("/opt/x/llama-server")


def test_every_setting_is_in_the_manual_and_the_shipped_config():
    """Each setting is declared once (its Settings field); what documents it is checked against that."""
    import re
    from pathlib import Path

    from gguf_router.settings import FILE_KEYS, flags

    repo = Path(__file__).parent.parent
    manual = (repo / "docs" / "configuration.md").read_text()
    shipped = (repo / "etc" / "gguf-router.conf").read_text()
    rows = [line for line in manual.splitlines() if line.startswith("| `--")]
    missing = []
    for item, names in flags():
        if not any(row.startswith(f"| `{names[0]}") for row in rows):
            missing.append(f"docs/configuration.md: a row for {names[0]}")
    for name in sorted(FILE_KEYS):
        key, env = name.replace("_", "-"), f"GGUF_ROUTER_{name.upper()}"
        if env not in manual and key not in ("runtime-dir", "log-timestamps"):
            missing.append(f"docs/configuration.md: {env}")
        if not re.search(rf"^#? ?{re.escape(key)} =", shipped, re.M) and key not in ("runtime-dir", "config"):
            missing.append(f"etc/gguf-router.conf: {key}")
    assert missing == []


def test_the_man_page_options_are_made_from_the_settings():
    from pathlib import Path

    from gguf_router import manpage

    page = (Path(__file__).parent.parent / "debian" / "gguf-router.1").read_text()
    assert page == manpage.rewritten(page), "run: python -m gguf_router.manpage debian/gguf-router.1"
