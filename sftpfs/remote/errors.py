"""SFTP status codes as errno values.

SFTP v3 has eight status codes; OpenSSH folds every errno it has no code for
into SSH_FX_FAILURE. Callers that know the operation refine FAILURE (see
sftp.SftpSession), because only they can tell EEXIST from ENOTEMPTY from
ENOSPC.
"""

from __future__ import annotations

import errno
import os

from . import protocol as p

_STATUS_ERRNO = {
    p.FX_EOF: errno.ENODATA,
    p.FX_NO_SUCH_FILE: errno.ENOENT,
    p.FX_PERMISSION_DENIED: errno.EACCES,
    p.FX_FAILURE: errno.EIO,
    # OpenSSH sends BAD_MESSAGE for EINVAL and ENAMETOOLONG.
    p.FX_BAD_MESSAGE: errno.EINVAL,
    p.FX_NO_CONNECTION: errno.ENOTCONN,
    p.FX_CONNECTION_LOST: errno.ECONNABORTED,
    p.FX_OP_UNSUPPORTED: errno.ENOTSUP,
}


class SftpError(OSError):
    """A request the server answered with a non-OK status."""

    def __init__(self, status: int, message: str = "", path: bytes | None = None) -> None:
        self.status = status
        code = _STATUS_ERRNO.get(status, errno.EIO)
        super().__init__(code, message or _describe(status))
        self.path = path

    def with_errno(self, code: int) -> OSError:
        """The same failure, refined to a more specific errno."""
        e = SftpError(self.status, os.strerror(code), self.path)
        e.errno = code
        return e


class ConnectionLost(OSError):
    """The SSH channel is gone; the request may or may not have reached the server."""

    def __init__(self, why: str = "connection to the SFTP server lost") -> None:
        super().__init__(errno.EIO, why)


class RequestTimeout(OSError):
    """The server did not answer within the request timeout; the connection is dropped."""

    def __init__(self, seconds: float) -> None:
        super().__init__(errno.ETIMEDOUT, f"SFTP server did not answer within {seconds:g} s")


def _describe(status: int) -> str:
    return {
        p.FX_EOF: "end of file",
        p.FX_NO_SUCH_FILE: "no such file",
        p.FX_PERMISSION_DENIED: "permission denied",
        p.FX_FAILURE: "failure",
        p.FX_BAD_MESSAGE: "bad message",
        p.FX_NO_CONNECTION: "no connection",
        p.FX_CONNECTION_LOST: "connection lost",
        p.FX_OP_UNSUPPORTED: "operation unsupported",
    }.get(status, f"status {status}")
