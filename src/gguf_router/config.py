"""One immutable snapshot of the configuration: settings, presets, the children's command-line
options and the keys, as read together at start or by a reload. A reload builds a new one
and swaps it in with one assignment, so no request ever sees half of each."""

from __future__ import annotations

import socket
from dataclasses import dataclass

from .catalog import read_presets
from .keys import Keyring
from .presets import Presets, Section
from .settings import Settings


@dataclass(frozen=True)
class Config:
    settings: Settings
    presets: Presets
    child_options: Section  # the router's command-line options for every child
    keys: Keyring  # named keys and the bare ones, each with its role
    served_names: frozenset[str]  # host names a keyless router answers for, beside addresses and localhost


def served_names(settings: Settings) -> frozenset[str]:
    names = {socket.gethostname().lower(), settings.host.lower(), *(n.lower() for n in settings.server_names)}
    return frozenset(n for n in names if n)


def load_config(settings: Settings) -> Config:
    """Blocking (runs llama-server --help, reads files); raises ConfigError for anything bad.
    The TLS certificate is checked where it is loaded (tls.py), not here."""
    presets, child_options = read_presets(settings)
    return Config(settings, presets, child_options, settings.keyring(), served_names(settings))
