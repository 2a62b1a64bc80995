"""Forwarding rules: which server group of a listener a request goes to.

A listener has a default server group and a list of rules (``config.Rule``), each a host
(exact ``chat.example.com``, wildcard ``*.example.com``, or none for any host) and a path
prefix (default ``/``). ``Router`` is built once per config snapshot and answers
``route(host, target)`` with a group name; it allocates little and does no I/O.

Matching
    - Host: case-insensitive, a ``:port`` suffix ignored (``[v6]:port`` too), a trailing dot
      ignored. ``*.example.com`` matches ``a.example.com`` and ``a.b.example.com`` but not
      ``example.com``. A rule without a host matches every request, with or without Host.
    - Path: a plain string prefix of the path part of the request target (the ``?query`` is
      not looked at; no percent-decoding or dot-segment removal). Like nginx's prefix
      ``location``, ``/api`` also matches ``/apiv2``; write ``/api/`` to mean the directory.
      An absolute-form target (``http://host/path``) is matched on its path; a target that is
      not a path (``OPTIONS *``) is matched as ``/``.

Precedence (the most specific matching rule wins)
    1. the longest path prefix;
    2. at equal prefix length, the most specific host: an exact host, then wildcards from
       the longest suffix (``*.b.example.com``) to the shortest (``*.example.com``), then rules
       without a host. This is nginx's ``server_name`` order used as a tie-breaker.
    3. No rule matches: the listener's default group.

So ``{path: /static/}`` beats ``{host: chat.example.com}`` (path ``/``) for
``chat.example.com/static/x``, and ``{host: chat.example.com, path: /api/}`` beats
``{path: /api/}``. A rule is never skipped for the default group while it matches.

Cost: the full candidate list (host rules + matching wildcards + host-less rules, sorted by
precedence) is precomputed per exact host and per wildcard; ``route`` does one dict lookup
for the exact host, at most one per label of the host for wildcards, then scans one list.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from ..wire.http1 import target_path

if TYPE_CHECKING:
    from ..config.listeners import Listener
    from ..config.sections import Rule

__all__ = ["Router", "normalize_host", "target_path"]

# A candidate: (path prefix, server group), in precedence order.
_Entry = tuple[str, str]


def normalize_host(host: bytes | str | None) -> str | None:
    """A Host header value (or absolute-form authority) -> lower-case host without port or
    trailing dot; ``[v6]`` keeps its brackets. None or empty -> None."""
    if host is None:
        return None
    text = host.decode("latin-1") if isinstance(host, bytes) else host
    text = text.strip().lower()
    if text.startswith("["):
        end = text.find("]")
        text = text[: end + 1] if end > 0 else text
    else:
        name, sep, port = text.rpartition(":")
        if sep and (port.isdigit() or not port):
            text = name
    if text.endswith("."):
        text = text[:-1]
    return text or None


def _host_rank(host: str | None) -> int:
    """Specificity of a rule host: exact > longer wildcard suffix > shorter > none."""
    if host is None:
        return 0
    if host.startswith("*."):
        return 1 + len(host)  # a wildcard: its suffix length; below any exact host
    return 1 << 20


def _sorted(rules: Iterable[Rule]) -> tuple[_Entry, ...]:
    ordered = sorted(rules, key=lambda r: (len(r.path), _host_rank(r.host)), reverse=True)
    return tuple((r.path, r.server_group) for r in ordered)


class Router:
    """Route requests of one listener to a server group; see the module docstring."""

    __slots__ = ("_exact", "_hostless", "_wildcard", "default", "rules")

    def __init__(self, default: str, rules: Iterable[Rule] = ()) -> None:
        self.default = default
        self.rules: tuple[Rule, ...] = tuple(rules)
        hostless: list[Rule] = []
        wildcards: list[tuple[str, Rule]] = []  # (".example.com", rule)
        exact: dict[str, list[Rule]] = {}
        for r in self.rules:
            if r.host is None:
                hostless.append(r)
            elif r.host.startswith("*."):
                wildcards.append((r.host[1:], r))
            else:
                exact.setdefault(r.host, []).append(r)

        def matching_wildcards(host: str) -> list[Rule]:
            return [r for suffix, r in wildcards if host.endswith(suffix)]

        self._hostless: tuple[_Entry, ...] = _sorted(hostless)
        # Keyed by the suffix with its leading dot (".example.com"): the candidates of a host
        # whose most specific matching wildcard is this one, which include every less specific
        # wildcard (all of them are suffixes of the host, hence of this suffix).
        self._wildcard: dict[str, tuple[_Entry, ...]] = {
            suffix: _sorted(matching_wildcards(suffix) + hostless) for suffix, _ in wildcards
        }
        self._exact: dict[str, tuple[_Entry, ...]] = {
            host: _sorted(same + matching_wildcards(host) + hostless)
            for host, same in exact.items()
        }

    @classmethod
    def for_listener(cls, listener: Listener) -> Router:
        return cls(listener.server_group, listener.rules)

    def _candidates(self, host: str | None) -> tuple[_Entry, ...]:
        if host is None:
            return self._hostless
        found = self._exact.get(host)
        if found is not None:
            return found
        if self._wildcard:
            # Suffixes ".b.example.com", ".example.com", ... longest first; the first found is
            # the most specific wildcard, whose list includes every less specific one.
            i = host.find(".")
            while i >= 0:
                found = self._wildcard.get(host[i:])
                if found is not None and i > 0:
                    return found
                i = host.find(".", i + 1)
        return self._hostless

    def route(self, host: bytes | str | None, path: bytes | str) -> str:
        """The server group for a request with this Host (None: absent) and target."""
        if not self.rules:
            return self.default
        candidates = self._candidates(normalize_host(host))
        if not candidates:
            return self.default
        p = target_path(path)
        for prefix, group in candidates:
            if p.startswith(prefix):
                return group
        return self.default

    def __repr__(self) -> str:
        return f"Router(default={self.default!r}, {len(self.rules)} rules)"
