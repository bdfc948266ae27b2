"""What paramiko costs per byte sent: 64 MiB of SFTP WRITEs over a real sshd.

    python -m benchmarks.sendpath [--joined N] [--runs N]

Starts the tests' SFTP-only sshd on loopback, opens one SFTP channel the way
sftpfs does (AES-GCM first, the same window) and sends 64 MiB as 255 KiB
WRITEs, N per `sendall`, handing paramiko bytes and then a memoryview,
alternately. Prints the process CPU time and wall time of each. A tool for
deciding whether a change to the send path is worth it (docs/zero-latency.md),
not part of the benchmark report.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import paramiko

from sftpfs.remote import protocol as p
from sftpfs.remote.channel import MAX_PACKET, WINDOW_SIZE
from sftpfs.remote.ssh import _fast_ciphers_first

CHUNK = 255 << 10
TOTAL = 64 << 20


def _channel(port: int, user: str, key: Path) -> tuple[paramiko.Transport, paramiko.Channel]:
    t = paramiko.Transport(socket.create_connection(("127.0.0.1", port)))
    opts = t.get_security_options()
    opts.ciphers = _fast_ciphers_first(opts.ciphers)
    t.start_client()
    t.auth_publickey(user, paramiko.Ed25519Key.from_private_key_file(str(key)))
    c = t.open_session(window_size=WINDOW_SIZE, max_packet_size=MAX_PACKET)
    c.invoke_subsystem("sftp")
    return t, c


def _reply(c: paramiko.Channel) -> bytes:
    def exact(n: int) -> bytes:
        out = b""
        while len(out) < n:
            got = c.recv(n - len(out))
            if not got:
                raise EOFError("server closed the channel")
            out += got
        return out
    return exact(int.from_bytes(exact(4), "big"))


def send_once(port: int, user: str, key: Path, path: bytes, joined: int, view: bool) -> tuple[float, float]:
    t, c = _channel(port, user, key)
    try:
        c.sendall(p.packet(p.FXP_INIT, None, p.u32(3)))
        _reply(c)
        c.sendall(p.packet(p.FXP_OPEN, 1, p.string(path),
                           p.u32(p.FXF_WRITE | p.FXF_CREAT | p.FXF_TRUNC), p.Attrs().encode()))
        r = _reply(c)
        handle = r[9:9 + int.from_bytes(r[5:9], "big")]
        data = os.urandom(CHUNK)
        n = TOTAL // CHUNK
        cpu, wall = time.process_time(), time.perf_counter()
        for i in range(0, n, joined):
            group = range(i, min(n, i + joined))
            buf = b"".join(p.packet(p.FXP_WRITE, 10 + j, p.string(handle), p.u64(j * CHUNK),
                                    p.string(data)) for j in group)
            c.sendall(memoryview(buf) if view else buf)
            for _ in group:
                _reply(c)
        return time.process_time() - cpu, time.perf_counter() - wall
    finally:
        t.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--joined", type=int, default=1, help="WRITEs per sendall (default 1)")
    ap.add_argument("--runs", type=int, default=4)
    args = ap.parse_args()
    from tests.server import SftpServer  # the same sshd the tests use

    with tempfile.TemporaryDirectory(prefix="sftpfs-sendpath-") as work, \
            SftpServer(Path(work)).start() as srv:
        target = srv.root / "sendpath.bin"
        srv.chown(srv.root)
        times: dict[str, list[tuple[float, float]]] = {"bytes": [], "memoryview": []}
        for _ in range(args.runs):
            for kind in times:
                times[kind].append(send_once(srv.port, srv.user, srv.client_key,
                                             bytes(target), args.joined, kind == "memoryview"))
        for kind, runs in times.items():
            print(f"{kind:>10}: CPU {statistics.median(c for c, _ in runs):.3f} s, "
                  f"wall {statistics.median(w for _, w in runs):.3f} s "
                  f"(median of {len(runs)}; 64 MiB, {args.joined} WRITE(s) per sendall)")


if __name__ == "__main__":
    main()
