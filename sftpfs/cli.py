"""Command line: `sftpfs mount|unmount`, sshfs-compatible, and mount.fuse3's form.

`sftpfs mount` detaches only once the mount is usable. It forks before any
thread exists (paramiko and trio start threads later); the child connects,
may prompt on the terminal, mounts, and then reports "ok" or its one-line
error through a pipe, which the parent turns into its exit status.
"""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import os
import subprocess
import sys
import time
from pathlib import Path

from . import __version__, runtime
from .options import MountConfig, OptionError, build_config

log = logging.getLogger("sftpfs")

USAGE = """\
sftpfs mount [user@]host:[path] MOUNTPOINT [-p PORT] [-i IDENTITY] [-F SSH_CONFIG] [-o OPT,...] [-f] [-d]
       sftpfs unmount MOUNTPOINT
       sftpfs sync MOUNTPOINT
       sftpfs status MOUNTPOINT [--json]
       sftpfs cache info|clear [REMOTE] [-o cache_dir=DIR]
       sftpfs [user@]host:[path] MOUNTPOINT [-o OPT,...]    (as mount.fuse3 and fstab call it)"""

OPTIONS_HELP = """\
mount options (-o, comma-separated; as sshfs):
  ro                    read-only mount
  allow_other           let other users see the mount (needs user_allow_other in /etc/fuse.conf)
  default_permissions   let the kernel check permissions against the shown modes
  uid=N,gid=N,umask=M   show every file with this owner, group, permission mask
  nonempty              mount over a non-empty directory
  password_stdin        read the password from standard input (for scripts)
  cache=yes|no          no: strict, sshfs-like; every lookup asks the server
  cache_timeout=S       how long cached attributes and listings count as fresh (20)
  cache_max_stale=S     older listings (e.g. from the last mount) are served at once while
                        they are checked again in the background, up to this age (86400)
  prefetch=N            list up to N directories ahead of a tree walk (32; 0 = off)
  attr_timeout=S, entry_timeout=S, negative_timeout=S   kernel cache times (20)
  timeout=S             a request unanswered this long drops the connection (30)
  cache_dir=DIR         cache directory (default $XDG_CACHE_HOME/sftpfs)
  cache_size=SIZE       disk space for cached file contents, e.g. 500M, 2G
                        (default: 10% of the free space there, at most 10G; 0 = none)
  readahead_max=SIZE    how far to read ahead of a sequential reader (16M: ~bandwidth x RTT)
  small_file=SIZE       files up to this size are fetched whole on first read (256K)
  log=FILE              log file when detached (default $XDG_STATE_HOME/sftpfs/sftpfs.log)
  debug                 stay in the foreground and log every request (as -d)
  ssh_config=FILE       use this ssh config file instead of ~/.ssh/config (as -F)
  SshOption=VALUE       any ssh option: Port, IdentityFile, UserKnownHostsFile,
                        StrictHostKeyChecking=yes|accept-new|no, ConnectTimeout,
                        ProxyJump, ProxyCommand, HostKeyAlias, BatchMode, ...
Generic mount(8) options (rw, noauto, _netdev, nofail, x-*, ...) are accepted and ignored.

other commands (each has --help):
  sftpfs sync MOUNTPOINT      wait until every change is on the server, with progress
  sftpfs status MOUNTPOINT    connection, pending uploads, failures, recovery area (--json)
  sftpfs unmount MOUNTPOINT   sync, then unmount and wait for the daemon to exit
  sftpfs cache info           cached file contents per remote: size, entries, hit rate
  sftpfs cache clear [REMOTE] drop cached file contents (of one remote: user@host:path or its id)"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in ("unmount", "umount"):
            return cmd_unmount(argv[1:])
        if argv and argv[0] in ("sync", "status"):
            from . import controlcmd
            return (controlcmd.cmd_sync if argv[0] == "sync" else controlcmd.cmd_status)(argv[1:])
        if argv and argv[0] == "cache":
            from . import cachecmd
            return cachecmd.main(argv[1:])
        if argv and argv[0] == "mount":
            argv = argv[1:]
        return cmd_mount(argv)
    except OptionError as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        return 130


def _fail(message: str, code: int = 1) -> int:
    print(f"sftpfs: {message}", file=sys.stderr)
    return code


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is our one line, not usage plus a line."""

    def error(self, message: str):  # type: ignore[override]
        raise OptionError(f"{message} (see sftpfs --help)")


