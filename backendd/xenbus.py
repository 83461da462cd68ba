"""The backend half of the xenbus state machine, as a table.

Theory of operation. The VMM owns xenstore; the daemon owns the backend's state. When a
device is added the backend advertises its features and waits (InitWait). From then on
the only input is the frontend's state, which the VMM forwards with the frontend's keys.
Each (backend state, frontend state) pair maps to the backend's next state and the one
action the session must take for it:

- CONNECT: map the rings named in the frontend's keys and start serving; on success the
  backend publishes its connect-time keys and becomes Connected. On failure it stays where
  it was and the error goes back to the VMM.
- DISCONNECT: stop serving and release every ring and grant. Idempotent: Closing then
  Closed both ask for it, as blkback does, so a frontend that skips Closing still gets a
  clean teardown (XSA-349/350: connect and disconnect must be safe to repeat).

A frontend that comes back to Initialising after Closed is reconnecting (a guest reboot or
driver reload): the backend returns to InitWait and will connect again. Pairs absent from
the table leave the backend as it is with no action: a frontend repeating a state, or
using states the backend does not support (Reconfiguring), must not disturb it.
"""

from dataclasses import dataclass
from enum import Enum

from rings.consts import XenbusState as S


class Action(Enum):
    NONE = "none"
    CONNECT = "connect"
    DISCONNECT = "disconnect"


@dataclass(frozen=True)
class Transition:
    state: S
    action: Action


_CONNECTING = (S.INITIALISED, S.CONNECTED)

# (backend state, frontend state) -> (next backend state, action)
TRANSITIONS: dict[tuple[S, S], Transition] = {
    **{(S.INIT_WAIT, f): Transition(S.CONNECTED, Action.CONNECT) for f in _CONNECTING},
    **{(b, S.CLOSING): Transition(S.CLOSING, Action.DISCONNECT)
       for b in (S.INIT_WAIT, S.CONNECTED)},
    **{(b, S.CLOSED): Transition(S.CLOSED, Action.DISCONNECT)
       for b in (S.INIT_WAIT, S.CONNECTED, S.CLOSING)},
    # The frontend vanished (its xenstore directory was removed): tear down.
    **{(b, S.UNKNOWN): Transition(S.CLOSED, Action.DISCONNECT)
       for b in (S.INIT_WAIT, S.CONNECTED, S.CLOSING)},
    # Reconnect after close.
    **{(b, S.INITIALISING): Transition(S.INIT_WAIT, Action.NONE)
       for b in (S.CLOSING, S.CLOSED)},
}


class XenbusBackend:
    """One device's backend state. `on_frontend()` says what to do; `commit()` records the
    new state once the action succeeded, so a failed connect leaves the state unchanged."""

    def __init__(self) -> None:
        self.state = S.INIT_WAIT
        self.frontend_state = S.INITIALISING

    def on_frontend(self, frontend_state: int) -> Transition:
        try:
            frontend = S(frontend_state)
        except ValueError:
            raise ValueError(f"{frontend_state} is not a xenbus state") from None
        self.frontend_state = frontend
        return TRANSITIONS.get((self.state, frontend), Transition(self.state, Action.NONE))

    def commit(self, transition: Transition) -> None:
        self.state = transition.state
