"""What models exist and how each is started: discovered files + presets + settings, combined.

Built whole, off the event loop (it stats files and reads headers), then handed to the scheduler
in one piece; a config error anywhere means no new catalog at all, so a reload is all-or-nothing.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from . import hfcache
from .devices import Device
from .discovery import Discovery, ModelFile
from .ini import ConfigError, Value
from .launchers import LaunchSpec
from .llama_options import OptionTable, has_gpu, options_of
from .memory import MiB, MemoryEstimate, estimate, shard_bytes
from .projection import Projection, project
from .sizes import size_text
from .presets import Presets, Section, load_presets, parse_child_args, to_argv
from .settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelConfig:
    file: ModelFile
    launch: LaunchSpec  # how its llama-server starts: command line, socket, environment, unit limits
    aliases: tuple[str, ...] = ()
    load_on_startup: bool = False
    preset_text: str = ""
    memory: MemoryEstimate | None = None  # None for a file whose header could not be read
    pinned: bool = False  # never stopped to make room for another model
    ttl: float = 0.0  # seconds idle before it is stopped; 0 = never
    health_timeout: float = 30.0  # seconds without an answer on /health before it is killed
    hidden: bool = False  # a cache entry a preset uses (dedup-cache-models): not listed, still served
    connections: int = 6  # requests forwarded to its child at once (http_connections)
    # The devices it may run on, with what it takes on each; empty: it runs on the host alone.
    projections: dict[str, Projection] = field(default_factory=dict)
    places: dict[str, tuple[str, ...]] = field(default_factory=dict)  # the options that place it on each

    @property
    def id(self) -> str:
        return self.file.id

    @property
    def argv(self) -> tuple[str, ...]:
        return self.launch.argv


@dataclass(frozen=True)
class Catalog:
    models: dict[str, ModelConfig]
    warnings: tuple[str, ...] = ()
    # Presets whose hf-repo is not in the cache yet, by name: downloaded on their first load.
    unfetched: dict[str, str] = field(default_factory=dict)


def socket_path(runtime_dir: Path, model_id: str) -> Path:
    # Short and fixed per model: sun_path holds 108 bytes, and ids may hold '/' and ':'.
    return runtime_dir / f"{hashlib.sha1(model_id.encode()).hexdigest()[:16]}.sock"


def read_presets(settings: Settings) -> tuple[Presets, Section]:
    """The presets files and the command line's child options, checked against the binary."""
    table = options_of(settings.llama_server)
    main, dropins = settings.preset_files()
    if settings.hf_repo and not main.is_file():
        raise ConfigError(f"--hf-repo {settings.hf_repo}", "its preset.ini is not in the Hugging Face cache "
                          f"{settings.hf_cache}: start the router once without --offline to fetch it")
    presets = load_presets(main, dropins, table, required=settings.models_preset is not None or bool(settings.hf_repo))
    # --offline is the router's, and every child's too: an hf-repo model then loads from the cache alone.
    return presets, parse_child_args(settings.child_args + (("--offline",) if settings.offline else ()), table)


UNIT_LIMITS = {"memory-max": "MemoryMax", "memory-high": "MemoryHigh", "cpu-quota": "CPUQuota",
               "allowed-cpus": "AllowedCPUs"}
# llama-server's own prompt cache may hold 8 GiB per model by default (--cache-ram 8192):
# unbounded growth, as far as a memory budget is concerned. Unless a preset says otherwise, a
# child may cache one full context's worth of prompt state, at least this much.
PROMPT_CACHE_MIN = 256 * MiB


