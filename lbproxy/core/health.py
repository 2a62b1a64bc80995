"""The health state machine of one backend server, and the expected-status-code rules.

This module owns whether a server takes traffic. It is pure: no sockets, no clock (every
call is handed ``now``), no logging (a state change comes back as a ``Transition`` and
the caller logs it). The active checker and the proxy feed it events; the schedulers only
ever see servers whose ``ServerHealth.available`` is true.

The rules, all of them, stated once
===================================

States
    UNKNOWN  the server just appeared and has never been checked. Takes no traffic.
    UP       takes traffic. The only state that does.
    DOWN     takes no traffic.
    A server also remembers whether it has *ever* been UP (``been_up``): the one fact the
    gates below need besides the counters.

Events
    CHECK_OK      an active check got an expected status code.
    CHECK_FAIL    an active check failed (timeout, refused, unexpected status...).
    PASSIVE_FAIL  while proxying, a connect failed or a fresh connection was reset.

Transitions (the ``TRANSITIONS`` table below is the authority; this is its prose)
    UNKNOWN + CHECK_OK      -> UP at once. A proxy started in front of live backends
                               serves within one check round trip, not healthy_threshold.
    UNKNOWN + CHECK_FAIL    -> DOWN at once.
    UNKNOWN + PASSIVE_FAIL  -> DOWN at once.
    UP + CHECK_FAIL         -> DOWN once ``unhealthy_threshold`` checks in a row failed.
    UP + PASSIVE_FAIL       -> DOWN at once; active checks bring it back.
    DOWN + CHECK_OK         -> UP at once while the server has never been UP (a backend
                               that was down when it was first checked, e.g. started after
                               the proxy: Envoy's startup rule); once it has been UP, only
                               after ``healthy_threshold`` checks in a row passed (a server
                               that failed must prove itself before it gets traffic again).
    Anything else leaves the state alone.

Counters (the part that does not fit in the table, the same in every state)
    CHECK_OK      successes += 1, failures = 0
    CHECK_FAIL    failures += 1,  successes = 0
    PASSIVE_FAIL  successes = 0   (failures counts failed *checks*; a passive failure
                                   is not one, and in UP it already takes the server down)
    Thresholds are compared with ``>=``, not ``==``: a reload can lower a threshold below
    a count already reached, and the next result must then act on it.

Each transition is returned exactly once, from the ``observe`` call that caused it, with
a reason string. ``ServerHealth`` is long-lived: it belongs to the server, not to one
configuration, so it survives reloads and the thresholds are passed in on every call.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from ..wire.status_codes import CODE_CLASSES as _CLASSES
from ..wire.status_codes import is_digits as _is_digits
from ..wire.status_codes import parse_expected_codes

__all__ = [
    "TRANSITIONS",
    "Event",
    "Gate",
    "ServerHealth",
    "State",
    "Transition",
    "codes_match",
    "parse_expected_codes",
]


class State(enum.Enum):
    UNKNOWN = "unknown"
    UP = "up"
    DOWN = "down"


class Event(enum.Enum):
    CHECK_OK = "check_ok"
    CHECK_FAIL = "check_fail"
    PASSIVE_FAIL = "passive_fail"


class Gate(enum.Enum):
    """What must hold before a table entry fires."""

    AT_ONCE = "at_once"
    # healthy_threshold checks in a row; a server never UP yet needs only this one.
    HEALTHY_THRESHOLD_ONCE_UP = "healthy_threshold_once_up"
    UNHEALTHY_THRESHOLD = "unhealthy_threshold"


# state -> event -> (new state, gate). An event absent from a state's row changes no
# state, but still moves the counters. No entry leads back to its own state, so every
# fired entry is a real change and gets reported.
TRANSITIONS: Final[Mapping[State, Mapping[Event, tuple[State, Gate]]]] = {
    State.UNKNOWN: {
        Event.CHECK_OK: (State.UP, Gate.AT_ONCE),
        Event.CHECK_FAIL: (State.DOWN, Gate.AT_ONCE),
        Event.PASSIVE_FAIL: (State.DOWN, Gate.AT_ONCE),
    },
    State.UP: {
        Event.CHECK_FAIL: (State.DOWN, Gate.UNHEALTHY_THRESHOLD),
        Event.PASSIVE_FAIL: (State.DOWN, Gate.AT_ONCE),
    },
    State.DOWN: {
        Event.CHECK_OK: (State.UP, Gate.HEALTHY_THRESHOLD_ONCE_UP),
    },
}

_EVENT_WORDS: Final[Mapping[Event, str]] = {
    Event.CHECK_OK: "check ok",
    Event.CHECK_FAIL: "check failed",
    Event.PASSIVE_FAIL: "passive failure",
}


@dataclass(frozen=True, slots=True)
class Transition:
    old: State
    new: State
    reason: str


class ServerHealth:
    """Health of one server; mutated only through ``observe``."""

    __slots__ = (
        "been_up",
        "failures",
        "last_change_at",
        "last_change_reason",
        "last_check_at",
        "last_latency",
        "last_reason",
        "state",
        "successes",
    )

    def __init__(self) -> None:
        self.state: State = State.UNKNOWN
        self.been_up = False  # ever UP: from then on DOWN -> UP waits for healthy_threshold
        self.successes: int = 0
        self.failures: int = 0
        # Result text of the last active check; passive failures do not overwrite it,
        # they show up in last_change_reason when they take the server down.
        self.last_reason: str = ""
        self.last_check_at: float | None = None
        self.last_latency: float | None = None
        self.last_change_at: float | None = None
        self.last_change_reason: str | None = None

    def __repr__(self) -> str:
        return (
            f"<ServerHealth {self.state.value} successes={self.successes} "
            f"failures={self.failures} last_reason={self.last_reason!r}>"
        )

    @property
    def available(self) -> bool:
        return self.state is State.UP

    def observe(
        self,
        event: Event,
        reason: str,
        now: float,
        *,
        healthy_threshold: int,
        unhealthy_threshold: int,
        latency: float | None = None,
    ) -> Transition | None:
        """Feed one event; return the transition it caused, if any.

        ``reason`` is the check's result text ("200 OK", "timeout", "refused") or, for a
        passive failure, what the proxy saw. ``latency`` is the check's round trip in
        seconds (None when there was no response to time).
        """
        if healthy_threshold < 1 or unhealthy_threshold < 1:
            raise ValueError(
                "thresholds must be >= 1, got "
                f"healthy_threshold={healthy_threshold}, unhealthy_threshold={unhealthy_threshold}"
            )
        if event is Event.CHECK_OK:
            self.successes += 1
            self.failures = 0
        elif event is Event.CHECK_FAIL:
            self.failures += 1
            self.successes = 0
        else:
            self.successes = 0
        if event is not Event.PASSIVE_FAIL:
            self.last_reason = reason
            self.last_check_at = now
            self.last_latency = latency

        entry = TRANSITIONS[self.state].get(event)
        if entry is None:
            return None
        new, gate = entry
        word = _EVENT_WORDS[event]
        if gate is Gate.AT_ONCE:
            text = f"{word}: {reason}"
        elif gate is Gate.HEALTHY_THRESHOLD_ONCE_UP:
            if not self.been_up:
                text = f"check ok, never up before (no healthy_threshold wait): {reason}"
            elif self.successes < healthy_threshold:
                return None
            else:
                text = (
                    f"{self.successes} consecutive checks ok "
                    f"(healthy_threshold {healthy_threshold}), last: {reason}"
                )
        else:
            if self.failures < unhealthy_threshold:
                return None
            text = (
                f"{self.failures} consecutive checks failed "
                f"(unhealthy_threshold {unhealthy_threshold}), last: {reason}"
            )
        old = self.state
        self.state = new
        if new is State.UP:
            self.been_up = True
        self.last_change_at = now
        self.last_change_reason = text
        return Transition(old, new, text)


def codes_match(status: int, expected: Sequence[str | int]) -> bool:
    """Whether ``status`` is accepted by ``expected`` (status classes or exact codes).

    ``expected`` is normally the output of ``parse_expected_codes``; an item that is
    neither a class nor a code raises ValueError rather than silently never matching.
    """
    for item in expected:
        if isinstance(item, int):
            if status == item:
                return True
        elif _is_digits(item):
            if status == int(item):
                return True
        else:
            cls = _CLASSES.get(item.lower())
            if cls is None:
                raise ValueError(f"not a status class or code: {item!r}")
            if status // 100 == cls:
                return True
    return False
