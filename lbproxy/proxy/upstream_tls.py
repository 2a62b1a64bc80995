"""TLS from the proxy to a group's servers: the client ``ssl.SSLContext`` built from a group's
``tls`` section, the TLS sessions it resumes, and why a handshake to a server failed.

Owns:
- ``load``: the files of a group's ``tls`` read and checked (a ConfigError-worthy TlsError
  otherwise) and the context built; ``context`` keeps one per distinct section (its files'
  digest is part of it, so a renewed file builds a new one; connections open keep theirs);
- ``BackendContext``: a client context that offers, on each new connection, the TLS session
  the last connection to the same server left (``remember``), so a new connection to a
  server seen before resumes instead of doing a full handshake. Which server a handshake is
  for travels in a ContextVar the connect sets (``for_server``): the event loop creates the
  SSL object in the connect's own context, after the TCP connect, and knows only the name;
- ``failure_reason``: a failed handshake's label in
  ``lbproxy_backend_tls_handshake_failures_total``.
"""

from __future__ import annotations

import hashlib
import ssl
from contextvars import ContextVar
from typing import Any, Protocol

__all__ = [
    "BackendContext",
    "TlsError",
    "context",
    "describe",
    "failure_reason",
    "for_server",
    "load",
]

# Which server the handshake under way in this context is for (its "host:port").
_SERVER: ContextVar[str | None] = ContextVar("lbproxy_backend_tls_server", default=None)
SESSIONS_MAX = 10_000  # servers whose last session is kept, per context


class TlsError(ValueError):
    """A CA, certificate or key file that cannot be used; the message says which and why."""


class Settings(Protocol):
    """A group's ``tls`` section as read here (config.groups.BackendTls)."""

    @property
    def ca(self) -> str | None: ...
    @property
    def verify(self) -> bool: ...
    @property
    def cert(self) -> str | None: ...
    @property
    def key(self) -> str | None: ...
    @property
    def min_version(self) -> str: ...
    @property
    def ciphers(self) -> str | None: ...


class BackendContext(ssl.SSLContext):
    """A client context that resumes each server's last TLS session."""

    sessions: dict[str, ssl.SSLSession]

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        if session is None and not server_side:
            key = _SERVER.get()
            if key is not None:
                session = self.sessions.get(key)
        return super().wrap_bio(incoming, outgoing, server_side, server_hostname, session)

    def remember(self, key: str, ssl_object: Any) -> None:
        """Keep ``ssl_object``'s session for the next connection to the server ``key``."""
        if ssl_object is None:
            return
        try:
            session = ssl_object.session
        except (AttributeError, ValueError):
            return
        if session is None:
            return
        sessions = self.sessions
        if key not in sessions and len(sessions) >= SESSIONS_MAX:
            sessions.pop(next(iter(sessions)))
        sessions[key] = session


def for_server(key: str) -> None:
    """Say, in the current context (a connect's task), which server the next handshake is for."""
    _SERVER.set(key)


def load(t: Settings) -> tuple[BackendContext, str]:
    """The client context for a group's ``tls`` (its file paths as they are) and the sha256
    of the files it read; raises TlsError."""
    h = hashlib.sha256()
    ctx = BackendContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.sessions = {}
    v = ssl.TLSVersion
    ctx.minimum_version = v.TLSv1_3 if t.min_version == "1.3" else v.TLSv1_2
    if t.ciphers:
        try:
            ctx.set_ciphers(t.ciphers)
        except ssl.SSLError:
            raise TlsError(f"no cipher OpenSSL knows in {t.ciphers!r}") from None
    if t.verify:
        if t.ca is not None:
            h.update(_read(t.ca, "CA") + b"\0")
            try:
                ctx.load_verify_locations(cafile=t.ca)
            except (ssl.SSLError, OSError) as exc:
                raise TlsError(f"CA {t.ca} cannot be loaded: {_why(exc)}") from None
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if t.cert is not None and t.key is not None:
        h.update(_read(t.cert, "certificate") + b"\0" + _read(t.key, "key") + b"\0")
        try:
            ctx.load_cert_chain(t.cert, t.key)
        except (ssl.SSLError, OSError) as exc:
            raise TlsError(
                f"cannot load certificate {t.cert} with key {t.key}: {_why(exc)}"
            ) from None
    return ctx, h.hexdigest()


def _why(exc: Exception) -> str:
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or exc)
    if isinstance(exc, OSError):
        return (exc.strerror or str(exc)).lower()
    return str(exc)


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise TlsError(f"cannot read {what} {path}: {_why(exc)}") from None
    marker = b"PRIVATE KEY-----" if what == "key" else b"-----BEGIN CERTIFICATE-----"
    if marker not in data:
        raise TlsError(f"{what} {path} is not PEM")
    return data


_contexts: dict[object, BackendContext] = {}


def context(t: Settings) -> BackendContext:
    """The context for ``t`` (a frozen section with its files' digest: one per distinct
    section and file contents), built the first time it is asked for. The loader built it
    once already, so a file that went bad since fails here as a TlsError."""
    ctx = _contexts.get(t)
    if ctx is None:
        if len(_contexts) > 64:  # sections of configs long gone
            _contexts.clear()
        ctx = _contexts[t] = load(t)[0]
    return ctx


def failure_reason(exc: BaseException) -> str:
    """Why a handshake to a server failed: one of metrics.BACKEND_TLS_FAILURE_REASONS."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "verify"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or ""
        if "CERTIFICATE" in reason or "UNKNOWN_CA" in reason:
            return "certificate"  # the server refused ours (mutual TLS)
        if "VERSION" in reason or "CIPHER" in reason or "HANDSHAKE_FAILURE" in reason:
            return "protocol"
        return "other"
    if isinstance(exc, ConnectionResetError | ConnectionAbortedError | EOFError):
        return "reset"
    return "other"


def describe(exc: BaseException) -> str:
    """A failed handshake's reason for the log: OpenSSL's words, without its file and line."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or exc).lower().replace("_", " ")
    if isinstance(exc, ConnectionResetError | ConnectionAbortedError | EOFError):
        return "the server closed the connection (did it want a client certificate?)"
    return str(exc) or type(exc).__name__
