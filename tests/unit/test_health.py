"""The health state machine: every table entry, threshold counting, and expected codes."""

from __future__ import annotations

import pytest

from lbproxy.core.health import (
    TRANSITIONS,
    Event,
    Gate,
    ServerHealth,
    State,
    Transition,
    codes_match,
    parse_expected_codes,
)

OK, FAIL, PASSIVE = Event.CHECK_OK, Event.CHECK_FAIL, Event.PASSIVE_FAIL
REASONS = {OK: "200 OK", FAIL: "timeout", PASSIVE: "connect refused"}


def feed(
    h: ServerHealth,
    *events: Event,
    healthy: int = 2,
    unhealthy: int = 3,
    now: float = 100.0,
) -> list[Transition]:
    """Feed events one second apart; return the transitions that came out."""
    out = []
    for i, event in enumerate(events):
        t = h.observe(
            event,
            REASONS[event],
            now + i,
            healthy_threshold=healthy,
            unhealthy_threshold=unhealthy,
        )
        if t is not None:
            out.append(t)
    return out


def in_state(state: State) -> ServerHealth:
    h = ServerHealth()
    if state is State.UP:
        feed(h, OK)
    elif state is State.DOWN:
        feed(h, OK, PASSIVE)  # down after having been up: healthy_threshold applies
    assert h.state is state
    return h


def never_up_down() -> ServerHealth:
    """DOWN from its very first check (a backend that was down when the proxy started)."""
    h = ServerHealth()
    feed(h, FAIL)
    assert h.state is State.DOWN and not h.been_up
    return h


# --- the table itself -----------------------------------------------------------------


def test_table_has_no_self_loops_and_covers_every_state() -> None:
    assert set(TRANSITIONS) == set(State)
    for state, row in TRANSITIONS.items():
        for new, _gate in row.values():
            assert new is not state


def test_table_matches_the_rules() -> None:
    assert TRANSITIONS[State.UNKNOWN] == {
        OK: (State.UP, Gate.AT_ONCE),
        FAIL: (State.DOWN, Gate.AT_ONCE),
        PASSIVE: (State.DOWN, Gate.AT_ONCE),
    }
    assert TRANSITIONS[State.UP] == {
        FAIL: (State.DOWN, Gate.UNHEALTHY_THRESHOLD),
        PASSIVE: (State.DOWN, Gate.AT_ONCE),
    }
    assert TRANSITIONS[State.DOWN] == {OK: (State.UP, Gate.HEALTHY_THRESHOLD_ONCE_UP)}


def test_enum_values() -> None:
    assert [s.value for s in State] == ["unknown", "up", "down"]
    assert {e.name for e in Event} == {"CHECK_OK", "CHECK_FAIL", "PASSIVE_FAIL"}


# --- initial state and first check ----------------------------------------------------


def test_new_server_is_unknown_and_takes_no_traffic() -> None:
    h = ServerHealth()
    assert h.state is State.UNKNOWN
    assert not h.available
    assert (h.successes, h.failures) == (0, 0)
    assert h.last_reason == ""
    assert h.last_check_at is None
    assert h.last_latency is None
    assert h.last_change_at is None
    assert h.last_change_reason is None


def test_first_ok_puts_server_up_at_once_despite_healthy_threshold() -> None:
    h = ServerHealth()
    t = h.observe(OK, "200 OK", 5.0, healthy_threshold=5, unhealthy_threshold=5, latency=0.003)
    assert t == Transition(State.UNKNOWN, State.UP, "check ok: 200 OK")
    assert h.available
    assert h.last_change_at == 5.0
    assert h.last_change_reason == "check ok: 200 OK"


def test_first_fail_puts_server_down_at_once_despite_unhealthy_threshold() -> None:
    h = ServerHealth()
    t = h.observe(FAIL, "refused", 5.0, healthy_threshold=5, unhealthy_threshold=5)
    assert t == Transition(State.UNKNOWN, State.DOWN, "check failed: refused")
    assert not h.available


def test_passive_fail_while_unknown_goes_down() -> None:
    h = ServerHealth()
    t = h.observe(PASSIVE, "connect refused", 5.0, healthy_threshold=2, unhealthy_threshold=2)
    assert t == Transition(State.UNKNOWN, State.DOWN, "passive failure: connect refused")
    # Not a check: the check fields stay untouched.
    assert h.last_check_at is None
    assert h.last_reason == ""


# --- UP ---------------------------------------------------------------------------------


def test_up_goes_down_after_unhealthy_threshold_failures() -> None:
    h = in_state(State.UP)
    assert feed(h, FAIL, FAIL, unhealthy=3) == []
    assert h.failures == 2 and h.available
    [t] = feed(h, FAIL, unhealthy=3)
    assert (t.old, t.new) == (State.UP, State.DOWN)
    assert t.reason == "3 consecutive checks failed (unhealthy_threshold 3), last: timeout"


