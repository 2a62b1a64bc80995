"""What every connection of a process shares (``Context``): the stats registry, the access
log, where passive health failures go (``Health``), whether the process is draining, and the
edge policies' state (``edge.Edges``: per-client limits, bandwidth shapers, kept across
reloads). Made once by the application; the front ends, their exchanges and streams read it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from .edge import Edges

if TYPE_CHECKING:
    from ..core.metrics import Registry
    from ..core.snapshot import ServerState
    from .access_log import AccessLog


class Health(Protocol):
    """Passive health: where a failure seen while proxying goes (app.PassiveHealth)."""

    def passive_failure(self, server: ServerState, reason: str) -> None: ...


class Context:
    """What every connection of the process shares (see the module docstring)."""

    def __init__(self, registry: Registry, access: AccessLog, report_health: Health) -> None:
        self.registry = registry
        self.access = access
        self.report_health = report_health
        self.draining = False
        self.edges = Edges()