def thread_share(models_max: int) -> int | None:
    """--threads for a child whose options name none: the router's cores shared out among the
    models that may run at once. ggml's threads meet at a barrier after every operation, so two
    children computing at once with every core each leave each thread waiting for one the kernel
    has preempted: a tiny model took 290 ms a token instead of under 1 ms. None (llama-server's own
    default, every core) where one model runs at a time or the models are not counted."""
    if models_max < 2:
        return None
    return max(1, len(os.sched_getaffinity(0)) // models_max)


def http_connections(options: dict[str, str]) -> int:
    """How many requests the router forwards to a child at once: llama-server's fixed HTTP threads
    (--threads-http, else max(slots + 4, cores - 1)) less two, kept for /health and /metrics. Each
    thread serves one connection while it is kept alive; a connection past them waits for a spare
    thread that cpp-httplib may not start, behind an idle kept-alive one, for up to 5 s."""
    try:
        threads = int(options.get("threads-http", -1))
        slots = int(options.get("np", options.get("parallel", -1)))
    except ValueError:
        threads = slots = -1
    if threads < 1:
        threads = max((slots if slots > 0 else 4) + 4, (os.cpu_count() or 1) - 1)
    return max(threads - 2, 1)


def _option_names(section: Section) -> dict[str, str]:
    """Every name of every option set (`c` and `ctx-size` ...), as the estimate looks them up."""
    return {name.lstrip("-"): value for option, value, _ in section.options.values() for name in option.names}


def _memory(file: ModelFile, options: dict[str, str], gpu: bool,
            cache_ram: bool) -> tuple[MemoryEstimate | None, list[str]]:
    """The estimate, and the options the router adds to bound what it does not count
    (`options`: the child's, by every name, as the estimate reads them; `cache_ram`: whether this
    llama-server has the option)."""
    if file.info is None:
        return None, []
    memory = estimate(file.info, options, file.info.tensor_bytes + shard_bytes(file.path, file.info.split_count), gpu)
    if "cache-ram" in options or not cache_ram:
        return memory, []
    cache_mib = -(-max(memory.kv_cache, PROMPT_CACHE_MIN) // MiB)
    return replace(memory, prompt_cache=cache_mib * MiB), ["--cache-ram", str(cache_mib)]


def _preset_text(model_id: str, file: ModelFile, section: Section) -> str:
    lines = [f"[{model_id}]", f"model = {file.path}"]
    lines += [f"{flag.lstrip('-')} = {value}" for flag, (_, value, _) in section.options.items()]
    lines += [f"{key} = {value.text}" for key, (_, value) in section.router.items()]
    return "\n".join(lines) + "\n\n"


def _set(section: Section, table: OptionTable, name: str, value: str) -> None:
    found = table.lookup(name)
    if found is not None:  # (an older llama-server may lack --fit: it fits nothing then)
        section.options[found[0].flag] = (found[0], value, Value(value, Path("the router"), 0))


def _placement(model_id: str, file: ModelFile, section: Section, table: OptionTable,
               devices: dict[str, Device]) -> list[str]:
    """The devices the model may run on (none: the host alone), and its options set so that it
    starts with what was admitted: with --fit off (unless its preset says fit = on), llama-server
    would otherwise fit the context and layers it was not told to whatever memory is free then.
    Its own --device is taken out: the router places it. One that runs on the host alone gets
    --device none, so that it takes nothing on a device behind the budgets' back (llama-server
    would compute on a GPU even with no layers there)."""
    named = section.options.pop("--device", None)
    layers = section.options.get("--n-gpu-layers")
    if (named and named[1].strip().lower() == "none") or (layers and layers[1].strip() in ("0", "0.0")):
        _set(section, table, "device", "none")
        return []
    if named:
        wanted = [name.strip() for name in named[1].split(",") if name.strip()]
        by_name = {d.name.lower(): d.id for d in devices.values() if not d.rpc}
        unknown = [name for name in wanted if name not in devices and name.lower() not in by_name]
        if unknown:
            raise ConfigError(named[2].where, f"[{model_id}] device = {named[1]}: no device {unknown[0]!r}; the "
                              f"router's devices are {', '.join(devices)} (an RPC device by its endpoint), or none")
        candidates = [name if name in devices else by_name[name.lower()] for name in wanted]
    else:
        candidates = list(devices)
    fit = section.options.get("--fit")
    if fit is None or fit[1] == "off":
        _set(section, table, "fit", "off")
        if layers is None or layers[1] == "auto":
            _set(section, table, "n-gpu-layers", "999")  # all (a number: older builds lack `all`)
        if "--ctx-size" not in section.options and file.info is not None and file.info.context_length:
            _set(section, table, "ctx-size", str(file.info.context_length))
    return candidates


def build(settings: Settings, discovery: Discovery, presets: Presets, cli: Section,
          runtime_dir: Path, devices: dict[str, Device] | None = None, busy: frozenset[str] = frozenset()) -> Catalog:
    """Blocking: run it in a thread from async code. `devices`: the router's, by id (devices.py);
    `busy`: RPC devices a child holds, which would keep a question waiting."""
    devices = devices or {}
    files = discovery.scan()
    warnings: list[str] = []
    hf_paths: dict[str, dict[str, Path]] = {}  # preset -> {hf key: the cache file it resolved to}
    unfetched: dict[str, str] = {}
    for name, section in presets.models.items():
        if "hf-repo" in section.hf:
            if section.model is not None:
                raise ConfigError(section.model.where, f"[{name}] names its file twice: keep model = or hf-repo =")
            try:
                path, mmproj = _from_cache(section, "hf-repo", settings.hf_cache)
            except ConfigError:
                # As llama.cpp does, a repository not cached is downloaded when the model is first
                # loaded; offline, or with an hf-file (a download takes a quant), it is an error.
                if settings.offline or settings.hf_cache is None or "hf-file" in section.hf:
                    raise
                unfetched[name] = section.hf["hf-repo"].text
                continue
            hf_paths.setdefault(name, {})["hf-repo"] = path
            described = discovery.describe(name, path, "preset", mmproj)
        elif section.model is not None:
            path = Path(section.model.text).expanduser()
            if not path.is_absolute():
                path = (settings.models_dir or section.model.path.parent) / path
            described = discovery.describe(name, path, "preset", None)
        else:
            if name not in files:
                warnings.append(f"preset [{name}] matches no model in the models dir (and sets no model = PATH)")
            continue
        if described is not None:
            files[name] = described

    models: dict[str, ModelConfig] = {}
    gpu = has_gpu(settings.llama_server)
    table = options_of(settings.llama_server)
    cache_ram = table.lookup("cache-ram") is not None
    fit_params = settings.llama_server.with_name("llama-fit-params")
    for model_id, file in files.items():
        section = presets.for_model(model_id)
        effective = Section({**section.options, **cli.options}, section.router, section.model)
        if "spec-draft-hf" in section.hf:
            draft, _ = _from_cache(section, "spec-draft-hf", settings.hf_cache)
            hf_paths.setdefault(model_id, {})["spec-draft-hf"] = draft
            option, _ = table.lookup("LLAMA_ARG_SPEC_DRAFT_MODEL")
            effective.options.setdefault(option.flag, (option, str(draft), section.hf["spec-draft-hf"]))
        # A preset's own --rpc runs on its own devices, outside the router's budgets.
        candidates = (_placement(model_id, file, effective, table, devices)
                      if devices and "--rpc" not in effective.options else [])
        names = _option_names(effective)
        if file.mmproj and "mmproj" not in names:
            names["mmproj"] = str(file.mmproj)
        if candidates and "ngl" not in names:
            names["ngl"] = "999"  # fit = on: llama-server decides the layers; all are counted on the device
        memory, added = _memory(file, names, gpu or bool(candidates), cache_ram)
        projections = {}
        if memory is not None:
            projections = {d: project(fit_params, file.path, names, devices[d], memory, d not in busy)
                           for d in candidates}
            measured = next((p for p in projections.values() if p.source == "llama-fit-params"), None)
            if measured is not None:
                # The host keeps the weights llama-fit-params says, not our even split by layer: the
                # token embeddings stay there, and a tied output matrix is loaded twice (host and device).
                off_host = max(memory.weights - measured.host_model, 0)
                memory = replace(memory, device=memory.device - memory.device_weights + off_host,
                                 device_weights=off_host)
        if "threads" not in names and (share := thread_share(settings.models_max)) is not None:
            added += ["--threads", str(share)]
        socket = socket_path(runtime_dir, model_id)
        argv = [str(settings.llama_server), *to_argv(effective),
                # --metrics: the router's /metrics includes each loaded child's own figures.
                "--host", str(socket), "--alias", model_id, "--metrics", *added, "--model", str(file.path)]
        if file.mmproj and "--mmproj" not in effective.options:
            argv += ["--mmproj", str(file.mmproj)]
        router = {key: parsed for key, (parsed, _) in effective.router.items()}
        health_timeout = router.get("health-timeout", settings.health_timeout)
        launch = LaunchSpec(
            model_id=model_id, argv=tuple(argv), socket=socket,
            stop_timeout=router.get("stop-timeout", settings.stop_timeout),
            environment=router.get("environment", ()),
            limits={prop: router[key] for key, prop in UNIT_LIMITS.items() if key in router},
            devices=router.get("devices", ()), stall_timeout=health_timeout,
            network="--rpc" in effective.options or any(devices[d].rpc for d in candidates))
        models[model_id] = ModelConfig(
            file=file, launch=launch, aliases=router.get("alias", ()),
            load_on_startup=router.get("load-on-startup", False),
            preset_text=_preset_text(model_id, file, effective), memory=memory,
            pinned=router.get("pin", False), ttl=router.get("ttl", settings.models_ttl),
            health_timeout=health_timeout, connections=http_connections(names), projections=projections,
            places={d: devices[d].child_args() for d in projections})
    _check_aliases(models, presets, warnings)
    _check_pinned(models, presets, settings.budget_bytes())
    _hide_deduplicated(models, presets, hf_paths)
    return Catalog(models, tuple(warnings), unfetched)


def _from_cache(section: Section, key: str, root: Path | None) -> tuple[Path, Path | None]:
    """The cache file (and mmproj) a preset's hf-repo or spec-draft-hf names; ConfigError if absent."""
    value = section.hf[key]
    hf_file = section.hf["hf-file"].text if key == "hf-repo" and "hf-file" in section.hf else ""
    found = hfcache.resolve(root, value.text, hf_file) if root else None
    if found is None:
        what = f"{value.text} (hf-file {hf_file})" if hf_file else value.text
        raise ConfigError(value.where, f"{key} = {what} is not in the Hugging Face cache {root or '(hf-cache is off)'}; "
                          f"fetch it into that cache first: gguf-router pull {value.text}")
    return found


def _hide_deduplicated(models: dict[str, ModelConfig], presets: Presets, hf_paths: dict[str, dict[str, Path]]) -> None:
    """dedup-cache-models: the cache entries behind a preset's hf-repo and spec-draft-hf leave
    the model list (they are the same files under another name) but can still be asked for."""
    used = {path for name, paths in hf_paths.items()
            if presets.for_model(name).router.get("dedup-cache-models", (False,))[0] for path in paths.values()}
    for model_id, config in models.items():
        if config.file.source == "cache" and config.file.path in used:
            models[model_id] = replace(config, hidden=True)


def _check_pinned(models: dict[str, ModelConfig], presets: Presets, budget: int | None) -> None:
    """Pinned models are never stopped to make room, so together they must fit the budget."""
    pinned = [c for c in models.values() if c.pinned and c.memory is not None]
    need = sum(c.memory.host for c in pinned)
    if budget is not None and need > budget:
        where = presets.for_model(pinned[-1].id).router["pin"][1].where
        names = ", ".join(f"{c.id} ({size_text(c.memory.host)})" for c in pinned)
        raise ConfigError(where, f"the pinned models need {size_text(need)} together, more than the memory budget "
                          f"of {size_text(budget)}: {names}")


def _check_aliases(models: dict[str, ModelConfig], presets: Presets, warnings: list[str]) -> None:
    """Two presets claiming one alias is a config error; an alias that a model file's id took
    later (a file copied in) is dropped with a warning, so new files never break the config."""
    owner: dict[str, str] = {}
    for model_id, config in list(models.items()):
        kept = []
        for alias in config.aliases:
            if alias in owner and owner[alias] != model_id:
                where = presets.for_model(model_id).router["alias"][1].where
                raise ConfigError(where, f"alias {alias!r} of [{model_id}] is already an alias of [{owner[alias]}]")
            if alias in models and alias != model_id:
                warnings.append(f"alias {alias!r} of [{model_id}] is ignored: a model has that id")
                continue
            owner[alias] = model_id
            kept.append(alias)
        if tuple(kept) != config.aliases:
            models[model_id] = replace(config, aliases=tuple(kept))
