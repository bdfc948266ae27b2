"""`sftpfs sync`, `sftpfs status`, and the sync that `sftpfs unmount` does first.

They ask the mount's daemon over its control socket (control.py). Progress goes
to stderr: one updating line on a terminal, otherwise a line every ~5 s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from .control import ControlError, request
from .options import OptionError

SYNC_USAGE = "sftpfs sync MOUNTPOINT"
SYNC_HELP = """\
Wait until every change made through the mount (written data, creates, renames,
chmods, ...) is on the server. Progress (files and bytes left, rate, ETA) goes to
stderr. Exit status 0 when everything is on the server; 1 if some changes could
not be uploaded (their data is kept in the recovery area: see sftpfs status).

The kernel does not pass sync(1) without arguments, `sync -f` or syncfs(2) on to a
FUSE file system; `sftpfs sync MOUNTPOINT` is the way to flush a whole mount.
fsync(2) of a file (or `sync FILE`) flushes that file."""

STATUS_USAGE = "sftpfs status MOUNTPOINT [--json]"
STATUS_HELP = """\
Show what the daemon of a mount is doing: connection state, changes waiting to be
uploaded (operations, files, bytes), uploads that failed and where their data is
kept, and the contents of the recovery area. --json prints the same as a JSON
object (keys: connected, pending_ops, pending_files, pending_bytes, uploaded_bytes,
failures, recovery, remote, mountpoint)."""

UNMOUNT_USAGE = "sftpfs unmount MOUNTPOINT"
UNMOUNT_HELP = """\
Upload everything still pending (as sftpfs sync, with progress), then unmount and
wait for the daemon to exit. If some changes could not be uploaded, the mount is
still removed (their data stays in the recovery area) and a warning says where.
fusermount3 -u MOUNTPOINT unmounts without waiting for pending uploads."""

PROGRESS_AFTER_TTY = 0.5      # a sync shorter than this shows nothing, even on a terminal
PROGRESS_EVERY_TTY = 0.2      # seconds between redraws of the progress line on a terminal
PROGRESS_EVERY_LOG = 5.0      # seconds between progress lines otherwise
RATE_WINDOW = 10.0            # seconds of history the upload rate is averaged over


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        raise OptionError(f"{message} (see {self.prog} --help)")


def _parser(name: str, usage: str, help_text: str) -> argparse.ArgumentParser:
    ap = _Parser(prog=f"sftpfs {name}", usage=usage, description=help_text,
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mountpoint", metavar="MOUNTPOINT", help="where the sftpfs mount is")
    return ap


def _fail(message: str, code: int = 1) -> int:
    print(f"sftpfs: {message}", file=sys.stderr)
    return code


def _mp(arg: str) -> Path:
    return Path(os.path.abspath(arg))


# --------------------------------------------------------------------- formatting


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def human_time(s: float) -> str:
    s = int(s + 0.5)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s // 60 % 60:02d}m"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _printable(s: object) -> str:
    """A name as the terminal can show it (non-UTF-8 bytes as \\xNN)."""
    return str(s).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _int(d: dict, key: str) -> int:
    v = d.get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


def _list(d: dict, key: str) -> list:
    v = d.get(key)
    return v if isinstance(v, list) else []


# ----------------------------------------------------------------------- progress


class Progress:
    """Turns the daemon's progress dicts into lines on stderr."""

    def __init__(self, mp: Path, out: TextIO | None = None, *, tty: bool | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.mp = mp
        self.out = out or sys.stderr
        self.tty = self.out.isatty() if tty is None else tty
        self.clock = clock
        self.start = clock()
        self.first_uploaded: int | None = None
        self.samples: deque[tuple[float, int]] = deque()
        # the first line comes PROGRESS_AFTER_TTY (terminal) or PROGRESS_EVERY_LOG s in
        self.first_at = self.start + (PROGRESS_AFTER_TTY if self.tty else PROGRESS_EVERY_LOG)
        self.last_shown = -1e9
        self.width = 0            # length of the line now on the terminal
        self.shown = False        # any progress line was written

    def rate(self) -> float | None:
        if len(self.samples) < 2:
            return None
        (t0, b0), (t1, b1) = self.samples[0], self.samples[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else None

    def line(self, d: dict) -> str:
        files, nbytes, ops = _int(d, "pending_files"), _int(d, "pending_bytes"), _int(d, "pending_ops")
        if files or nbytes:
            parts = [f"{_plural(files, 'file')}, {human_bytes(nbytes)} left"]
        elif ops:
            parts = [f"{_plural(ops, 'change')} left"]
        else:
            parts = ["finishing"]
        rate = self.rate()
        if rate is not None:
            parts.append(f"{human_bytes(rate)}/s")
            if nbytes and rate > 0:
                parts.append(f"ETA {human_time(nbytes / rate)}")
        if d.get("connected") is False:
            parts.append("disconnected, waiting to reconnect")
        fails = len(_list(d, "failures"))
        if fails:
            parts.append(f"{fails} failed")
        return f"sftpfs: syncing {self.mp}: " + ", ".join(parts)

    def update(self, d: dict) -> None:
        now = self.clock()
        up = _int(d, "uploaded_bytes")
        if self.first_uploaded is None:
            self.first_uploaded = up
        self.samples.append((now, up))
        while len(self.samples) > 2 and now - self.samples[0][0] > RATE_WINDOW:
            self.samples.popleft()
        every = PROGRESS_EVERY_TTY if self.tty else PROGRESS_EVERY_LOG
        if now < self.first_at or now - self.last_shown < every:
            return
        self.last_shown = now
        self._show(self.line(d))

    def _show(self, text: str) -> None:
        if self.tty:
            pad = max(0, self.width - len(text))
            self.out.write("\r" + text + " " * pad)
            self.width = len(text)
        else:
            self.out.write(text + "\n")
        self.out.flush()
        self.shown = True

    def finish(self, result: dict | None) -> None:
        """End the progress display; if any was shown, with a summary line."""
        if not self.shown:
            return
        if result is None:
            text = f"sftpfs: syncing {self.mp}: stopped"
        else:
            up = _int(result, "uploaded_bytes") - (self.first_uploaded or 0)
            text = (f"sftpfs: synced {self.mp}: {human_bytes(max(up, 0))} uploaded in "
                    f"{human_time(self.clock() - self.start)}")
        if self.tty:
            self.out.write("\r" + text + " " * max(0, self.width - len(text)) + "\n")
            self.width = 0
        else:
            self.out.write(text + "\n")
        self.out.flush()


def run_sync(mp: Path, out: TextIO | None = None) -> dict:
    """Sync with progress; returns the result dict. Raises ControlError."""
    progress = Progress(mp, out)
    result = None
    try:
        result = request(mp, "sync", on_progress=progress.update)
    finally:
        progress.finish(result)
    return result


def failed_files(result: dict) -> int:
    fails = _list(result, "failures")
    return len({f.get("path") if isinstance(f, dict) else repr(f) for f in fails})


# ----------------------------------------------------------------------- commands


def cmd_sync(argv: list[str]) -> int:
    args = _parser("sync", SYNC_USAGE, SYNC_HELP).parse_args(argv)
    mp = _mp(args.mountpoint)
    try:
        result = run_sync(mp)
    except ControlError as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        return _fail("sync interrupted; pending changes are still being uploaded", 130)
    n = failed_files(result)
    if n or result.get("ok") is False:
        what = f"{_plural(n, 'file')} could not be uploaded" if n else "not everything was uploaded"
        return _fail(f"{what}, see: sftpfs status {mp}")
    return 0


def cmd_status(argv: list[str]) -> int:
    ap = _parser("status", STATUS_USAGE, STATUS_HELP)
    ap.add_argument("--json", action="store_true", help="print the status as JSON")
    args = ap.parse_args(argv)
    mp = _mp(args.mountpoint)
    try:
        st = request(mp, "status")
    except ControlError as e:
        return _fail(str(e))
    if args.json:
        print(json.dumps(st, indent=2, sort_keys=True))
    else:
        sys.stdout.write(format_status(st, mp))
    return 0


def format_status(st: dict, mp: Path) -> str:
    out: list[str] = []
    remote = st.get("remote")
    out.append(f"{_printable(st.get('mountpoint') or mp)}" + (f": {_printable(remote)}" if remote else ""))
    conn = st.get("connected")
    counters = st.get("counters")
    rtt = _int(counters, "rtt_us") if isinstance(counters, dict) and "rtt_us" in counters else -1
    rtt_text = f", round trip {rtt / 1000:.2f} ms" if conn and rtt >= 0 else ""
    out.append(f"  connection:  {'connected' if conn else 'disconnected (reconnects on the next request)' if conn is False else 'unknown'}{rtt_text}")
    ops, files, nbytes = _int(st, "pending_ops"), _int(st, "pending_files"), _int(st, "pending_bytes")
    if ops or files or nbytes:
        out.append(f"  pending:     {_plural(ops, 'change')}, {_plural(files, 'file')}, "
                   f"{human_bytes(nbytes)} to upload")
    else:
        out.append("  pending:     nothing, everything is on the server")
    out.append(f"  uploaded:    {human_bytes(_int(st, 'uploaded_bytes'))} since mount")
    if isinstance(counters, dict) and "open_files" in counters:
        out.append(f"  open files:  {counters['open_files']}")
    if isinstance(counters, dict) and "cache_hits" in counters:
        hits, misses = _int(counters, "cache_hits"), _int(counters, "cache_misses")
        rate = f", {100 * hits // (hits + misses)} % hits" if hits + misses else ""
        ahead = _int(counters, "files_prefetched")
        ahead_text = f" ({_plural(ahead, 'file')} ahead of the reader)" if ahead else ""
        out.append(f"  read cache:  {human_bytes(_int(counters, 'cache_hit_bytes'))} from the cache, "
                   f"{human_bytes(_int(counters, 'cache_fetched_bytes'))} fetched since mount"
                   f"{ahead_text}{rate}")
    fails = _list(st, "failures")
    if fails:
        out.append(f"  failed:      {_plural(len(fails), 'upload')}")
        for f in fails:
            if not isinstance(f, dict):
                out.append(f"    {_printable(f)}")
                continue
            out.append(f"    {_printable(f.get('path', '?'))}: {_printable(f.get('error', 'failed'))}")
            kept = _kept(f)
            if kept:
                out.append(f"      data kept in {_printable(kept)}")
            elif isinstance(f.get("kept_as"), str):
                out.append(f"      ours saved on the server as {_printable(f['kept_as'])}")
    rec = _list(st, "recovery")
    if rec:
        out.append(f"  recovery:    {_plural(len(rec), 'file')} kept locally (copy them where they "
                   f"belong, then delete them)")
        out.extend(f"    {_printable(p)}" for p in rec)
    return "\n".join(out) + "\n"


def sync_before_unmount(mp: Path) -> int:
    """The sync `sftpfs unmount` does first. Returns 0 to go on with the unmount,
    else the exit status (interrupted). A daemon that does not answer is skipped."""
    try:
        result = run_sync(mp)
    except ControlError:
        return 0  # an older or stuck daemon: unmount as before
    except KeyboardInterrupt:
        return _fail(f"interrupted; {mp} is still mounted", 130)
    n = failed_files(result)
    if n or result.get("ok") is False:
        what = f"{_plural(n, 'file')} could not be uploaded" if n else "not everything was uploaded"
        kept = _recovery_paths(result)
        where = kept[0] if len(kept) == 1 else None
        if len(kept) > 1:
            try:
                where = os.path.commonpath(kept)
            except ValueError:
                where = None
        if where:
            print(f"sftpfs: warning: {what}; unmounting anyway, their data is kept in "
                  f"{_printable(where)}", file=sys.stderr)
        else:
            print(f"sftpfs: warning: {what}; unmounting anyway (see the sftpfs log)",
                  file=sys.stderr)
    return 0


def _kept(failure: dict) -> str | None:
    """Where a failed upload's data is kept locally ("recovery" is an older name)."""
    for key in ("recovery_path", "recovery"):
        v = failure.get(key)
        if isinstance(v, str) and v:
            return v
    return None


def _recovery_paths(result: dict) -> list[str]:
    paths = [_kept(f) for f in _list(result, "failures") if isinstance(f, dict)]
    paths = [p for p in paths if isinstance(p, str) and p]
    if not paths:
        paths = [p for p in _list(result, "recovery") if isinstance(p, str) and p]
    return paths


def print_unmount_help() -> int:
    _parser("unmount", UNMOUNT_USAGE, UNMOUNT_HELP).print_help()
    return 0
