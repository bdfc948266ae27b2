"""Talking to the server: SSH connection, SFTP protocol and sessions.

paramiko.config imports `invoke`, which it needs only for ``Match exec`` in an
ssh config: 80 ms of every sftpfs command's start-up (a fifth of a mount on a
fast link). It is kept out until a config asks for it (`ssh.allow_match_exec`).
"""

import sys

if "paramiko" not in sys.modules and "invoke" not in sys.modules:
    sys.modules["invoke"] = None  # type: ignore[assignment]  # `import invoke` fails fast
    try:
        import paramiko  # noqa: F401  # paramiko.config records the ImportError
    finally:
        del sys.modules["invoke"]
