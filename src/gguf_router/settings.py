"""The router's settings, parsed once in `cli.main` and read everywhere else.

Precedence: command line > environment (GGUF_ROUTER_*) > defaults. The command line reaches
pydantic-settings as init arguments, which it ranks above the environment.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gguf-router"
# Where scripts/build-llama-server puts its build; used when no other binary is named.
BUILT_LLAMA_SERVER = CACHE_DIR / "llama-server-b11434" / "bin" / "llama-server"

# Options the router sets on every child itself; given by the user they would break routing.
RESERVED_CHILD_OPTIONS = frozenset(
    {"-m", "--model", "--host", "--port", "-a", "--alias", "--models-dir", "--models-max",
     "--models-preset", "--no-models-autoload", "--models-autoload", "-hf", "--hf-repo"}
)


def default_llama_server() -> Path:
    if BUILT_LLAMA_SERVER.exists():
        return BUILT_LLAMA_SERVER
    found = shutil.which("llama-server")
    return Path(found) if found else BUILT_LLAMA_SERVER


def default_hf_cache() -> Path | None:
    """llama.cpp's own search order for the Hugging Face hub cache it downloads into."""
    env = os.environ
    for var, sub in (("LLAMA_CACHE", ""), ("HF_HUB_CACHE", ""), ("HUGGINGFACE_HUB_CACHE", ""),
                     ("HF_HOME", "hub"), ("XDG_CACHE_HOME", "huggingface/hub")):
        if env.get(var):
            return Path(env[var]) / sub
    return Path.home() / ".cache" / "huggingface" / "hub"


def default_runtime_dir() -> Path:
    # systemd's RuntimeDirectory= hands us a private folder; otherwise make one (mode 0700).
    if os.environ.get("RUNTIME_DIRECTORY"):
        return Path(os.environ["RUNTIME_DIRECTORY"].split(":")[0])
    return Path(tempfile.mkdtemp(prefix="gguf-router-"))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GGUF_ROUTER_", frozen=True, extra="forbid")

    models_dir: Path | None = None
    models_max: int = Field(4, ge=0, description="models loaded at once; 0 = unlimited")
    models_autoload: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    # Comma-separated in the environment, like llama-server's LLAMA_API_KEY.
    api_keys: Annotated[tuple[str, ...], NoDecode] = ()
    llama_server: Path = Field(default_factory=default_llama_server)
    child_args: tuple[str, ...] = ()
    stop_timeout: float = Field(10.0, gt=0)
    hf_cache: Path | None = Field(default_factory=default_hf_cache)
    runtime_dir: Path = Field(default_factory=default_runtime_dir)
    log_level: str = "INFO"
    # journald stamps every line itself; a terminal wants the time in the line.
    log_timestamps: bool = Field(default_factory=lambda: "JOURNAL_STREAM" not in os.environ)

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value):
        if isinstance(value, str):
            value = value.split(",")
        return tuple(k.strip() for k in value if k and k.strip())

    @field_validator("child_args")
    @classmethod
    def _no_reserved(cls, value):
        for arg in value:
            if arg.split("=", 1)[0] in RESERVED_CHILD_OPTIONS:
                raise ValueError(f"{arg} is set by the router for each model and cannot be passed to children")
        return value

    @field_validator("log_level")
    @classmethod
    def _level(cls, value):
        value = value.upper()
        if value not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError(f"unknown log level {value!r}: use debug, info, warning or error")
        return value
