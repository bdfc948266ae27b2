"""Mount options: sshfs-style `-o` parsing into one MountConfig.

Kept free of I/O so every option can be unit-tested. Unknown options are an
error (a typo must not silently change behaviour), except the generic mount(8)
options that fstab and mount.fuse3 pass along, which mean nothing here.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importing it brings paramiko: `sftpfs sync|status|unmount` need none
    from .remote.ssh import SshOptions

# Generic mount(8)/fstab options: accepted and ignored.
IGNORED = {
    "rw", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "auto", "noauto", "user",
    "nouser", "users", "defaults", "_netdev", "nofail", "atime", "noatime", "relatime",
    "strictatime", "async", "reconnect", "delay_connect",
}
FLAGS = {"ro", "allow_other", "allow_root", "default_permissions", "nonempty", "password_stdin",
         "debug"}
# ssh_config keywords we pass through, as sshfs does with `-o SshOption=value`.
SSH_KEYS = {
    "port": "Port", "identityfile": "IdentityFile", "userknownhostsfile": "UserKnownHostsFile",
    "stricthostkeychecking": "StrictHostKeyChecking", "connecttimeout": "ConnectTimeout",
    "batchmode": "BatchMode", "user": "User", "proxycommand": "ProxyCommand",
    "proxyjump": "ProxyJump", "hostname": "HostName", "hostkeyalias": "HostKeyAlias",
    "serveraliveinterval": "ServerAliveInterval", "identitiesonly": "IdentitiesOnly",
}


class OptionError(ValueError):
    """A command line that cannot be used; str() is the one-line message."""


@dataclass
class MountConfig:
    host: str
    remote_path: str
    mountpoint: Path
    ssh: SshOptions
    foreground: bool = False
    debug: bool = False
    readonly: bool = False
    allow_other: bool = False
    allow_root: bool = False
    default_permissions: bool = False
    nonempty: bool = False
    uid: int | None = None
    gid: int | None = None
    umask: int | None = None
    cache: bool = True
    attr_timeout: float = 20.0
    entry_timeout: float = 20.0
    negative_timeout: float = 20.0
    cache_timeout: float = 20.0
    cache_max_stale: float = 86400.0
    prefetch: int = 32
    timeout: float = 30.0
    cache_dir: Path | None = None
    cache_size: int | None = None  # block cache limit; None: min(10 GiB, 10% of free space)
    readahead_max: int = 16 * 2**20
    small_file: int = 256 * 1024
    log_file: Path | None = None
    writeback: bool = True
    kernel_dircache: bool = True
    kernel_readahead: int = 2**20  # the kernel's read-ahead on this mount (needs root); 0: its default
    writeback_delay: float = 0.5
    dirty_limit: int | None = None  # None: min(4 GiB, a quarter of the cache disk's free space)
    flush_timeout: float = 600.0
    fuse_extra: list[str] = field(default_factory=list)

    @property
    def source(self) -> str:
        user = f"{self.ssh.user}@" if self.ssh.user else ""
        return f"{user}{self.host}:{self.remote_path}"

    def fuse_options(self) -> set[str]:
        opts = {f"fsname={self.source}", "subtype=sftpfs"}
        for flag, on in (("ro", self.readonly), ("allow_other", self.allow_other),
                         ("allow_root", self.allow_root),
                         ("default_permissions", self.default_permissions)):
            if on:
                opts.add(flag)
        return opts


_SOURCE = re.compile(r"(?:(?P<user>[^:]+)@)?(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:@\[\]]+)):(?P<path>.*)",
                     re.S)


def parse_source(source: str) -> tuple[str | None, str, str]:
    """`[user@]host:[path]` (host may be `[v6addr]`) -> (user, host, path)."""
    m = _SOURCE.fullmatch(source)
    if m is None:
        raise OptionError(f"bad remote '{source}': expected [user@]host:[path]")
    return m["user"], m["v6"] or m["host"], m["path"]


def _seconds(key: str, value: str) -> float:
    try:
        v = float(value)
    except ValueError:
        raise OptionError(f"option {key} needs a number of seconds, not '{value}'") from None
    if v < 0:
        raise OptionError(f"option {key} must not be negative")
    return v


def _int(key: str, value: str, base: int = 10) -> int:
    try:
        return int(value, base)
    except ValueError:
        raise OptionError(f"option {key} needs a number, not '{value}'") from None


_SIZE = re.compile(r"(\d+(?:\.\d+)?)([kmgt]?)(?:i?b)?", re.I)
_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_size(key: str, value: str) -> int:
    """A size in bytes: 4096, 64k, 500M, 2G, 1.5g (binary units; KiB/MB spellings too)."""
    m = _SIZE.fullmatch(value.strip())
    if m is None:
        raise OptionError(f"option {key} needs a size like 500M or 2G, not '{value}'")
    return int(float(m[1]) * _UNITS[m[2].lower()])


def build_config(source: str, mountpoint: str, *, port: int | None = None,
                 identities: list[str] | None = None, ssh_config: str | None = None,
                 options: list[str] | None = None, foreground: bool = False,
                 debug: bool = False) -> MountConfig:
    from .remote.ssh import SshOptions

    user, host, path = parse_source(source)
    ssh = SshOptions(host=host, user=user, port=port, identity_files=list(identities or []))
    if ssh_config is not None:
        ssh.config_file = ssh_config
    cfg = MountConfig(host=host, remote_path=path, mountpoint=Path(mountpoint), ssh=ssh,
                      foreground=foreground or debug, debug=debug)
    for opt in ",".join(options or []).split(","):
        if opt:
            _apply(cfg, opt)
    if not cfg.cache:
        cfg.attr_timeout = cfg.entry_timeout = cfg.negative_timeout = cfg.cache_timeout = 0.0
        cfg.cache_max_stale = 0.0
        cfg.prefetch = 0
    return cfg


def _apply(cfg: MountConfig, opt: str) -> None:
    key, has_value, value = opt.partition("=")
    lkey = key.lower()
    if lkey in IGNORED or lkey.startswith("x-") or lkey == "comment":
        return
    if not has_value:
        if key not in FLAGS:
            raise OptionError(f"unknown option '{opt}' (see sftpfs --help)")
        if key == "ro":
            cfg.readonly = True
        elif key == "password_stdin":
            cfg.ssh.password_stdin = True
        elif key == "debug":
            cfg.debug = cfg.foreground = True
        else:
            setattr(cfg, key, True)
        return
    if lkey in SSH_KEYS:
        _apply_ssh(cfg, SSH_KEYS[lkey], value)
    elif key in ("uid", "gid"):
        setattr(cfg, key, _int(key, value))
    elif key == "umask":
        cfg.umask = _int(key, value, 8)
    elif key in ("attr_timeout", "entry_timeout", "negative_timeout", "cache_timeout",
                 "cache_max_stale", "timeout"):
        setattr(cfg, key, _seconds(key, value))
    elif key == "prefetch":
        cfg.prefetch = _int(key, value)
    elif key == "cache":
        if value not in ("yes", "no"):
            raise OptionError("option cache takes yes or no")
        cfg.cache = value == "yes"
    elif key == "cache_dir":
        cfg.cache_dir = Path(os.path.expanduser(value))
    elif key in ("cache_size", "readahead_max", "small_file", "dirty_limit", "kernel_readahead"):
        setattr(cfg, key, parse_size(key, value))
    elif key == "kernel_dircache":
        if value not in ("on", "off", "yes", "no"):
            raise OptionError("option kernel_dircache takes on or off")
        cfg.kernel_dircache = value in ("on", "yes")
    elif key == "writeback":
        if value not in ("on", "off", "yes", "no"):
            raise OptionError("option writeback takes on or off")
        cfg.writeback = value in ("on", "yes")
    elif key in ("writeback_delay", "flush_timeout"):
        setattr(cfg, key, _seconds(key, value))
    elif key == "log":
        cfg.log_file = Path(os.path.expanduser(value))
    elif key == "ssh_config":
        cfg.ssh.config_file = value
    else:
        raise OptionError(f"unknown option '{key}' (see sftpfs --help)")


def _apply_ssh(cfg: MountConfig, key: str, value: str) -> None:
    s = cfg.ssh
    if key == "Port":
        s.port = _int("Port", value)
    elif key == "IdentityFile":
        s.identity_files.append(value)
    elif key == "UserKnownHostsFile":
        s.known_hosts_files = value.split()
    elif key == "StrictHostKeyChecking":
        v = value.lower()
        if v not in ("yes", "no", "accept-new", "ask"):
            raise OptionError("StrictHostKeyChecking takes yes, accept-new or no")
        s.strict_host_key_checking = "yes" if v == "ask" else v
    elif key == "ConnectTimeout":
        s.connect_timeout = _seconds(key, value)
    elif key == "BatchMode":
        s.batch_mode = value.lower() == "yes"
    elif key == "User":
        s.user = value
    elif key == "ServerAliveInterval":
        s.server_alive_interval = _seconds(key, value)
    else:
        s.extra[key] = value
