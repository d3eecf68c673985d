"""Presets in llama.cpp's INI format, resolved against the real llama-server's option list."""

import os

import pytest

from gguf_router.catalog import build
from gguf_router.discovery import Discovery
from gguf_router.ini import ConfigError
from gguf_router.llama_options import options_of
from gguf_router.presets import load_presets, parse_child_args, to_argv
from gguf_router.settings import Settings


@pytest.fixture(scope="module")
def table(llama_server):
    return options_of(llama_server)


def presets(tmp_path, table, text: str, *dropins: str):
    main = tmp_path / "presets.ini"
    main.write_text(text)
    files = []
    for i, extra in enumerate(dropins):
        (tmp_path / "presets.d").mkdir(exist_ok=True)
        files.append(tmp_path / "presets.d" / f"{i:02d}.ini")
        files[-1].write_text(extra)
    return load_presets(main, files, table, required=True)


def test_options_are_known_by_long_and_short_name_and_variable(table):
    for key in ("ctx-size", "c", "LLAMA_ARG_CTX_SIZE", "--ctx-size"):
        option, negated = table.lookup(key)
        assert option.flag == "--ctx-size" and option.takes_value and not negated
    option, negated = table.lookup("no-kv-offload")
    assert option.flag == "--kv-offload" and negated
    assert table.lookup("nkvo")[1] and table.lookup("no-jinja")[1]
    assert table.lookup("cpu-moe-draft")[1] is False  # a positive alias that merely looks short
    assert table.lookup("frobnicate") is None


def test_global_section_is_inherited_and_model_sections_override(tmp_path, table):
    p = presets(tmp_path, table, """version = 1
; every model
[*]
c = 4096
jinja = off
LLAMA_ARG_N_PARALLEL = 2

[tiny-a]
ctx-size = 2048   ; this model only
no-kv-offload = true
alias = small, fast
load-on-startup = yes
stop-timeout = 3
""")
    a, b = p.for_model("tiny-a"), p.for_model("tiny-b")
    assert to_argv(a) == ["--ctx-size", "2048", "--no-jinja", "--parallel", "2", "--no-kv-offload"]
    assert to_argv(b) == ["--ctx-size", "4096", "--no-jinja", "--parallel", "2"]
    assert {k: v for k, (v, _) in a.router.items()} == {"alias": ("small", "fast"), "load-on-startup": True,
                                                       "stop-timeout": 3.0}


def test_dropins_override_the_main_file_in_name_order(tmp_path, table):
    p = presets(tmp_path, table, "[*]\nc = 4096\n", "[*]\nc = 1024\n", "[tiny-b]\nc = 512\n")
    assert p.files[0].name == "presets.ini" and [f.name for f in p.files[1:]] == ["00.ini", "01.ini"]
    assert to_argv(p.for_model("tiny-a")) == ["--ctx-size", "1024"]
    assert to_argv(p.for_model("tiny-b")) == ["--ctx-size", "512"]


@pytest.mark.parametrize("text, line, message", [
    ("[*]\nc = 4096\nfrobnicate = 1\n", 3, "unknown key 'frobnicate'"),
    ("[tiny-a]\n\njinja = maybe\n", 3, "not a boolean"),
    ("[tiny-a]\nc = big\n", 2, "not a number"),
    ("[*]\nport = 9000\n", 2, "set by the router"),
    ("[*]\nmodel = /x.gguf\n", 2, "belongs in a model's own section"),
    ("[tiny-a]\nstop-timeout = -1\n", 2, "above 0"),
    ("[tiny-a]\nmemory-max = lots\n", 2, "a size like 512M"),
    ("[tiny-a]\ndevices = /tmp/gpu\n", 2, "is not a device under /dev/"),
    ("[tiny-a]\nenvironment = CUDA_VISIBLE_DEVICES\n", 2, "is not VAR=value"),
    ("c = 4096\n", 1, "put options under [*]"),
    ("[tiny-a\n", 1, "expected [section]"),
])
def test_bad_presets_are_refused_with_file_and_line(tmp_path, table, text, line, message):
    with pytest.raises(ConfigError) as caught:
        presets(tmp_path, table, text)
    assert caught.value.where == f"{tmp_path / 'presets.ini'}:{line}"
    assert message in caught.value.message


def test_command_line_options_win_over_presets(tmp_path, table, models_dir, llama_server):
    p = presets(tmp_path, table, "[*]\nc = 4096\nthreads = 2\n[tiny-a]\nc = 2048\n")
    cli = parse_child_args(("-c", "512", "--no-jinja"), table)
    settings = Settings(models_dir=models_dir, llama_server=llama_server, hf_cache=None)
    catalog = build(settings, Discovery(models_dir, None), p, cli, tmp_path)
    argv = catalog.models["tiny-a"].argv
    assert argv[0] == str(llama_server)
    assert argv[1:6] == ("--ctx-size", "512", "--threads", "2", "--no-jinja")
    assert argv[argv.index("--model") + 1] == str(models_dir / "tiny-a.gguf")
    with pytest.raises(ConfigError, match="set by the router"):
        parse_child_args(("--port", "1"), table)
    with pytest.raises(ConfigError, match="not an option of this llama-server"):
        parse_child_args(("--frobnicate",), table)


def test_a_preset_adds_a_model_by_path_and_aliases_must_be_unique(tmp_path, table, models_dir, llama_server):
    settings = Settings(models_dir=models_dir, llama_server=llama_server, hf_cache=None)
    p = presets(tmp_path, table, "[extra]\nmodel = tiny-c.gguf\nalias = third\n[ghost]\nc = 1\n")
    catalog = build(settings, Discovery(models_dir, None), p, parse_child_args((), table), tmp_path)
    extra = catalog.models["extra"]
    assert extra.file.path == models_dir / "tiny-c.gguf" and extra.file.source == "preset"
    assert extra.aliases == ("third",) and extra.file.error is None
    assert any("[ghost] matches no model" in w for w in catalog.warnings)
    p = presets(tmp_path, table, "[tiny-a]\nalias = x\n[tiny-b]\nalias = x\n")
    with pytest.raises(ConfigError, match="already an alias of \\[tiny-a\\]") as caught:
        build(settings, Discovery(models_dir, None), p, parse_child_args((), table), tmp_path)
    assert caught.value.where.endswith("presets.ini:4")


def test_children_share_the_cores_and_are_sent_what_their_http_threads_take(tmp_path, table, models_dir, llama_server):
    p = presets(tmp_path, table, "[tiny-b]\nt = 3\n[tiny-c]\nthreads-http = 12\nnp = 2\n")
    cores = len(os.sched_getaffinity(0))
    shared = build(Settings(models_dir=models_dir, llama_server=llama_server, hf_cache=None, models_max=2),
                   Discovery(models_dir, None), p, parse_child_args((), table), tmp_path)
    argv = shared.models["tiny-a"].argv
    assert argv[argv.index("--threads") + 1] == str(max(1, cores // 2))  # two may compute at once
    b = shared.models["tiny-b"].argv
    assert b.count("--threads") == 1 and b[b.index("--threads") + 1] == "3"  # as its preset says
    assert shared.models["tiny-a"].connections == max(4 + 4, cores - 1) - 2  # auto: 4 slots
    assert shared.models["tiny-c"].connections == 10
    alone = build(Settings(models_dir=models_dir, llama_server=llama_server, hf_cache=None, models_max=1),
                  Discovery(models_dir, None), p, parse_child_args((), table), tmp_path)
    assert "--threads" not in alone.models["tiny-a"].argv  # one at a time: llama-server's own default
