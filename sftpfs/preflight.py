"""Checks that need no connection, made before the SSH handshake starts, so
that a wrong mount point fails at once and never after a password prompt.

Every failure before the mount is up is a MountError whose text is the one
line the user sees.
"""

from __future__ import annotations

import errno
import os
import stat

from . import runtime
from .options import MountConfig

FUSE_DEVICE = "/dev/fuse"


class MountError(Exception):
    """Mounting failed; str() is a one-line message for the user."""


def check_mountpoint(cfg: MountConfig) -> None:
    mp = cfg.mountpoint
    try:
        st = os.stat(mp)
    except FileNotFoundError:
        raise MountError(f"mount point {mp} does not exist") from None
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            raise MountError(f"mount point {mp} is a dead sftpfs mount; "
                             f"clear it with: fusermount3 -u {mp}") from None
        raise MountError(f"mount point {mp}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(f"mount point {mp} is not a directory")
    if runtime.is_mounted(mp):
        raise MountError(f"{mp} is already a mount point")
    if not cfg.nonempty and any(os.scandir(mp)):
        raise MountError(f"mount point {mp} is not empty (use -o nonempty to mount over it)")


def check_fuse_device() -> None:
    try:
        st = os.stat(FUSE_DEVICE)
    except FileNotFoundError:
        raise MountError(f"{FUSE_DEVICE} does not exist: load the fuse kernel module "
                         f"(modprobe fuse) or, in a container, pass the device in") from None
    if not stat.S_ISCHR(st.st_mode) or st.st_rdev != os.makedev(10, 229):
        raise MountError(f"{FUSE_DEVICE} is not the FUSE device")
    try:
        os.close(os.open(FUSE_DEVICE, os.O_RDWR))
    except OSError as e:
        raise MountError(f"cannot open {FUSE_DEVICE}: {e.strerror}") from None
