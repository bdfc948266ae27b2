"""A mount's first connection, begun in a thread before trio is imported.

Connecting is mostly waiting for the server (sshd forks and re-executes itself
for every connection, then starts the sftp subsystem); the daemon imports trio,
pyfuse3 and the rest of sftpfs meanwhile, which at zero latency takes longer
than the handshake itself. Reconnects do not come here: they go through
`ssh.connect` and `SftpSession.start` from trio.
"""

from __future__ import annotations

import threading

import paramiko

from .channel import SftpChannel, open_sftp_channel
from .ssh import SshOptions, Target, connect


class Handshake:
    """connect() and open_sftp_channel(), started at once in a thread of their own."""

    def __init__(self, opts: SshOptions, timeout: float) -> None:
        self._opts = opts
        self._timeout = timeout
        self._outcome: tuple[paramiko.Transport, Target, SftpChannel] | BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="sftpfs-handshake", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            transport, target = connect(self._opts)
        except BaseException as e:  # noqa: BLE001 - handed to result()'s caller
            self._outcome = e
            return
        try:
            self._outcome = (transport, target, open_sftp_channel(transport, self._timeout))
        except BaseException as e:  # noqa: BLE001 - handed to result()'s caller
            transport.close()
            self._outcome = e

    def result(self) -> tuple[paramiko.Transport, Target, SftpChannel]:
        """What the handshake gave, or raise what it raised. Blocks: run it in a thread."""
        self._thread.join()
        outcome, self._outcome = self._outcome, None
        if isinstance(outcome, BaseException):
            raise outcome
        if outcome is None:
            raise RuntimeError("Handshake.result() called twice")
        return outcome
