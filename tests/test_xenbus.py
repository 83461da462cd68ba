"""The backend half of the xenbus state machine."""

import pytest

from backendd.xenbus import TRANSITIONS, Action, XenbusBackend
from rings.consts import XenbusState as S


def drive(backend: XenbusBackend, *states: S) -> list[tuple[S, Action]]:
    seen = []
    for state in states:
        transition = backend.on_frontend(state)
        backend.commit(transition)
        seen.append((backend.state, transition.action))
    return seen


def test_connect_close_reconnect() -> None:
    backend = XenbusBackend()
    assert backend.state is S.INIT_WAIT
    assert drive(backend, S.INITIALISING, S.INITIALISED, S.CONNECTED, S.CLOSING, S.CLOSED,
                 S.INITIALISING, S.CONNECTED) == [
        (S.INIT_WAIT, Action.NONE),
        (S.CONNECTED, Action.CONNECT),
        (S.CONNECTED, Action.NONE),  # Initialised then Connected connects once
        (S.CLOSING, Action.DISCONNECT),
        (S.CLOSED, Action.DISCONNECT),  # idempotent teardown
        (S.INIT_WAIT, Action.NONE),  # reconnect after close
        (S.CONNECTED, Action.CONNECT),
    ]


def test_closed_without_closing_still_disconnects() -> None:
    backend = XenbusBackend()
    drive(backend, S.CONNECTED)
    assert drive(backend, S.CLOSED) == [(S.CLOSED, Action.DISCONNECT)]


def test_frontend_vanishing_tears_down() -> None:
    backend = XenbusBackend()
    drive(backend, S.CONNECTED)
    assert drive(backend, S.UNKNOWN) == [(S.CLOSED, Action.DISCONNECT)]


def test_failed_connect_leaves_state_unchanged() -> None:
    backend = XenbusBackend()
    transition = backend.on_frontend(S.CONNECTED)
    assert transition.action is Action.CONNECT
    # The session does not commit a transition whose action failed.
    assert backend.state is S.INIT_WAIT
    assert backend.on_frontend(S.CONNECTED).action is Action.CONNECT


@pytest.mark.parametrize("frontend", [S.RECONFIGURING, S.RECONFIGURED, S.INIT_WAIT])
def test_unsupported_states_change_nothing(frontend: S) -> None:
    backend = XenbusBackend()
    drive(backend, S.CONNECTED)
    assert drive(backend, frontend) == [(S.CONNECTED, Action.NONE)]


def test_closed_backend_ignores_connect_until_reinitialised() -> None:
    backend = XenbusBackend()
    drive(backend, S.CONNECTED, S.CLOSED)
    assert drive(backend, S.CONNECTED) == [(S.CLOSED, Action.NONE)]


def test_unknown_state_number_is_refused() -> None:
    with pytest.raises(ValueError, match="not a xenbus state"):
        XenbusBackend().on_frontend(42)


def test_table_never_connects_outside_init_wait() -> None:
    for (backend_state, _frontend), transition in TRANSITIONS.items():
        if transition.action is Action.CONNECT:
            assert backend_state is S.INIT_WAIT
