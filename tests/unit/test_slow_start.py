"""Slow start: the ramp arithmetic (injected clock), every scheduler following a ramping
server's effective weight, and the ramp kept on the server's state across a reload."""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass
from typing import Any

import pytest

from lbproxy.config import parse_config
from lbproxy.control.ramp import Ramps
from lbproxy.core import metrics
from lbproxy.core.balancer import make_scheduler
from lbproxy.core.history import EventLog
from lbproxy.core.slow_start import SCALE, effective_weight, progress
from lbproxy.core.snapshot import Holder, RuntimeState


def test_ramp_is_linear_from_a_small_start_to_the_full_weight() -> None:
    # weight 2 over 10 s: 32 sixteenths at the end, growing linearly, never below 1.
    w = [effective_weight(2, 100.0, 10.0, 100.0 + t) for t in (0, 1, 2.5, 5, 9.99, 10, 50)]
    assert w == [1, 4, 8, 16, 32, 32, 32]
    assert effective_weight(1, 0.0, 30.0, 0.5) == 1  # weight 1 ramps too (in sixteenths)
    assert effective_weight(1, 0.0, 30.0, 15.0) == SCALE // 2


def test_no_ramp_or_weight_zero() -> None:
    assert effective_weight(3, None, 10.0, 5.0) == 3 * SCALE  # not ramping
    assert effective_weight(3, 0.0, 0.0, 0.0) == 3 * SCALE  # slow_start 0s: off
    assert effective_weight(0, 0.0, 10.0, 5.0) == 0  # draining stays out
    assert progress(None, 10.0, 3.0) == 1.0
    assert progress(0.0, 10.0, 2.5) == 0.25
    assert progress(0.0, 10.0, 99.0) == 1.0


@dataclass(slots=True)
class Srv:
    id: str
    weight: int = 1
    active: int = 0
    fleet_active: int = 0  # wlc adds the fleet's count (none here)
    effective: int = SCALE


def shares(name: str, ramp: int, n: int = 1600, key_space: int = 0) -> dict[str, int]:
    """Picks per server among a, b and c (c at effective weight ``ramp``)."""
    s = make_scheduler(name)
    cands = [Srv("g/a"), Srv("g/b"), Srv("g/c", effective=ramp)]
    got: collections.Counter[str] = collections.Counter()
    for i in range(n):
        c = s.pick(cands, f"10.0.{i // 256}.{i % 256}" if key_space else None)
        assert c is not None
        got[c.id] += 1
    return got


