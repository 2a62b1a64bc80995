"""Loading a config file for the running proxy: the file read and its YAML parsed
(``config.load``), the document validated (``config.top.parse_config``; every problem given its
file and line) and its bytes digested, then every https listener's (and the admin's)
certificate files checked and digested (``proxy.tls``), every group's backend TLS files
(``proxy.upstream_tls``) likewise, and the admin token read from
``admin.token_file`` or ``admin.token_env``.

The one place that joins the two, so the config layer never imports TLS: ``--check``, the
start, every reload and every worker load through here.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import replace

from ..config.backend import BackendTls
from ..config.load import load_yaml, read_config_file, with_lines
from ..config.model import ConfigError
from ..config.sections import Certificate, Tls
from ..config.top import Config, parse_config
from ..proxy import tls, upstream_tls

__all__ = ["ConfigFile", "load_config", "loads_config", "read_config_file"]


class ConfigFile:
    """The config file a proxy was started from and reloads: ``read`` gives its bytes and
    the config they validate to (a ConfigError, every problem with its line, when they do
    not). Given to ``app.Proxy`` by whoever starts it, so that the app imports neither this
    loader nor the schema at run time."""

    def __init__(self, path: str) -> None:
        self.path = path

    def read(self) -> tuple[bytes, Config]:
        raw = read_config_file(self.path)
        return raw, loads_config(raw, self.path)


def load_config(path: str) -> Config:
    """Read and validate the file at ``path``; every failure is a ConfigError with clear lines."""
    return loads_config(read_config_file(path), path)


def loads_config(raw: bytes, path: str = "<config>") -> Config:
    """Validate config file bytes (``path`` names them in messages, with each problem's line)
    and check the certificate files they name."""
    return _with_admin(_with_tls_files(loads_document(raw, path), raw, path), raw, path)


def loads_document(raw: bytes, path: str = "<config>") -> Config:
    """Validate config file bytes, each problem with its line (the files the config names are
    not looked at here)."""
    doc = load_yaml(raw, path)  # a YAML error names its line and column already
    try:
        config = parse_config(doc)
    except ConfigError as exc:
        raise ConfigError(with_lines(exc.problems, raw, path)) from None
    return replace(config, digest=hashlib.sha256(raw).hexdigest())


def _with_tls_files(config: Config, raw: bytes, path: str) -> Config:
    """Check every https listener's certificate and key now (missing, unreadable, not PEM or
    not a pair: a ConfigError, so a reload with a bad certificate changes nothing), and give
    each its files' digest. Relative paths are relative to the config file's directory."""
    problems: list[str] = []
    listeners = list(config.listeners)
    for i, lst in enumerate(listeners):
        if lst.tls is None:
            continue
        checked = _tls_files(lst.tls, _base(path), f"listeners[{i}].tls", problems)
        if checked is not None:
            listeners[i] = replace(lst, tls=checked)
    groups = list(config.server_groups)
    for i, group in enumerate(groups):
        if group.tls is not None:
            where = f"server_groups.{group.name}.tls"
            checked_b = _backend_tls_files(group.tls, _base(path), where, problems)
            if checked_b is not None:
                groups[i] = replace(group, tls=checked_b)
    if problems:
        raise ConfigError(with_lines(problems, raw, path))
    return replace(config, listeners=tuple(listeners), server_groups=tuple(groups))


def _backend_tls_files(
    t: BackendTls, base: str, where: str, problems: list[str]
) -> BackendTls | None:
    """``t`` with absolute paths and its files' digest (a renewed file makes the config
    differ, so a reload builds a new context), or None (and a problem)."""

    def full(p: str | None) -> str | None:
        return _full(base, p) if p is not None else None

    out = replace(t, ca=full(t.ca), cert=full(t.cert), key=full(t.key))
    try:
        _, digest = upstream_tls.load(out)
    except upstream_tls.TlsError as exc:
        problems.append(f"{where}: {exc}")
        return None
    return replace(out, digest=digest)


def _base(path: str) -> str:
    """The directory relative paths in the file are relative to."""
    return os.path.dirname(os.path.abspath(path)) if path != "<config>" else os.getcwd()


def _full(base: str, p: str) -> str:
    return os.path.join(base, os.path.expanduser(p))


def _tls_files(t: Tls, base: str, where: str, problems: list[str]) -> Tls | None:
    """``t`` with absolute paths and its files' digest, or None (and a problem) when a file
    cannot be used."""
    pairs = tuple(Certificate(_full(base, c.cert), _full(base, c.key)) for c in t.certificates)
    ca = _full(base, t.client_ca) if t.client_ca is not None else None
    try:
        loaded = tls.load(replace(t, certificates=pairs, client_ca=ca))
    except tls.TlsError as exc:
        problems.append(f"{where}: {exc}")
        return None
    return replace(
        t, certificates=pairs, client_ca=ca, digest=loaded.digest, not_after=loaded.not_after
    )


def _with_admin(config: Config, raw: bytes, path: str) -> Config:
    """The admin's certificate files checked, and its token read from ``token_file`` or
    ``token_env``: at every load, so a reload picks up a rotated token."""
    admin = config.admin
    problems: list[str] = []
    base = _base(path)
    if admin.tls is not None:
        checked = _tls_files(admin.tls, base, "admin.tls", problems)
        if checked is not None:
            admin = replace(admin, tls=checked)
    if admin.token_file is not None:
        file = _full(base, admin.token_file)
        try:
            admin = replace(admin, token_file=file, token=read_token_file(file))
        except ValueError as exc:
            problems.append(f"admin.token_file: {exc}")
    elif admin.token_env is not None:
        try:
            admin = replace(admin, token=read_token_env(admin.token_env))
        except ValueError as exc:
            problems.append(f"admin.token_env: {exc}")
    if problems:
        raise ConfigError(with_lines(problems, raw, path))
    return replace(config, admin=admin)


def read_token_file(path: str) -> str:
    """The token in ``path``: refused when others could read it (as ssh refuses a private key
    readable by group or others); one trailing newline is not part of it."""
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            data = f.read()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    if mode & 0o077:
        raise ValueError(
            f"{path} is readable or writable by group or others (mode {mode & 0o777:04o}): "
            f"make it private, e.g. chmod 600 {path}"
        )
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: the token must be visible ASCII characters") from None
    return _checked_token(text.removesuffix("\n").removesuffix("\r"), path)


def read_token_env(name: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        raise ValueError(f"the environment variable {name} is not set or empty")
    return _checked_token(value, f"${name}")


def _checked_token(value: str, source: str) -> str:
    if not value:
        raise ValueError(f"{source} is empty: it must hold the token")
    if not value.isascii() or not value.isprintable() or " " in value:
        # The value is a secret: never echo it.
        raise ValueError(f"{source}: expected a token of visible ASCII characters, no spaces")
    return value
