"""Loading a config file for the running proxy: the file read and validated (``config.load``),
then every https listener's certificate files checked and digested (``proxy.tls``).

The one place that joins the two, so the config layer never imports TLS: ``--check``, the
start, every reload and every worker load through here.
"""

from __future__ import annotations

import os
from dataclasses import replace

from ..config.load import loads_document, read_config_file, with_lines
from ..config.model import ConfigError
from ..config.sections import Certificate
from ..config.top import Config
from ..proxy import tls

__all__ = ["load_config", "loads_config", "read_config_file"]


def load_config(path: str) -> Config:
    """Read and validate the file at ``path``; every failure is a ConfigError with clear lines."""
    return loads_config(read_config_file(path), path)


def loads_config(raw: bytes, path: str = "<config>") -> Config:
    """Validate config file bytes (``path`` names them in messages, with each problem's line)
    and check the certificate files they name."""
    return _with_tls_files(loads_document(raw, path), raw, path)


def _with_tls_files(config: Config, raw: bytes, path: str) -> Config:
    """Check every https listener's certificate and key now (missing, unreadable, not PEM or
    not a pair: a ConfigError, so a reload with a bad certificate changes nothing), and give
    each its files' digest. Relative paths are relative to the config file's directory."""
    problems: list[str] = []
    listeners = list(config.listeners)
    base = os.path.dirname(os.path.abspath(path)) if path != "<config>" else os.getcwd()

    def full(p: str) -> str:
        return os.path.join(base, os.path.expanduser(p))

    for i, lst in enumerate(listeners):
        if lst.tls is None:
            continue
        pairs = tuple(Certificate(full(c.cert), full(c.key)) for c in lst.tls.certificates)
        ca = full(lst.tls.client_ca) if lst.tls.client_ca is not None else None
        try:
            loaded = tls.load(replace(lst.tls, certificates=pairs, client_ca=ca))
        except tls.TlsError as exc:
            problems.append(f"listeners[{i}].tls: {exc}")
            continue
        listeners[i] = replace(
            lst, tls=replace(lst.tls, certificates=pairs, client_ca=ca, digest=loaded.digest)
        )
    if problems:
        raise ConfigError(with_lines(problems, raw, path))
    return replace(config, listeners=tuple(listeners))
