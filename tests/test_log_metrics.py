"""Structured log lines, guest log rate limiting, Prometheus rendering."""

import io

from backendd.log import EventLog, GuestLogLimiter, format_event
from backendd.metrics import render


def test_event_line_is_logfmt_with_priority() -> None:
    line = format_event("warning", "request.rejected", {"devid": 51712, "why": 'bad "gref"'})
    assert line == '<4>level=warning event=request.rejected devid=51712 why="bad \\"gref\\""'


def test_level_threshold() -> None:
    out = io.StringIO()
    log = EventLog("warning", out)
    log.info("quiet")
    log.error("loud", code=5)
    assert out.getvalue() == "<3>level=error event=loud code=5\n"


def test_guest_errors_are_rate_limited_per_key() -> None:
    out = io.StringIO()
    now = [0.0]
    limiter = GuestLogLimiter(EventLog("info", out), burst=3, window=60, clock=lambda: now[0])
    written = [limiter.warning((1, "blk"), "bad.request", n=i) for i in range(10)]
    assert written == [True] * 3 + [False] * 7
    assert limiter.warning((2, "blk"), "bad.request")  # another guest has its own budget
    now[0] = 61.0
    assert limiter.warning((1, "blk"), "bad.request", n=10)
    last = out.getvalue().splitlines()[-1]
    assert "suppressed=7" in last and "n=10" in last


def test_prometheus_render_groups_by_name() -> None:
    text = render([
        ({"guest": "g1", "devid": "1", "type": "blk"}, {"requests": 5, "in_flight": 2}),
        ({"guest": "g1", "devid": "2", "type": "net"}, {"requests": 7}),
    ])
    lines = text.splitlines()
    assert lines.count("# TYPE backendd_requests counter") == 1
    assert '# TYPE backendd_in_flight gauge' in lines
    assert 'backendd_requests{guest="g1",devid="1",type="blk"} 5' in lines
    assert 'backendd_requests{guest="g1",devid="2",type="net"} 7' in lines
    assert text.endswith("\n")
