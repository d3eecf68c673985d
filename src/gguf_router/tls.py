"""TLS for the router's own sockets (tls-cert-file, tls-key-file), with certificates that a reload
swaps in: new connections get the new certificate, open ones keep theirs."""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

from sanic.http.tls.context import create_context

from .ini import ConfigError
from .settings import Settings

log = logging.getLogger(__name__)


def _load(context: ssl.SSLContext, cert: Path, key: Path) -> None:
    for path in (cert, key):
        try:
            path.read_bytes()
        except OSError as exc:
            raise ConfigError(str(path), f"cannot be read: {exc.strerror}") from None
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise ConfigError(f"{cert}, {key}", f"not a certificate and its private key in PEM: {exc.reason or exc}") from None


def server_context(settings: Settings) -> ssl.SSLContext | None:
    """The context every socket serves with, or None without TLS. Raises ConfigError."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    # Sanic's defaults: TLS 1.2 and up, forward-secret AEAD ciphers only, HTTP/1.1.
    context = create_context()
    _load(context, settings.tls_cert_file, settings.tls_key_file)
    return context


def check(settings: Settings) -> None:
    """Raises ConfigError when the settings' certificate and key would not load."""
    server_context(settings)


def refresh(context: ssl.SSLContext | None, settings: Settings) -> None:
    """Loads the (checked) certificate again into the live context after a reload."""
    wanted = settings.tls_cert_file is not None
    if (context is not None) != wanted:
        log.warning("TLS was turned %s in the config; that takes effect when the router restarts",
                    "on" if wanted else "off")
    elif context is not None:
        _load(context, settings.tls_cert_file, settings.tls_key_file)
        log.info("TLS certificate reloaded from %s", settings.tls_cert_file)
