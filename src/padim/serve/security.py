"""Who may use the service: the bearer token, the loopback check, TLS files.

Standard library only, so ``padim serve`` can refuse an unsafe start before it loads the model or
imports the web framework.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

TOKEN_ENV = "PADIM_SERVE_TOKEN"
MIN_TOKEN_LENGTH = 16
SET_TOKEN = f"set {TOKEN_ENV} or pass --token-file FILE"
MAKE_TOKEN = "make a token with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
HOW_TO_SET = f"{SET_TOKEN}; {MAKE_TOKEN}"


class ServeConfigError(ValueError):
    """A start-up setting the service refuses; the message is one line for the operator."""


@dataclass(frozen=True)
class ServeSecurity:
    """The checked security settings of one server: token (None = open), TLS files, start-up warnings."""

    token: str | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    warnings: list[str] = field(default_factory=list)


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost'; any other name or address counts as reachable."""
    name = host.strip().strip("[]").rstrip(".").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to a public interface


def _checked(token: str, source: str) -> str:
    if len(token) < MIN_TOKEN_LENGTH:
        raise ServeConfigError(f"the token from {source} has {len(token)} characters, fewer than "
                               f"{MIN_TOKEN_LENGTH}; {HOW_TO_SET}")
    if any(not ("!" <= c <= "~") for c in token):
        # it travels in an HTTP header: printable ASCII without spaces only
        raise ServeConfigError(f"the token from {source} holds spaces or characters outside printable ASCII; "
                               f"{HOW_TO_SET}")
    return token


def read_token(token_file: Path | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """The token from ``token_file`` (first line, surrounding whitespace dropped), else from
    ``$PADIM_SERVE_TOKEN``; None when neither is set. Raises ServeConfigError for an unusable one."""
    if token_file is not None:
        try:
            lines = Path(token_file).read_text(encoding="utf-8").strip().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ServeConfigError(f"cannot read the token file {token_file}: "
                                   f"{getattr(exc, 'strerror', None) or exc}") from None
        if not lines:
            raise ServeConfigError(f"the token file {token_file} is empty; {HOW_TO_SET}")
        return _checked(lines[0].strip(), str(token_file))
    value = environ.get(TOKEN_ENV, "").strip()
    return _checked(value, TOKEN_ENV) if value else None


def resolve_security(host: str, token_file: Path | None = None, allow_unauthenticated: bool = False,
                     ssl_certfile: Path | None = None, ssl_keyfile: Path | None = None,
                     environ: Mapping[str, str] = os.environ) -> ServeSecurity:
    """Check the start-up settings; raises ServeConfigError for a start the service refuses."""
    token = read_token(token_file, environ)
    if (ssl_certfile is None) != (ssl_keyfile is None):
        raise ServeConfigError("TLS needs both --ssl-certfile and --ssl-keyfile")
    for option, path in (("--ssl-certfile", ssl_certfile), ("--ssl-keyfile", ssl_keyfile)):
        if path is not None and not Path(path).is_file():
            raise ServeConfigError(f"{option} {path}: no such file")
    if ssl_certfile is not None:
        try:  # here, so a bad pair is one line at start, not a traceback from inside uvicorn
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                ssl_certfile, ssl_keyfile, password=lambda: b"")  # no prompt for an encrypted key
        except (ssl.SSLError, OSError) as exc:
            raise ServeConfigError(f"cannot use {ssl_certfile} and {ssl_keyfile} for TLS: {exc}") from None
    warnings = []
    if not is_loopback(host):
        if token is None and not allow_unauthenticated:
            raise ServeConfigError(f"refusing to listen on {host} without a token: {SET_TOKEN} "
                                   f"(--allow-unauthenticated serves anyone who can reach the port); {MAKE_TOKEN}")
        if token is None:
            warnings.append(f"listening on {host} WITHOUT authentication (--allow-unauthenticated): anyone who "
                            "can reach the port can use the model")
        elif ssl_certfile is None:
            warnings.append(f"listening on {host} without TLS: the token crosses the network in clear text "
                            "(--ssl-certfile/--ssl-keyfile)")
    return ServeSecurity(token, ssl_certfile, ssl_keyfile, warnings)


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header value; None for any other value."""
    if not authorization:
        return None
    scheme, _, credentials = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        return None
    return credentials.strip()


def token_matches(presented: str | None, expected: str) -> bool:
    """Constant-time comparison; hashing first keeps the time independent of the lengths too."""
    if presented is None:
        return False
    digest = hashlib.sha256
    return hmac.compare_digest(digest(presented.encode("utf-8", "surrogateescape")).digest(),
                               digest(expected.encode("utf-8")).digest())
