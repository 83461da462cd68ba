"""Transmit credit as netback schedules it: `credit_bytes` every `credit_usec`, a packet
goes only while it fits in the remaining credit, and idle time banks credit up to a burst
of max(128 KiB, credit_bytes) so a 64 KiB GSO packet can always pass eventually. Pure:
the caller passes the clock and arms its own timer for `next_credit`."""

from __future__ import annotations

from backendd.errors import ConfigError

MIN_BURST = 131072


def parse_rate(value: str) -> tuple[int, int]:
    """The toolstack's "rate" key: "bytes,usec"."""
    parts = value.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ConfigError(f"net: rate {value!r}: expected \"bytes,usec\"")
    nbytes, usec = (int(p) for p in parts)
    if nbytes <= 0 or usec <= 0 or usec > 3_600_000_000 or nbytes >= 1 << 63:
        raise ConfigError(f"net: rate {value!r}: bytes and usec must be positive")
    return nbytes, usec


class CreditScheduler:
    def __init__(self, credit_bytes: int, credit_usec: int, now: float) -> None:
        self.credit_bytes = credit_bytes
        self.credit_window = credit_usec / 1e6
        self.remaining = credit_bytes
        self.window_start = now
        self.max_burst = max(MIN_BURST, credit_bytes)
        self.waiting = False  # a refill timer is pending: nothing goes until it runs

    @property
    def next_credit(self) -> float:
        return self.window_start + self.credit_window

    def _refill(self) -> None:
        self.remaining = min(self.remaining + self.credit_bytes, self.max_burst)

    def admit(self, size: int, now: float) -> bool:
        """True (and charge it) if a `size`-byte packet may go now; False: call
        timer_fired at `resume_at`, then ask again."""
        if self.waiting:
            return False
        if now >= self.next_credit:
            # Windows missed while idle are not credited one by one: one refill, as
            # netback does, capped at the burst.
            self.window_start = now
            self._refill()
        if size > self.remaining:
            # The next window starts when the current one ends; the caller's timer
            # (armed for `resume_at`) brings its credit.
            self.window_start = self.next_credit
            self.waiting = True
            return False
        self.remaining -= size
        return True

    @property
    def resume_at(self) -> float:
        """When to call timer_fired after admit said no."""
        return self.window_start

    def timer_fired(self) -> None:
        """The timer armed for resume_at ran: credit for the window that just began."""
        self.waiting = False
        self._refill()
