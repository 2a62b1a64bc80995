"""TLS of https listeners: the server ``ssl.SSLContext`` built from a listener's ``tls`` section.

Owns everything about how TLS is spoken to clients:
- the named security policies (Alibaba CLB's names) as protocol versions and cipher lists;
- a listener's certificates (several allowed) as one context per certificate, all with the
  same settings (ALPN included: ``h2`` then ``http/1.1``, or the latter only, whichever
  certificate SNI picks), and the choice among them by the client's SNI (``Sni``);
- client-certificate verification (mutual TLS) and the headers that tell a backend who the
  verified client is (``client_cert_headers``);
- the words a failed load or a failed handshake reads in (``TlsError``, ``failure_reason``).
``config`` loads a listener's files once when a config is loaded, to refuse bad ones and to
notice a renewed file; ``listener`` builds the context each https listener hands to the
connections it accepts, a new one whenever the files or settings changed.
"""

from __future__ import annotations

import hashlib
import ssl
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from cryptography import x509
from cryptography.x509.oid import NameOID

from ..config.model import TLS_POLICIES


@dataclass(frozen=True, slots=True)
class Policy:
    minimum: ssl.TLSVersion
    maximum: ssl.TLSVersion
    # OpenSSL cipher string for TLS 1.2 and below ("" keeps Python's default list). TLS 1.3
    # suites are OpenSSL's defaults: Python has no call to choose them.
    ciphers: str


_ECDHE_RSA = (
    "ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-AES256-GCM-SHA384:ECDHE-RSA-AES128-SHA256:"
    "ECDHE-RSA-AES256-SHA384:ECDHE-RSA-AES128-SHA:ECDHE-RSA-AES256-SHA"
)
# CLB lists ECDSA suites under its 1_2_strict_with_1_3 policy only (its certificates were RSA
# under the others); lbproxy adds them everywhere, so an ECDSA certificate works under every
# policy, with the same strength as the RSA suite beside it.
_ECDHE_ECDSA = _ECDHE_RSA.replace("ECDHE-RSA-", "ECDHE-ECDSA-")
_STATIC_RSA = (
    "AES128-GCM-SHA256:AES256-GCM-SHA384:AES128-SHA256:AES256-SHA256:AES128-SHA:AES256-SHA:"
    "DES-CBC3-SHA"
)
_ALL = f"{_ECDHE_RSA}:{_ECDHE_ECDSA}:{_STATIC_RSA}"
_STRICT = f"{_ECDHE_RSA}:{_ECDHE_ECDSA}"
# OpenSSL 3 refuses TLS 1.0 and 1.1 above security level 0 (their handshake signs with
# MD5+SHA-1); level 0 also lifts the minimum key sizes, which is the price of those versions.
_LEGACY = ":@SECLEVEL=0"
_V = ssl.TLSVersion

POLICIES: dict[str, Policy] = {
    "tls_cipher_policy_1_0": Policy(_V.TLSv1, _V.TLSv1_2, _ALL + _LEGACY),
    "tls_cipher_policy_1_1": Policy(_V.TLSv1_1, _V.TLSv1_2, _ALL + _LEGACY),
    "tls_cipher_policy_1_2": Policy(_V.TLSv1_2, _V.TLSv1_2, _ALL),
    "tls_cipher_policy_1_2_strict": Policy(_V.TLSv1_2, _V.TLSv1_2, _STRICT),
    "tls_cipher_policy_1_2_strict_with_1_3": Policy(_V.TLSv1_2, _V.TLSv1_3, _STRICT),
}
assert tuple(POLICIES) == TLS_POLICIES, "the config's policy names are these"
DEFAULT_POLICY = Policy(_V.TLSv1_2, _V.MAXIMUM_SUPPORTED, "")  # no ``policy``: TLS 1.2 and up

# Headers a verified client certificate becomes. Always removed from what clients send.
SUBJECT_HEADER = b"X-Client-Cert-Subject"
FINGERPRINT_HEADER = b"X-Client-Cert-Fingerprint"
# OpenSSL's reasons for a handshake that found no version or cipher both sides accept.
_PROTOCOL_REASONS = frozenset(
    {
        "UNSUPPORTED_PROTOCOL",
        "NO_SHARED_CIPHER",
        "NO_PROTOCOLS_AVAILABLE",
        "VERSION_TOO_LOW",
        "VERSION_TOO_HIGH",
        "WRONG_VERSION_NUMBER",
        "NO_CIPHERS_AVAILABLE",
        "NO_SUITABLE_SIGNATURE_ALGORITHM",
        "TLSV1_ALERT_PROTOCOL_VERSION",
        "TLSV1_ALERT_INSUFFICIENT_SECURITY",
        "SSLV3_ALERT_HANDSHAKE_FAILURE",
    }
)
_CLIENT_CERT_REASONS = frozenset({"PEER_DID_NOT_RETURN_A_CERTIFICATE", "CERTIFICATE_VERIFY_FAILED"})


