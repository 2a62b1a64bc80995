"""The exchange's state table: every move it has, none it has not, and what a state says."""

from __future__ import annotations

import pytest

from lbproxy.proxy import exchange_state as st

ALL_STATES = range(len(st.STATE_NAMES))
ALL_EVENTS = range(len(st.EVENT_NAMES))


def test_every_move_in_the_table_is_taken_and_every_other_raises() -> None:
    for state in ALL_STATES:
        for event in ALL_EVENTS:
            expected = st.TRANSITIONS.get((state, event))
            if expected is None:
                with pytest.raises(st.IllegalTransition, match=st.STATE_NAMES[state]):
                    st.advance(state, event)
            else:
                assert st.advance(state, event) == expected


def test_nothing_leaves_the_end_but_the_rest_of_the_request_body() -> None:
    for event in ALL_EVENTS:
        with pytest.raises(st.IllegalTransition):
            st.advance(st.DONE, event)
    assert st.advance(st.DONE_UNREAD, st.REQUEST_END) == st.DONE
    with pytest.raises(st.IllegalTransition):
        st.advance(st.DONE_UNREAD, st.END)  # ending twice is a bug


def test_request_end_sets_completeness_and_keeps_the_row() -> None:
    for state in ALL_STATES:
        complete = st.request_complete(state)
        if complete:
            with pytest.raises(st.IllegalTransition):
                st.advance(state, st.REQUEST_END)
        else:
            nxt = st.advance(state, st.REQUEST_END)
            assert st.request_complete(nxt) and nxt >> 1 == state >> 1


def test_a_request_goes_through_its_states() -> None:
    # A POST whose body is written as it arrives, answered after it is all in.
    s = st.RECEIVING
    for event in (st.BODY_SENT, st.BODY_SENT, st.REQUEST_END, st.RESPONSE_START, st.END):
        s = st.advance(s, event)
    assert s == st.DONE and st.is_over(s) and st.request_complete(s)
    # An early answer: the backend responds and finishes before the body is all in.
    s = st.advance(st.advance(st.RECEIVING, st.RESPONSE_START), st.END)
    assert s == st.DONE_UNREAD and st.is_over(s) and not st.request_complete(s)


def test_can_retry_follows_the_state() -> None:
    # Nothing of the body sent: always, whether or not a copy was kept.
    for state in (st.RECEIVING, st.WAITING):
        assert st.can_retry(state, False) and st.can_retry(state, True)
    # Body bytes sent: only with the whole body kept for a replay.
    assert not st.can_retry(st.SENDING, True)
    assert st.can_retry(st.SENT, True) and not st.can_retry(st.SENT, False)
    # The response started, or the exchange is over: never.
    for state in (st.RESPONDING_EARLY, st.RESPONDING, st.DONE_UNREAD, st.DONE):
        assert not st.can_retry(state, True)
    # A retry starts the request again: nothing of it with the new server.
    assert st.advance(st.SENT, st.RETRY) == st.WAITING
    assert st.advance(st.SENDING, st.RETRY) == st.RECEIVING
    assert st.body_sent(st.SENT) and not st.body_sent(st.advance(st.SENT, st.RETRY))


def test_responding_is_only_the_two_responding_states() -> None:
    assert [s for s in ALL_STATES if st.responding(s)] == [st.RESPONDING_EARLY, st.RESPONDING]