@pytest.mark.parametrize("name", ["rr", "wrr", "wlc", "sh"])
def test_every_scheduler_gives_a_ramping_server_its_share(name: str) -> None:
    keyed = 1 if name == "sh" else 0
    full = shares(name, SCALE, key_space=keyed)["g/c"]
    early = shares(name, SCALE // 8, key_space=keyed)["g/c"]  # an eighth of the way
    half = shares(name, SCALE // 2, key_space=keyed)["g/c"]
    assert full > 400  # about a third of 1600
    assert early < full / 4
    assert early < half < full


def test_wlc_does_not_flood_a_fresh_server_with_connections() -> None:
    # Two loaded servers and a fresh one at 1/16 of its weight: wlc compares connections per
    # effective weight, so the fresh one gets about 1/16 of the others' load, not all of it.
    s = make_scheduler("wlc")
    cands = [Srv("g/a", active=100), Srv("g/b", active=100), Srv("g/c", effective=1)]
    for _ in range(40):
        c = s.pick(cands)
        assert c is not None
        c.active += 1
    # About as many per unit of weight as the others (~116/16): not the 40 plain wlc gives.
    assert 5 <= cands[2].active <= max(cands[0].active, cands[1].active) // SCALE + 2


def doc(slow_start: str = "10s", servers: tuple[str, ...] = ("127.0.0.1:5001",)) -> Any:
    return parse_config(
        {
            "listeners": [{"name": "web", "bind": "127.0.0.1:0", "server_group": "g"}],
            "server_groups": {
                "g": {"scheduler": "wlc", "servers": list(servers), "slow_start": slow_start}
            },
        }
    )


def committed(config: Any) -> tuple[RuntimeState, Holder]:
    """A runtime state with ``config`` built and committed, and the holder of its snapshot."""
    state = RuntimeState(metrics.Registry())
    snap, _ = state.build(config)
    state.commit(snap)
    return state, Holder(snap)


def test_ramp_survives_a_reload_that_keeps_the_server() -> None:
    state, holder = committed(doc())
    ramps = Ramps(holder, state.registry)
    server = holder.current.groups["g"].servers[0]
    ramps.begin(server, 10.0, "joined")
    since = server.ramp_since
    assert since is not None and server.effective == 1
    full = server.weight * SCALE
    ramps.tick(since + 5.0)
    assert server.effective == full // 2
    assert state.registry.backend_weight[server.id] == ("g", "127.0.0.1:5001", server.weight / 2)
    # A reload keeping the server (another one added) keeps its state and its ramp.
    snap2, changes = state.build(doc(servers=("127.0.0.1:5001", "127.0.0.1:5002")))
    state.commit(snap2)
    assert snap2.groups["g"].servers[0] is server
    assert [s.id for s in changes.added_servers] == ["g/127.0.0.1:5002"]
    assert server.ramp_since == since and server.effective == full // 2
    ramps.tick(since + 10.0)
    assert server.effective == full and server.ramp_since is None and not ramps.ramping


def test_a_server_removed_while_ramping_leaves_no_weight_series() -> None:
    state, holder = committed(doc(servers=("127.0.0.1:5001", "127.0.0.1:5002")))
    ramps = Ramps(holder, state.registry)
    gone = holder.current.groups["g"].servers[1]
    ramps.begin(gone, 10.0, "joined")
    since = gone.ramp_since
    assert since is not None and gone.id in state.registry.backend_weight
    # A reload removes it mid-ramp: the series goes with it, and the next tick (the ramp's
    # timer still armed) must not bring it back.
    snap2, changes = state.build(doc(servers=("127.0.0.1:5001",)))
    state.commit(snap2)
    holder.current = snap2
    assert [s.id for s in changes.removed_servers] == [gone.id]
    ramps.publish_all()
    assert gone.id not in state.registry.backend_weight
    ramps.tick(since + 5.0)
    assert gone.id not in state.registry.backend_weight
    assert not ramps.ramping


def test_no_window_no_ramp() -> None:
    state, holder = committed(doc("0s"))
    ramps = Ramps(holder, state.registry)
    group = holder.current.groups["g"]
    server = group.servers[0]
    ramps.begin(server, group.config.slow_start, "joined")
    assert server.ramp_since is None and server.effective == server.weight * SCALE


def test_ramps_begin_when_a_server_joins_comes_back_up_or_is_ready_again() -> None:
    from lbproxy.control.server_control import ServerControl
    from lbproxy.core.health import State, Transition

    state, holder = committed(doc(servers=("127.0.0.1:5001", "127.0.0.1:5002")))
    control = ServerControl(state, state.registry, holder, checks=False, events=EventLog(time.time))
    a, b = holder.current.groups["g"].servers
    assert a.ramp_since is None and b.ramp_since is None  # at start: none
    # DOWN -> UP (the checker's transition, or the supervisor's view in a worker).
    a.health.state = State.UP
    control.transition(a, Transition(State.UP, State.DOWN, "test"))
    assert a.ramp_since is None
    control.transition(a, Transition(State.DOWN, State.UP, "test"))
    assert a.ramp_since is not None and a.effective == 1
    control.set_health({b.id: "down"})
    control.set_health({b.id: "up"})
    assert b.ramp_since is not None
    # Ready again after a drain through the runtime API.
    a.ramp_since = None
    control.set_server_state(a.id, weight=0)
    assert a.ramp_since is None and a.effective == 0
    control.set_server_state(a.id, weight=100)
    assert a.ramp_since is not None and a.effective == 1
    # Joined by a reload: the new server ramps, the kept ones do not start again.
    since = b.ramp_since
    snap2, changes = state.build(doc(servers=("127.0.0.1:5001", "127.0.0.1:5002", "10.0.0.9:1")))
    state.commit(snap2)
    holder.current = snap2
    control.joined(changes.added_servers)
    (c,) = changes.added_servers
    assert c.ramp_since is not None and b.ramp_since == since
    assert set(state.registry.backend_weight) == {a.id, b.id, c.id}
    control.close()
