"""The lifecycle of one exchange as data: its states, the events that move it, and the table of
which event may move which state where (h11's ``_state.py`` is the model). Pure: no I/O.

An exchange is in exactly one state. A state says two things at once: how far the request
has reached the backend (the first three rows below), and whether the client's request body
is all in (right column) or still arriving (left column). The two progress independently
(a backend may answer before the body is all in), so both are in the state:

    request body still arriving        request complete (no body, or all of it in)

        RECEIVING  ---- REQUEST_END ---->  WAITING           nothing of the body with a
         |  ^                               |  ^              backend yet: a retry is safe
    BODY_SENT  RETRY                   BODY_SENT  RETRY
         v  |                               v  |
        SENDING    ---- REQUEST_END ---->  SENT              body bytes went to a backend:
         |                                  |                 a retry needs the replay copy
    RESPONSE_START                     RESPONSE_START
         v                                  v
        RESPONDING_EARLY - REQUEST_END ->  RESPONDING        response bytes went to the
         |                                  |                 client: no retry, a failure
        END                                END                is a cut
         v                                  v
        DONE_UNREAD ------ REQUEST_END ->  DONE              over (answered, failed, cut,
                                                              tunnelled, or the client left)

Not drawn: RESPONSE_START also leaves RECEIVING and WAITING (a bodiless request's head was
enough; an early answer), END leaves every state that is not over, and BODY_SENT is a
self-loop where body bytes keep going out (SENDING, RESPONDING_EARLY; SENT and RESPONDING
for the last ones of a body written as it completes).

A state is a small int (``Final``: mypyc inlines the constants, and the exchange stores one
int): bit 0 is "the request is complete", the bits above it the row. ``advance`` looks the
next state up in a flat tuple and raises ``IllegalTransition`` for a move the table does not
have: an event in the wrong state is a bug in the exchange, found by the tests at once rather
than left as a quiet inconsistency.
"""

from __future__ import annotations

from typing import Final

# --- states ------------------------------------------------------------------------------
RECEIVING: Final = 0
WAITING: Final = 1
SENDING: Final = 2
SENT: Final = 3
RESPONDING_EARLY: Final = 4
RESPONDING: Final = 5
DONE_UNREAD: Final = 6
DONE: Final = 7
STATE_NAMES: Final = (
    "RECEIVING",
    "WAITING",
    "SENDING",
    "SENT",
    "RESPONDING_EARLY",
    "RESPONDING",
    "DONE_UNREAD",
    "DONE",
)

# --- events ------------------------------------------------------------------------------
REQUEST_END: Final = 0  # the last byte of the request body came in
BODY_SENT: Final = 1  # request body bytes were written to the backend connection
RETRY: Final = 2  # the request goes to a server again: nothing of it is there yet
RESPONSE_START: Final = 3  # the response head went to the client
END: Final = 4  # the exchange is over
EVENT_NAMES: Final = ("REQUEST_END", "BODY_SENT", "RETRY", "RESPONSE_START", "END")

TRANSITIONS: Final[dict[tuple[int, int], int]] = {
    (RECEIVING, REQUEST_END): WAITING,
    (SENDING, REQUEST_END): SENT,
    (RESPONDING_EARLY, REQUEST_END): RESPONDING,
    (DONE_UNREAD, REQUEST_END): DONE,
    (RECEIVING, BODY_SENT): SENDING,
    (WAITING, BODY_SENT): SENT,
    (SENDING, BODY_SENT): SENDING,
    (SENT, BODY_SENT): SENT,
    (RESPONDING_EARLY, BODY_SENT): RESPONDING_EARLY,
    (RESPONDING, BODY_SENT): RESPONDING,
    (RECEIVING, RETRY): RECEIVING,
    (WAITING, RETRY): WAITING,
    (SENDING, RETRY): RECEIVING,
    (SENT, RETRY): WAITING,
    (RECEIVING, RESPONSE_START): RESPONDING_EARLY,
    (WAITING, RESPONSE_START): RESPONDING,
    (SENDING, RESPONSE_START): RESPONDING_EARLY,
    (SENT, RESPONSE_START): RESPONDING,
    (RECEIVING, END): DONE_UNREAD,
    (SENDING, END): DONE_UNREAD,
    (RESPONDING_EARLY, END): DONE_UNREAD,
    (WAITING, END): DONE,
    (SENT, END): DONE,
    (RESPONDING, END): DONE,
}

_EVENTS: Final = len(EVENT_NAMES)
# The table flattened for the hot path: index state * _EVENTS + event, -1 where illegal.
_NEXT: Final[tuple[int, ...]] = tuple(
    TRANSITIONS.get((state, event), -1)
    for state in range(len(STATE_NAMES))
    for event in range(_EVENTS)
)


class IllegalTransition(Exception):
    """An event the exchange's state does not allow: a bug in the exchange."""


def advance(state: int, event: int) -> int:
    """The state ``event`` moves ``state`` to; raises ``IllegalTransition`` if it may not."""
    nxt = _NEXT[state * _EVENTS + event]
    if nxt < 0:
        raise IllegalTransition(f"{EVENT_NAMES[event]} in state {STATE_NAMES[state]}")
    return nxt


# --- what a state says -------------------------------------------------------------------
def request_complete(state: int) -> bool:
    """The client's request (head and body) is all in."""
    return bool(state & 1)


def is_over(state: int) -> bool:
    return state >= DONE_UNREAD


def responding(state: int) -> bool:
    """Response bytes went to the client and the exchange is not over yet."""
    return RESPONDING_EARLY <= state <= RESPONDING


def body_sent(state: int) -> bool:
    """Request body bytes went to the backend in use (a retry must replay them)."""
    return SENDING <= state <= SENT


def can_retry(state: int, replayable: bool) -> bool:
    """Whether a failure before any response byte may send the request to a server again:
    always while nothing of the body went out; once some did, only when all of it is in and
    a copy was kept to send again (``replayable``); never once the response started."""
    return state <= WAITING or (state == SENT and replayable)
