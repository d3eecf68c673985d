"""What the systemd launcher hands systemd-run for a model, and what the catalog tells it, without
processes: odd names and paths stay one word each, the network only for --rpc among the options.
(The same against a real systemd: test_systemd_units.py.)"""

import shutil

from gguf_router.catalog import build, read_presets
from gguf_router.discovery import Discovery
from gguf_router.launchers import LaunchSpec
from gguf_router.launchers import argv_digest
from gguf_router.launchers.systemd import SystemdLauncher, _runs, described
from gguf_router.settings import Settings


def properties(spec: LaunchSpec, runtime_dir) -> list[str]:
    return SystemdLauncher(runtime_dir, user=True)._properties(spec)


def test_every_value_is_one_quoted_word_and_the_model_id_is_no_variable(tmp_path):
    odd = tmp_path / 'odd models "x" $HOME\\y'
    odd.mkdir()
    model = odd / "m.gguf"
    model.write_bytes(b"GGUF")
    spec = LaunchSpec("u/r LD_PRELOAD=/x.so:Q8_0", ("/usr/bin/llama-server", "--model", str(model)), tmp_path / "a.sock",
                      10, environment=("GREETING=hello world",))
    props = properties(spec, tmp_path)
    assert not [p for p in props if "GGUF_ROUTER_" in p or "LD_PRELOAD" in p.split("=", 1)[0]]
    assert [p for p in props if p.startswith("Environment=")] == ['Environment="GREETING=hello world"']
    escaped = str(odd).replace("\\", "\\\\").replace('"', '\\"')
    assert f'BindReadOnlyPaths="{escaped}/m.gguf"' in props
    assert props[0] == "Description=" + described(spec.model_id, spec.argv)
    assert props[0].startswith("Description=gguf-router model u/r LD_PRELOAD=/x.so:Q8_0 [")


def test_the_network_is_granted_by_the_rpc_option_not_by_a_model_named_rpc(tmp_path, llama_server, models_dir):
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(models_dir / "tiny-a.gguf", folder / "--rpc.gguf")
    shutil.copy(models_dir / "tiny-a.gguf", folder / "remote.gguf")
    presets_file = tmp_path / "presets.ini"
    presets_file.write_text("[remote]\nrpc = 127.0.0.1:50052\n")
    settings = Settings(llama_server=llama_server, models_dir=folder, hf_cache=None, models_preset=presets_file)
    presets, cli = read_presets(settings)
    models = build(settings, Discovery(folder, None), presets, cli, tmp_path).models
    named_rpc, remote = models["--rpc"].launch, models["remote"].launch
    assert "--rpc" in named_rpc.argv and not named_rpc.network  # the alias is not an option
    assert remote.network
    families = {spec.model_id: next(p for p in properties(spec, tmp_path) if p.startswith("RestrictAddressFamilies="))
                for spec in (named_rpc, remote)}
    assert families == {"--rpc": "RestrictAddressFamilies=AF_UNIX AF_NETLINK",
                        "remote": "RestrictAddressFamilies=AF_UNIX AF_NETLINK AF_INET AF_INET6"}


def test_a_unit_is_known_by_its_description_or_by_what_an_earlier_version_wrote():
    spec = LaunchSpec("tiny-a", ("/usr/bin/llama-server", "-m", "/m/tiny-a.gguf"), None, 10)
    assert _runs({"Description": described("tiny-a", spec.argv)}, spec)
    assert not _runs({"Description": described("tiny-a", ("/usr/bin/llama-server", "-c", "99"))}, spec)
    # a unit an earlier gguf-router started, before an upgrade: still adopted
    legacy = f"GGUF_ROUTER_MODEL=tiny-a GGUF_ROUTER_ARGV={argv_digest(spec.argv)}"
    assert _runs({"Description": "gguf-router model tiny-a", "Environment": legacy}, spec)
    assert not _runs({"Description": "gguf-router model tiny-a", "Environment": "GGUF_ROUTER_MODEL=tiny-a"}, spec)
