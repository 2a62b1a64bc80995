"""TLS of https listeners: the server ``ssl.SSLContext`` built from a listener's PEM files.

Owns how a certificate chain and key become a context (TLS 1.2 and up, ALPN ``h2`` and
``http/1.1`` or the latter only, no client-initiated renegotiation) and how a failure to
load them reads in a config error.
``config`` loads them once when a config is loaded, to refuse a bad pair and to notice a
renewed certificate; ``listener`` builds the context each https listener hands to the
connections it accepts, a new one whenever the files changed.
"""

from __future__ import annotations

import hashlib
import ssl


def alpn(http2: bool) -> list[str]:
    """The ALPN protocols a listener offers, preferred first (the server's order wins)."""
    return ["h2", "http/1.1"] if http2 else ["http/1.1"]


class TlsError(ValueError):
    """A certificate or key that cannot be used; the message says which and why."""


def load(cert: str, key: str, http2: bool = False) -> tuple[ssl.SSLContext, str]:
    """A server context for the certificate chain ``cert`` and private key ``key`` (PEM),
    and the sha256 of both files' bytes; ALPN offers ``h2`` first with ``http2``.
    Raises TlsError."""
    h = hashlib.sha256()
    for path, what, marker in (
        (cert, "certificate", b"-----BEGIN CERTIFICATE-----"),
        (key, "key", b"PRIVATE KEY-----"),
    ):
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            reason = (exc.strerror or str(exc)).lower()
            raise TlsError(f"cannot read {what} {path}: {reason}") from None
        if marker not in data:
            raise TlsError(f"{what} {path} is not a PEM {what}")
        h.update(data)
        h.update(b"\0")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_RENEGOTIATION  # client-initiated renegotiation: a CPU sink
    ctx.set_alpn_protocols(alpn(http2))
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        reason = exc.reason or str(exc)
        if reason in ("KEY_VALUES_MISMATCH", "NO_CERTIFICATE_ASSIGNED"):
            raise TlsError(f"the key {key} does not belong to the certificate {cert}") from None
        raise TlsError(f"cannot load certificate {cert} with key {key}: {reason}") from None
    except OSError as exc:  # the files changed under us
        reason = (exc.strerror or str(exc)).lower()
        raise TlsError(f"cannot load certificate {cert} with key {key}: {reason}") from None
    return ctx, h.hexdigest()
