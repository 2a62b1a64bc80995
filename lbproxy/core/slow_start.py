"""Slow start: the effective weight of a server that just joined its group or came back UP.

Owns the ramp arithmetic and nothing else (no clock of its own: the caller passes ``now``).
As HAProxy's ``slowstart``: over ``window`` seconds from the moment the server joined (or
came back UP) its weight grows linearly from a small start to the full weight. Weights are
counted in ``SCALE``-ths (HAProxy's BE_WEIGHT_SCALE), so that a server of weight 1 ramps
too instead of jumping straight to 1; a ramping server always keeps at least 1/``SCALE``
so it is never starved completely (the ramp would otherwise never see a first request).
The schedulers (``balancer``) compare these scaled weights; only their ratios matter.
"""

from __future__ import annotations

import math
from typing import Final

# Weights as the schedulers see them are ``weight * SCALE``.
SCALE: Final = 16


def effective_weight(weight: int, since: float | None, window: float, now: float) -> int:
    """The scaled weight in force at ``now`` for a server of ``weight`` whose ramp began at
    ``since`` (None: no ramp) and lasts ``window`` seconds; 0 for weight 0 (draining)."""
    full = weight * SCALE
    if full <= 0 or since is None or window <= 0:
        return max(full, 0)
    elapsed = now - since
    if elapsed >= window:
        return full
    if elapsed <= 0:
        return 1
    return max(1, min(full, math.ceil(full * elapsed / window)))


def progress(since: float | None, window: float, now: float) -> float:
    """How far the ramp is, 0.0..1.0 (1.0: none, or over)."""
    if since is None or window <= 0:
        return 1.0
    return min(max((now - since) / window, 0.0), 1.0)