def test_ok_resets_failure_count_in_up() -> None:
    h = in_state(State.UP)
    assert feed(h, FAIL, FAIL, OK, FAIL, FAIL, unhealthy=3) == []
    assert h.state is State.UP
    assert h.failures == 2
    [t] = feed(h, FAIL, unhealthy=3)
    assert t.new is State.DOWN


def test_unhealthy_threshold_one_goes_down_on_first_failure() -> None:
    h = in_state(State.UP)
    [t] = feed(h, FAIL, unhealthy=1)
    assert t.new is State.DOWN


def test_up_ok_changes_nothing_but_counts() -> None:
    h = in_state(State.UP)
    assert feed(h, OK, OK, OK) == []
    assert h.state is State.UP
    assert h.successes == 4


def test_up_passive_fail_goes_down_at_once() -> None:
    h = in_state(State.UP)
    t = h.observe(PASSIVE, "reset by peer", 9.0, healthy_threshold=2, unhealthy_threshold=10)
    assert t == Transition(State.UP, State.DOWN, "passive failure: reset by peer")
    assert h.successes == 0
    assert h.last_change_at == 9.0


def test_passive_down_comes_back_with_healthy_threshold_checks() -> None:
    h = in_state(State.UP)
    feed(h, PASSIVE)
    assert feed(h, OK, OK, healthy=3) == []
    [t] = feed(h, OK, healthy=3)
    assert (t.old, t.new) == (State.DOWN, State.UP)


# --- DOWN -------------------------------------------------------------------------------


def test_down_goes_up_after_healthy_threshold_successes() -> None:
    h = in_state(State.DOWN)
    assert feed(h, OK, OK, healthy=3) == []
    assert h.successes == 2 and not h.available
    [t] = feed(h, OK, healthy=3)
    assert (t.old, t.new) == (State.DOWN, State.UP)
    assert t.reason == "3 consecutive checks ok (healthy_threshold 3), last: 200 OK"
    assert h.available


def test_never_up_down_goes_up_on_its_first_ok_despite_healthy_threshold() -> None:
    # Envoy's startup rule: a backend down at start (or started after the proxy) serves
    # after one good check, not healthy_threshold of them.
    h = never_up_down()
    feed(h, FAIL, FAIL, PASSIVE, FAIL, healthy=3)
    assert h.state is State.DOWN
    [t] = feed(h, OK, healthy=3)
    assert (t.old, t.new) == (State.DOWN, State.UP)
    assert t.reason == "check ok, never up before (no healthy_threshold wait): 200 OK"
    assert h.available and h.been_up


def test_healthy_threshold_applies_once_the_server_has_been_up() -> None:
    h = never_up_down()
    feed(h, OK, healthy=3)
    [t] = feed(h, FAIL, FAIL, FAIL, unhealthy=3)
    assert t.new is State.DOWN
    assert feed(h, OK, OK, healthy=3) == []
    assert feed(h, OK, healthy=3)[0].new is State.UP


def test_been_up_is_set_by_every_way_up() -> None:
    h = ServerHealth()
    assert not h.been_up
    feed(h, OK)
    assert h.been_up
    feed(h, PASSIVE)
    assert h.been_up  # going down again does not forget it


def test_check_fail_resets_success_count_in_down() -> None:
    h = in_state(State.DOWN)
    assert feed(h, OK, OK, FAIL, OK, OK, healthy=3) == []
    assert h.successes == 2
    assert feed(h, OK, healthy=3)[0].new is State.UP


def test_passive_fail_resets_success_count_in_down() -> None:
    h = in_state(State.DOWN)
    assert feed(h, OK, OK, PASSIVE, OK, OK, healthy=3) == []
    assert h.state is State.DOWN
    assert feed(h, OK, healthy=3)[0].new is State.UP


def test_down_failures_change_nothing_but_count() -> None:
    h = in_state(State.DOWN)
    assert feed(h, FAIL, FAIL, PASSIVE, FAIL) == []
    assert h.state is State.DOWN
    assert h.failures == 3  # passive failures are not counted as failed checks


# --- counting, flapping, reloads --------------------------------------------------------


def test_flapping_never_crosses_either_threshold() -> None:
    h = in_state(State.UP)
    assert feed(h, *([FAIL, OK] * 50), healthy=2, unhealthy=2) == []
    assert h.state is State.UP
    h = in_state(State.DOWN)
    assert feed(h, *([OK, FAIL] * 50), healthy=2, unhealthy=2) == []
    assert h.state is State.DOWN


def test_full_cycle_reports_each_transition_exactly_once() -> None:
    h = ServerHealth()
    seq = [OK, OK, FAIL, FAIL, FAIL, FAIL, FAIL, OK, OK, OK, OK, PASSIVE, PASSIVE, OK, OK]
    got = [(t.old, t.new) for t in feed(h, *seq, healthy=2, unhealthy=3)]
    assert got == [
        (State.UNKNOWN, State.UP),  # first OK
        (State.UP, State.DOWN),  # third FAIL
        (State.DOWN, State.UP),  # second OK
        (State.UP, State.DOWN),  # first PASSIVE
        (State.DOWN, State.UP),  # second OK
    ]


