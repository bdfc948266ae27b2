"""TCP proxy that emulates a WAN link on loopback: one-way delay and optional bandwidth cap.

The kernel here has no netem, so latency is added in user space. Every chunk read
from one side is released to the other side rtt/2 after it arrived, in order;
with ``mbit`` the chunks are also serialized at that rate (per direction). A cap
on queued bytes per direction gives the sender back-pressure, like a real link
whose buffer fills (under a bandwidth cap: what is on the wire plus 100 ms).

Run as its own process so the benchmark's own work (polling, comparing) cannot
add jitter through the GIL:

    python -m benchmarks.proxy --target 127.0.0.1:2222 --rtt-ms 40 [--mbit 100]

prints ``LISTENING <port>`` once it accepts connections. ``ProxyProcess``
starts and stops it; ``measure_link`` checks a ping-pong through it takes ≈ RTT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import deque

CHUNK = 256 * 1024
QUEUE_LIMIT = 32 * 1024 * 1024  # bytes held per direction before reading pauses
CAPPED_BUFFER_S = 0.1  # under a bandwidth cap: a router buffer of 100 ms at the capped rate


class _Pipe:
    """One direction of one connection: read, hold for the delay, write."""

    def __init__(self, reader, writer, delay: float, mbit: float):
        self.reader, self.writer = reader, writer
        self.delay = delay
        self.bytes_per_s = mbit * 125_000 if mbit else 0.0
        self.queue: deque[tuple[float, bytes]] = deque()  # (arrival time, data)
        self.queued = 0
        # under a cap, hold what is on the wire (rate × delay) plus a modest buffer,
        # so a bulk transfer cannot queue seconds of data ahead of a small request
        self.limit = QUEUE_LIMIT if not mbit else int(
            self.bytes_per_s * (delay + CAPPED_BUFFER_S)) + CHUNK
        self.eof = False
        self.have_data = asyncio.Event()
        self.have_room = asyncio.Event()
        self.have_room.set()

    async def run(self) -> None:
        sender = asyncio.create_task(self._send())
        receiver = asyncio.create_task(self._receive())
        # if the far side goes away, stop reading this side too (instead of waiting for room)
        sender.add_done_callback(lambda _: receiver.cancel())
        with contextlib.suppress(asyncio.CancelledError):
            await receiver
        self.eof = True
        self.have_data.set()
        with contextlib.suppress(ConnectionError, OSError):
            await sender

    async def _receive(self) -> None:
        try:
            while True:
                await self.have_room.wait()
                data = await self.reader.read(CHUNK)
                if not data:
                    return
                self.queue.append((time.monotonic(), data))
                self.queued += len(data)
                if self.queued >= self.limit:
                    self.have_room.clear()
                self.have_data.set()
        except (ConnectionError, OSError):
            return

    async def _send(self) -> None:
        link_free = 0.0  # when the emulated link has finished sending what came before
        while True:
            if not self.queue:
                if self.eof:
                    break
                self.have_data.clear()
                await self.have_data.wait()
                continue
            arrived, data = self.queue.popleft()
            sent = arrived
            if self.bytes_per_s:  # serialized at the capped rate, one chunk after another
                sent = link_free = max(arrived, link_free) + len(data) / self.bytes_per_s
            due = sent + self.delay
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self.writer.write(data)
            await self.writer.drain()
            self.queued -= len(data)
            if self.queued < self.limit:
                self.have_room.set()
        with contextlib.suppress(OSError):
            self.writer.write_eof()


async def serve(listen_host: str, listen_port: int, target: tuple[str, int], rtt_ms: float,
                mbit: float, ready=None) -> None:
    """Serve forever; ``ready(port)`` is called once listening."""
    delay = rtt_ms / 2000.0

    async def handle(client_r, client_w):
        try:
            server_r, server_w = await asyncio.open_connection(*target)
        except OSError:
            client_w.close()
            return
        try:
            await asyncio.gather(
                _Pipe(client_r, server_w, delay, mbit).run(),
                _Pipe(server_r, client_w, delay, mbit).run(),
            )
        finally:
            for w in (client_w, server_w):
                w.close()

    server = await asyncio.start_server(handle, listen_host, listen_port)
    port = server.sockets[0].getsockname()[1]
    if ready:
        ready(port)
    async with server:
        await server.serve_forever()


class ProxyProcess:
    """The proxy in a child process; ``with ProxyProcess(...) as p: p.port``."""

    def __init__(self, target_port: int, rtt_ms: float, mbit: float = 0.0,
                 target_host: str = "127.0.0.1"):
        self.args = [sys.executable, "-m", "benchmarks.proxy",
                     "--target", f"{target_host}:{target_port}",
                     "--rtt-ms", str(rtt_ms), "--mbit", str(mbit)]
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def start(self) -> ProxyProcess:
        # the package must be importable from the child: run it from our import root
        root = __file__.rsplit("/benchmarks/", 1)[0]
        self.proc = subprocess.Popen(self.args, cwd=root, stdout=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("LISTENING "):
            self.stop()
            raise RuntimeError(f"proxy did not start: {line!r}")
        self.port = int(line.split()[1])
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout:
            proc.stdout.close()

    def __enter__(self) -> ProxyProcess:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


class _EchoServer:
    """Loopback helper for measure_link: echoes small messages; for a bulk
    upload (first byte b"B") it answers one byte once the announced length arrived."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.sock.accept()
                threading.Thread(target=self._client, args=(conn,), daemon=True).start()

    @staticmethod
    def _client(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while True:
                head = conn.recv(9)
                if not head:
                    return
                if head[:1] == b"B":
                    while len(head) < 9:
                        head += conn.recv(9 - len(head))
                    left = int.from_bytes(head[1:9], "big")
                    while left > 0:
                        got = conn.recv(min(left, 1 << 20))
                        if not got:
                            return
                        left -= len(got)
                    conn.sendall(b"k")
                else:
                    conn.sendall(head)

    def close(self) -> None:
        self.sock.close()


def measure_link(rtt_ms: float, mbit: float = 0.0, pings: int = 20) -> dict:
    """Start a proxy in front of an echo server and measure what it really does:
    the median ping-pong time (should be ≈ RTT) and, with a cap, the bulk rate."""
    echo = _EchoServer()
    try:
        with ProxyProcess(echo.port, rtt_ms, mbit) as proxy, \
                socket.create_connection(("127.0.0.1", proxy.port)) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            times = []
            for _ in range(pings):
                t0 = time.perf_counter()
                s.sendall(b"p")
                if s.recv(1) != b"p":
                    raise RuntimeError("echo through proxy returned the wrong byte")
                times.append(time.perf_counter() - t0)
            out = {"rtt_ms_median": round(statistics.median(times) * 1000, 2),
                   "rtt_ms_min": round(min(times) * 1000, 2),
                   "rtt_ms_max": round(max(times) * 1000, 2)}
            if mbit:
                size = int(mbit * 125_000 * 1.0)  # about one second's worth
                t0 = time.perf_counter()
                s.sendall(b"B" + size.to_bytes(8, "big") + bytes(size))
                s.recv(1)
                elapsed = time.perf_counter() - t0 - statistics.median(times)
                out["mbit_measured"] = round(size * 8 / 1e6 / max(elapsed, 1e-6), 1)
            return out
    finally:
        echo.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", default="127.0.0.1:0", help="host:port (port 0 = any free)")
    ap.add_argument("--target", help="host:port to forward to")
    ap.add_argument("--rtt-ms", type=float, default=40.0)
    ap.add_argument("--mbit", type=float, default=0.0, help="cap per direction, 0 = none")
    ap.add_argument("--measure", action="store_true",
                    help="ignore --target: measure a ping-pong through a proxy and exit")
    a = ap.parse_args(argv)
    if a.measure:
        print(measure_link(a.rtt_ms, a.mbit))
        return
    if not a.target:
        ap.error("--target is required")
    lh, lp = a.listen.rsplit(":", 1)
    th, tp = a.target.rsplit(":", 1)

    def ready(port: int) -> None:
        print(f"LISTENING {port}", flush=True)

    # nothing to flush: a link that vanishes is what a terminated proxy should be
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(lh, int(lp), (th, int(tp)), a.rtt_ms, a.mbit, ready))


if __name__ == "__main__":
    main()