def _mount_parser() -> argparse.ArgumentParser:
    ap = _Parser(
        prog="sftpfs", usage=USAGE, epilog=OPTIONS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Mount a directory of an SFTP server, fast, with caching.")
    ap.add_argument("source", metavar="[user@]host:[path]")
    ap.add_argument("mountpoint")
    ap.add_argument("-p", "--port", type=int)
    ap.add_argument("-i", "--identity", action="append", default=[], metavar="FILE")
    ap.add_argument("-F", "--ssh-config", metavar="FILE")
    ap.add_argument("-o", dest="options", action="append", default=[], metavar="OPT[,OPT...]")
    ap.add_argument("-f", "--foreground", action="store_true", help="do not detach")
    ap.add_argument("-d", "--debug", action="store_true", help="foreground with debug log")
    ap.add_argument("-V", "--version", action="version", version=f"sftpfs {__version__}")
    return ap


def cmd_mount(argv: list[str]) -> int:
    ap = _mount_parser()
    if not argv:
        ap.print_help()
        return 2
    args = ap.parse_args(argv)
    cfg = build_config(args.source, args.mountpoint, port=args.port, identities=args.identity,
                       ssh_config=args.ssh_config, options=args.options,
                       foreground=args.foreground, debug=args.debug)
    cfg.mountpoint = Path(os.path.abspath(cfg.mountpoint))
    if cfg.foreground:
        _log_to_stderr(cfg.debug)
        return _run(cfg, _Foreground())
    return _daemonize(cfg)


def _run(cfg: MountConfig, notify: _Notify) -> int:
    """Mount and serve; returns the exit status. Runs in the (future) daemon."""
    from .preflight import MountError, check_fuse_device, check_mountpoint
    from .remote.handshake import Handshake

    try:
        check_mountpoint(cfg)
        check_fuse_device()
    except MountError as e:
        notify.failed(str(e))
        return 1
    handshake = Handshake(cfg.ssh, cfg.timeout)  # goes on while the rest is imported

    import trio

    from .mount import serve

    pidfile: Path | None = runtime.pidfile(cfg.mountpoint)

    def ready() -> None:
        nonlocal pidfile
        try:
            runtime.private_dir(pidfile.parent)
            pidfile.write_text(f"{os.getpid()}\n")
        except OSError as e:
            log.warning("cannot write pid file: %s", e)
            pidfile = None
        notify.ready(cfg)

    try:
        trio.run(serve, cfg, ready, handshake)
    except MountError as e:
        notify.failed(str(e))
        return 1
    except Exception as e:  # noqa: BLE001 - a daemon must say why it died
        log.exception("sftpfs failed")
        notify.failed(f"internal error: {e}")
        return 1
    finally:
        if pidfile is not None and pidfile.exists():
            pidfile.unlink(missing_ok=True)
    return 0


class _Notify:
    def ready(self, cfg: MountConfig) -> None: ...
    def failed(self, message: str) -> None: ...


class _Foreground(_Notify):
    def failed(self, message: str) -> None:
        print(f"sftpfs: {message}", file=sys.stderr)


class _PipeNotify(_Notify):
    """The daemon's side of the pipe to the waiting parent."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def _send(self, text: str) -> None:
        if self.fd >= 0:
            try:
                os.write(self.fd, text.encode(errors="replace"))
            finally:
                os.close(self.fd)
                self.fd = -1

    def ready(self, cfg: MountConfig) -> None:
        # Detach: own session, no terminal, stdio to /dev/null, log to a file.
        os.setsid()
        _log_to_file(cfg)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)
        self._send("ok\n")

    def failed(self, message: str) -> None:
        self._send(f"error {message}\n")


def _daemonize(cfg: MountConfig) -> int:
    _log_to_stderr(False)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon-to-be
        os.close(r)
        code = 1
        try:
            code = _run(cfg, _PipeNotify(w))
        finally:
            logging.shutdown()
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        reply = f.read().decode(errors="replace").strip()
    if reply == "ok":
        # Nothing here needs cleaning up: skip the interpreter's teardown of
        # paramiko & co (60 ms, a sixth of a mount at zero latency).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    os.waitpid(pid, 0)
    if reply.startswith("error "):
        return _fail(reply[len("error "):])
    return _fail("the mount process exited before the mount was ready")


def _log_to_stderr(debug: bool) -> None:
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter("sftpfs: %(levelname)s: %(message)s" if not debug else
                                     "%(asctime)s %(name)s %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [h]
    root.setLevel(logging.DEBUG if debug else logging.WARNING)
    if not debug:
        logging.getLogger("paramiko").setLevel(logging.CRITICAL)


def _log_to_file(cfg: MountConfig) -> None:
    path = cfg.log_file or runtime.state_home() / "sftpfs.log"
    try:
        runtime.private_dir(path.parent)
        h: logging.Handler = logging.handlers.RotatingFileHandler(path, maxBytes=2**20, backupCount=3)
    except OSError:
        h = logging.NullHandler()
    h.setFormatter(logging.Formatter(
        f"%(asctime)s sftpfs[%(process)d] {cfg.mountpoint}: %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [h]
    root.setLevel(logging.INFO)
    logging.getLogger("paramiko").setLevel(logging.WARNING)


def cmd_unmount(argv: list[str]) -> int:
    from . import controlcmd

    if argv and argv[0] in ("-h", "--help"):
        return controlcmd.print_unmount_help()
    if len(argv) != 1 or argv[0].startswith("-"):
        return _fail("usage: sftpfs unmount MOUNTPOINT", 2)
    mp = Path(os.path.abspath(argv[0]))
    if not runtime.is_mounted(mp, b"fuse"):
        return _fail(f"{mp} is not mounted")
    # upload what is pending first, with progress (skipped if no daemon answers)
    code = controlcmd.sync_before_unmount(mp)
    if code:
        return code
    pidfile = runtime.pidfile(mp)
    try:
        pid = int(pidfile.read_text())
    except (OSError, ValueError):
        pid = None
    tool = "fusermount3" if os.path.exists("/usr/bin/fusermount3") else "fusermount"
    proc = subprocess.run([tool, "-u", str(mp)], capture_output=True, text=True)
    if proc.returncode != 0:
        why = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"
        if "busy" in why.lower():
            return _fail(f"{mp} is busy: a process has files open there "
                         f"(see: fuser -vm {mp}); close them, or detach lazily: {tool} -uz {mp}")
        return _fail(f"cannot unmount {mp}: {why}")
    if pid is not None:
        _wait_exit(pid, timeout=600)
    return 0


def _wait_exit(pid: int, timeout: float) -> None:
    """The daemon flushes and exits after the kernel unmount; wait for it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except PermissionError:
            return  # not ours (a stale pid file)
        except ProcessLookupError:
            return
        if runtime.has_exited(pid):
            return
        time.sleep(0.01)


if __name__ == "__main__":
    sys.exit(main())
