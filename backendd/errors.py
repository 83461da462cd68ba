"""The two error families, converted to replies or ring actions at one point each.

- GuestError: something an untrusted guest did (bad grant, bad request, corrupt ring).
  Becomes an error response for that request, or halts that one ring; never propagates
  to the event loop.
- ControlError: something the VMM peer asked that cannot be done. Becomes an error reply
  (errno + message) on the control socket; the connection carries on.
Anything else is a local bug and is logged with its traceback.
"""

import errno as _errno


class GuestError(Exception):
    """A guest broke a rule. The message names the rule, for logs and notices."""


class ControlError(Exception):
    """A control request that fails; `code` is a positive errno value."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ConfigError(ControlError):
    """A bad device or daemon configuration key; the message names the key."""

    def __init__(self, message: str) -> None:
        super().__init__(_errno.EINVAL, message)


class StartupError(Exception):
    """The daemon cannot start (socket in use, no permission, port taken): one line for the
    operator, naming the path or address; never a traceback."""