def test_lowered_threshold_acts_on_count_already_reached() -> None:
    # A reload may lower a threshold below a count the server already has.
    h = in_state(State.UP)
    feed(h, FAIL, FAIL, FAIL, unhealthy=5)
    assert h.state is State.UP
    [t] = feed(h, FAIL, unhealthy=2)
    assert t.new is State.DOWN
    assert t.reason.startswith("4 consecutive checks failed (unhealthy_threshold 2)")


def test_check_fields_and_reason_carried() -> None:
    h = ServerHealth()
    h.observe(OK, "200 OK", 1.0, healthy_threshold=2, unhealthy_threshold=2, latency=0.012)
    assert (h.last_reason, h.last_check_at, h.last_latency) == ("200 OK", 1.0, 0.012)
    h.observe(
        FAIL, "unexpected status 500", 2.0, healthy_threshold=2, unhealthy_threshold=2, latency=0.5
    )
    assert (h.last_reason, h.last_check_at, h.last_latency) == ("unexpected status 500", 2.0, 0.5)
    h.observe(FAIL, "timeout", 3.0, healthy_threshold=2, unhealthy_threshold=2)
    assert (h.last_reason, h.last_check_at, h.last_latency) == ("timeout", 3.0, None)
    assert h.last_change_at == 3.0
    assert h.last_change_reason is not None
    assert h.last_change_reason.endswith("last: timeout")
    # No transition: last_change_* stay put.
    h.observe(FAIL, "refused", 4.0, healthy_threshold=2, unhealthy_threshold=2)
    assert h.last_change_at == 3.0


def test_bad_thresholds_rejected() -> None:
    h = ServerHealth()
    with pytest.raises(ValueError, match="thresholds must be >= 1"):
        h.observe(OK, "200 OK", 0.0, healthy_threshold=0, unhealthy_threshold=1)
    with pytest.raises(ValueError):
        h.observe(OK, "200 OK", 0.0, healthy_threshold=1, unhealthy_threshold=0)
    assert h.state is State.UNKNOWN and h.successes == 0


def test_server_health_is_slotted() -> None:
    h = ServerHealth()
    with pytest.raises(AttributeError):
        h.colour = "red"  # type: ignore[attr-defined]
    assert "up" in repr(in_state(State.UP))


# --- expected codes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "expected", "result"),
    [
        (200, ["http_2xx"], True),
        (204, ["http_2xx"], True),
        (299, ["http_2xx"], True),
        (301, ["http_2xx"], False),
        (301, ["http_2xx", "http_3xx"], True),
        (404, ["http_4xx"], True),
        (503, ["http_5xx"], True),
        (500, ["http_2xx", "http_3xx", "http_4xx"], False),
        (200, [200], True),
        (201, [200], False),
        (200, ["200"], True),
        (404, ["http_2xx", 404], True),
        (405, ["http_2xx", 404], False),
        (200, ["HTTP_2XX"], True),
        (200, [], False),
    ],
)
def test_codes_match(status: int, expected: list[str | int], result: bool) -> None:
    assert codes_match(status, expected) is result


def test_codes_match_rejects_junk_instead_of_never_matching() -> None:
    with pytest.raises(ValueError, match="http_6xx"):
        codes_match(200, ["http_6xx"])


def test_parse_expected_codes_normalises() -> None:
    assert parse_expected_codes(["http_2xx", "HTTP_3xx", 200, "404", " 500 ", 200, "http_2xx"]) == (
        "http_2xx",
        "http_3xx",
        200,
        404,
        500,
    )
    assert parse_expected_codes((100, 599)) == (100, 599)


@pytest.mark.parametrize(
    "bad",
    [
        ["http_1xx"],
        ["http_6xx"],
        ["2xx"],
        ["ok"],
        [""],
        [99],
        [600],
        ["600"],
        [-200],
        ["-200"],
        ["²00"],
        [True],
        [200.0],
        [None],
        [["200"]],
    ],
)
def test_parse_expected_codes_rejects_bad_items(bad: list[object]) -> None:
    with pytest.raises(ValueError, match=r"item 0 \(.*\) is neither a status class"):
        parse_expected_codes(bad)


def test_parse_expected_codes_names_the_bad_item() -> None:
    with pytest.raises(ValueError, match=r"item 2 \('http_600'\)"):
        parse_expected_codes(["http_2xx", 301, "http_600"])


def test_parse_expected_codes_rejects_empty_and_bare_string() -> None:
    with pytest.raises(ValueError, match="empty"):
        parse_expected_codes([])
    with pytest.raises(ValueError, match="string"):
        parse_expected_codes("http_2xx")
