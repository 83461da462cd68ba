"""The composition root of `backendd serve`: config, the control socket (bound or handed
over by systemd), sd_notify readiness and watchdog, signals, the metrics endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket

from .config import Config
from .errors import StartupError
from .log import EventLog, route_stdlib_logging
from .metrics import render_status
from .sdnotify import Notifier, listen_fds, watchdog_interval
from .server import Server


def prometheus_text(server: Server) -> str:
    return render_status(server.full_status())


async def _serve_metrics(server: Server, listen: str) -> asyncio.AbstractServer:
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5)
            # Drain the request headers; the body of a GET is empty.
            while (line := await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b""):
                del line
            path = request.split()[1] if len(request.split()) > 1 else b"/"
            if path == b"/metrics":
                body = prometheus_text(server).encode()
                head = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
            else:
                body = b"not found\n"
                head = b"HTTP/1.0 404 Not Found\r\nContent-Type: text/plain\r\n"
            writer.write(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    try:
        return await asyncio.start_server(handle, host, int(port))
    except OSError as exc:
        raise StartupError(f"metrics: cannot listen on {listen}: {exc.strerror or exc}") from None


def _signal_ready_fd(fd: int) -> None:
    """`--ready-fd N`: one line, then the fd is closed, so a reader sees READY=1 or, if the
    daemon failed before listening, end-of-file."""
    try:
        os.write(fd, b"READY=1\n")
    except OSError:
        pass  # nobody reads it any more: not a reason to stop serving
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


async def run(config: Config, socket_path: str | None = None,
              log: EventLog | None = None, notifier: Notifier | None = None,
              ready_fd: int | None = None) -> int:
    log = log if log is not None else EventLog(config.daemon.log_level)
    route_stdlib_logging(log, config.daemon.log_level)
    notifier = notifier if notifier is not None else Notifier()
    loop = asyncio.get_running_loop()
    server = Server(config, log)
    activated = listen_fds()
    sock = None
    if activated:
        sock = socket.socket(fileno=activated[0])
        for extra in activated[1:]:
            socket.socket(fileno=extra).close()
    try:
        await server.start(socket_path, sock)
        metrics = None
        metrics_address = ""
        if config.metrics.listen:
            metrics = await _serve_metrics(server, config.metrics.listen)
            # The address bound, so port 0 (any free port) can be found in the log and status.
            host, port = metrics.sockets[0].getsockname()[:2]
            metrics_address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            log.info("metrics_listening", address=metrics_address)
    except BaseException:
        # A start that fails leaves no socket file behind.
        await server.close()
        raise

    stop = loop.create_future()

    def request_stop(signame: str) -> None:
        log.info("stopping", signal=signame)
        if not stop.done():
            stop.set_result(None)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, request_stop, sig.name)

    async def watchdog(interval: float) -> None:
        # Pinged from the loop itself: a wedged loop stops the pings and systemd restarts us.
        while True:
            notifier.watchdog()
            await asyncio.sleep(interval)

    interval = watchdog_interval()
    dog = loop.create_task(watchdog(interval)) if interval else None
    notifier.ready(f"listening on {server.address}"
                   + (" (socket activation)" if activated else "")
                   + (f", metrics on {metrics_address}" if metrics is not None else ""))
    if ready_fd is not None:
        _signal_ready_fd(ready_fd)
    try:
        await stop
    finally:
        notifier.stopping()
        if dog is not None:
            dog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await dog
        if metrics is not None:
            metrics.close()
            await metrics.wait_closed()
        await server.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    log.info("stopped")
    return 0