def alpn(http2: bool) -> list[str]:
    """The ALPN protocols a listener offers, preferred first (the server's order wins)."""
    return ["h2", "http/1.1"] if http2 else ["http/1.1"]


class TlsError(ValueError):
    """A certificate, key or CA file that cannot be used; the message says which and why."""


@dataclass(frozen=True, slots=True)
class Loaded:
    """A listener's TLS, ready: the context to accept with (its SNI callback picks among the
    certificates), and the sha256 of every file read."""

    context: ssl.SSLContext
    digest: str
    names: tuple[tuple[str, ...], ...]  # each certificate's DNS names, in config order
    not_after: tuple[float, ...] = ()  # each certificate's expiry (Unix seconds), in order


class CertificateFiles(Protocol):
    """A certificate chain file and its key's (config.Certificate)."""

    @property
    def cert(self) -> str: ...
    @property
    def key(self) -> str: ...


class Settings(Protocol):
    """A listener's ``tls`` section as ``load`` reads it (config.Tls; config sits above this
    module, which it asks to load the files)."""

    @property
    def certificates(self) -> Sequence[CertificateFiles]: ...
    @property
    def policy(self) -> str | None: ...
    @property
    def client_ca(self) -> str | None: ...
    @property
    def client_auth(self) -> str | None: ...


def load(t: Settings, http2: bool = False) -> Loaded:
    """The server context for a listener's ``tls`` (its file paths as they are): every
    certificate (the first is the default), the policy (None: TLS 1.2 and up, Python's
    ciphers) and, with ``client_auth``, client certificates verified against ``client_ca``;
    every certificate's context offers ALPN ``h2`` first with ``http2``. Raises TlsError."""
    if not t.certificates:
        raise TlsError("no certificate")
    h = hashlib.sha256()
    pol = DEFAULT_POLICY if t.policy is None else POLICIES[t.policy]
    client_auth, client_ca = t.client_auth, t.client_ca
    if client_auth is not None:
        if client_ca is None:
            raise TlsError("client_auth needs client_ca")
        h.update(_read(client_ca, "client CA", b"-----BEGIN CERTIFICATE-----") + b"\0")
    contexts: list[ssl.SSLContext] = []
    names: list[tuple[str, ...]] = []
    not_after: list[float] = []
    for cert, key in ((c.cert, c.key) for c in t.certificates):
        cert_pem = _read(cert, "certificate", b"-----BEGIN CERTIFICATE-----")
        key_pem = _read(key, "key", b"PRIVATE KEY-----")
        h.update(cert_pem + b"\0" + key_pem + b"\0")
        cert_names, expiry = _names(cert, cert_pem)
        names.append(cert_names)
        not_after.append(expiry)
        contexts.append(_context(cert, key, pol, client_auth, client_ca, http2))
    if len(contexts) > 1:
        contexts[0].sni_callback = Sni(contexts, names)
    return Loaded(contexts[0], h.hexdigest(), tuple(names), tuple(not_after))


def _read(path: str, what: str, marker: bytes) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        reason = (exc.strerror or str(exc)).lower()
        raise TlsError(f"cannot read {what} {path}: {reason}") from None
    if marker not in data:
        kind = "certificate" if what == "client CA" else what
        raise TlsError(f"{what} {path} is not a PEM {kind}")
    return data


