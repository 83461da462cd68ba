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
        ({"guest": "g1", "devid": "1", "type": "blk"}, {"requests": 5, "queues": 2}),
        ({"guest": "g1", "devid": "2", "type": "blk"}, {"requests": 7, "new_thing": 1}),
    ])
    lines = text.splitlines()
    assert lines.count("# TYPE backendd_blk_requests_total counter") == 1
    assert lines.count("# HELP backendd_blk_requests_total Block requests taken from the "
                       "rings.") == 1
    assert "# TYPE backendd_device_queues gauge" in lines
    assert 'backendd_blk_requests_total{guest="g1",devid="1",type="blk"} 5' in lines
    assert 'backendd_blk_requests_total{guest="g1",devid="2",type="blk"} 7' in lines
    # Known counters a device did not report are 0; unknown ones still get a family.
    assert 'backendd_blk_writes_total{guest="g1",devid="1",type="blk"} 0' in lines
    assert "# TYPE backendd_blk_new_thing_total counter" in lines
    assert text.endswith("\n")


def test_stdlib_logging_from_device_modules_becomes_logfmt_lines() -> None:
    import io
    import logging

    from backendd.log import EventLog, route_stdlib_logging

    out = io.StringIO()
    handler = route_stdlib_logging(EventLog("info", out), "info")
    try:
        logging.getLogger("backendd.devices.blk.device").warning("blk %d: ring halted", 7)
        logging.getLogger("backendd.devices.net").debug("not shown at info")
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("backendd.x").exception("failed")
    finally:
        logging.getLogger().removeHandler(handler)
    lines = out.getvalue().splitlines()
    assert lines[0] == ('<4>level=warning event=log logger=backendd.devices.blk.device '
                        'message="blk 7: ring halted"')
    assert len(lines) == 2
    assert lines[1].startswith("<3>level=error event=log logger=backendd.x message=failed "
                               "traceback=")
    assert "ValueError: boom" in lines[1]
