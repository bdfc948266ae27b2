"""Blocking set-up of an SFTP channel: session, subsystem, INIT/VERSION.

Kept free of trio so that a mount's handshake thread can run it while the
daemon is still importing the rest (see handshake.py).
"""

from __future__ import annotations

from typing import NamedTuple

import paramiko

from . import protocol as p
from .chanbuf import ChunkPipe
from .errors import ConnectionLost

WINDOW_SIZE = 64 * 2**20  # bytes the server may send before we ack: covers many reads in flight
MAX_PACKET = 2**18
NO_SFTP = "server closed the channel during SFTP setup (is the sftp subsystem enabled?)"


class SftpChannel(NamedTuple):
    chan: paramiko.Channel
    version: int
    extensions: dict[bytes, bytes]


def open_sftp_channel(transport: paramiko.Transport, timeout: float) -> SftpChannel:
    """Open the sftp subsystem on `transport` and exchange INIT/VERSION."""
    chan = transport.open_session(window_size=WINDOW_SIZE, max_packet_size=MAX_PACKET, timeout=timeout)
    chan.in_buffer = ChunkPipe()  # nothing has arrived yet: the server starts with the subsystem
    chan.settimeout(timeout)
    try:
        chan.invoke_subsystem("sftp")
        chan.sendall(p.packet(p.FXP_INIT, None, p.u32(3)))
        header = _recv_exact(chan, 4)
        body = _recv_exact(chan, int.from_bytes(header, "big"))
    except (OSError, EOFError, paramiko.SSHException) as e:
        if isinstance(e, TimeoutError | ConnectionLost):
            raise
        # A forced command ends the session, and with it, at times, the connection
        # before the channel's close arrives: the same cause, seen from the socket.
        raise ConnectionLost(f"{NO_SFTP} ({e})") from None
    if body[0] != p.FXP_VERSION:
        raise ConnectionLost(f"server did not start SFTP (got packet type {body[0]})")
    version, exts = p.parse_version(body[1:])
    chan.settimeout(None)
    return SftpChannel(chan, version, exts)


def _recv_exact(chan: paramiko.Channel, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        data = chan.recv(n - len(out))
        if not data:
            raise ConnectionLost(NO_SFTP)
        out += data
    return bytes(out)