def _names(path: str, pem: bytes) -> tuple[tuple[str, ...], float]:
    """The DNS names a certificate (the first of a chain) serves: its subjectAltName DNS
    entries, or its subject CN when it has none (as HAProxy reads a certificate list); and
    when it expires (notAfter, Unix seconds)."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            dns = san.value.get_values_for_type(x509.DNSName)
        except x509.ExtensionNotFound:
            dns = []
        if not dns:
            dns = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    except ValueError as exc:
        raise TlsError(f"certificate {path} cannot be read: {exc}") from None
    expiry = cert.not_valid_after_utc.timestamp()
    return tuple(dict.fromkeys(n.lower().rstrip(".") for n in dns)), expiry


def _context(
    cert: str,
    key: str,
    pol: Policy,
    client_auth: str | None,
    client_ca: str | None,
    http2: bool,
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():
        # TLS 1.0 and 1.1 are deprecated; a policy that names them asked for them.
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = pol.minimum
        ctx.maximum_version = pol.maximum
    if pol.ciphers:
        ctx.set_ciphers(pol.ciphers)
    ctx.options |= ssl.OP_NO_RENEGOTIATION  # client-initiated renegotiation: a CPU sink
    # Every SNI context offers the same: OpenSSL asks the context SNI switched to.
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
    if client_auth is not None:
        try:
            ctx.load_verify_locations(cafile=client_ca)
        except ssl.SSLError as exc:
            raise TlsError(f"client CA {client_ca} cannot be loaded: {exc.reason or exc}") from None
        except OSError as exc:
            reason = (exc.strerror or str(exc)).lower()
            raise TlsError(f"cannot read client CA {client_ca}: {reason}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED if client_auth == "required" else ssl.CERT_OPTIONAL
    return ctx


class Sni:
    """The SNI callback of a listener with several certificates: switches the handshake to
    the context whose certificate names the server the client asked for. An exact name
    beats a wildcard (``*.example.com``: one label, not the bare domain); at a tie the
    earlier certificate wins; no SNI or no match keeps the first (default) certificate."""

    __slots__ = ("exact", "wildcard")

    def __init__(self, contexts: Sequence[ssl.SSLContext], names: Sequence[Sequence[str]]) -> None:
        self.exact: dict[str, ssl.SSLContext] = {}
        self.wildcard: dict[str, ssl.SSLContext] = {}  # "example.com" for "*.example.com"
        for ctx, cert_names in zip(contexts, names, strict=True):
            for name in cert_names:
                if name.startswith("*."):
                    self.wildcard.setdefault(name[2:], ctx)
                else:
                    self.exact.setdefault(name, ctx)

    def choose(self, server_name: str | None) -> ssl.SSLContext | None:
        """The context for ``server_name``; None: the default one."""
        if not server_name:
            return None
        name = server_name.lower().rstrip(".")
        ctx = self.exact.get(name)
        if ctx is None:
            _, dot, parent = name.partition(".")
            if dot:
                ctx = self.wildcard.get(parent)
        return ctx

    def __call__(
        self, ssl_object: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext
    ) -> None:
        ctx = self.choose(server_name)
        if ctx is not None:
            ssl_object.context = ctx


def client_cert_headers(ssl_object: ssl.SSLObject | None) -> tuple[bytes, ...]:
    """The header lines that tell a backend the verified client certificate: its subject
    (RFC 4514, control and non-ASCII characters escaped as ``\\XX``) and the sha256 of its
    DER bytes (64 lower-case hex digits). Empty when the client showed no certificate (a
    certificate that does not verify never gets this far: its handshake failed)."""
    if ssl_object is None:
        return ()
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return ()
    try:
        subject = x509.load_der_x509_certificate(der).subject.rfc4514_string()
    except ValueError:
        subject = ""
    return (
        SUBJECT_HEADER + b": " + _header_safe(subject),
        FINGERPRINT_HEADER + b": " + hashlib.sha256(der).hexdigest().encode(),
    )


def _header_safe(text: str) -> bytes:
    """``text`` as a header value: RFC 4514 lets any byte be written ``\\XX``, so every byte
    outside printable ASCII is, and nothing in a subject can end or split a header line."""
    out = bytearray()
    for byte in text.encode("utf-8", "surrogateescape"):
        if 0x20 <= byte < 0x7F:
            out.append(byte)
        else:
            out += b"\\%02X" % byte
    return bytes(out)


def failure_reason(exc: BaseException) -> str:
    """Why a handshake failed: one of metrics.TLS_FAILURE_REASONS (the metric's label)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "client_certificate"  # the server side verifies only client certificates
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or ""
        if reason in _CLIENT_CERT_REASONS:
            return "client_certificate"
        if reason in _PROTOCOL_REASONS:
            return "protocol"
        return "other"
    if isinstance(exc, ConnectionAbortedError | TimeoutError):
        # asyncio and uvloop abort a handshake past ssl_handshake_timeout this way.
        return "timeout"
    return "other"
