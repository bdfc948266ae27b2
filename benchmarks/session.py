"""What the workloads share while one system is under test: its mount, its cache
directory, a time budget per workload, and timed commands that can be killed.

A workload that times out or errs leaves the mount in an unknown state, so the
session tears it down by force; the next workload mounts afresh.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .dataset import Dataset
from .systems import Endpoint, Mount, MountError, System, clean_env


class Timeout(Exception):
    """The workload's time budget ran out."""


class Failed(Exception):
    """The workload's answer was wrong (checked against the server's directory)."""


class Skipped(Exception):
    """The workload could not be run meaningfully (e.g. its prerequisite failed)."""


class Budget:
    """One workload's time limit, covering its preparation, the timed part and
    the wait until durable."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise Timeout(f"over the {self.seconds:.0f} s limit")
        return left


@dataclass
class Session:
    """State of one system's run through the workloads."""

    system: System
    endpoint: Endpoint
    server_root: Path  # the server's exported directory, read directly as root
    data: Dataset
    work: Path  # local scratch for this system
    log: Path  # the system's own log (its stdout and stderr)
    chown: Callable[[Path], None]
    changed: Path  # a copy of the tree with 1% of the files changed (workload 11)
    mount: Mount | None = None
    mount_on: str = ""  # "ro" or "rw"
    cache_dir: Path | None = None
    history: list[tuple[int, str]] = field(default_factory=list)
    rw_ready: bool = False
    tree_state: str = ""  # what the server's rw/tree holds: "", "source" or "changed"
    last_mount_s: float = 0.0
    mount_times: list[float] = field(default_factory=list)  # mount + first stat, each mount
    _caches: int = 0

    # ------------------------------------------------------------ server side
    def server_dir(self, which: str) -> Path:
        return self.server_root / ("ro" if which == "ro" else f"rw-{self.system.name}")

    @property
    def mnt(self) -> Path:
        return self.work / "mnt"

    def prepare_rw(self) -> None:
        """An empty, user-owned directory on the server for this system's uploads
        (made while nothing is mounted on it, so no cache can know the old one)."""
        self.drop_mount()
        d = self.server_dir("rw")
        if d.exists():
            shutil.rmtree(d)
        d.mkdir()
        self.chown(d)
        self.rw_ready = True
        self.tree_state = ""

    # ------------------------------------------------------------ mounts
    def fresh_mount(self, which: str, budget: Budget) -> Mount:
        """Mount with a new, empty cache directory (a cold start)."""
        self.drop_mount()
        self._caches += 1
        self.cache_dir = self.work / f"cache-{self._caches}"
        self.cache_dir.mkdir(mode=0o700)
        return self._mount(which, budget)

    def remount(self, budget: Budget) -> tuple[float, Mount]:
        """Unmount and mount again with the same cache directory (on-disk caches kept)."""
        which = self.mount_on
        unmount_s = self.mount.unmount(budget.left())
        self.mount = None
        return unmount_s, self._mount(which, budget)

    def ensure_mount(self, which: str, budget: Budget) -> Mount:
        if self.mount and self.mount_on == which and self.mount.alive():
            return self.mount
        return self.fresh_mount(which, budget)

    def _mount(self, which: str, budget: Budget) -> Mount:
        self.mnt.mkdir(exist_ok=True)
        t0 = time.monotonic()
        try:
            self.mount = self.system.mount(self.endpoint, str(self.server_dir(which)), self.mnt,
                                           self.cache_dir, self.log, budget.left())
        except MountError:
            self.mount = None
            raise
        self.mount_on = which
        # the first access opens the SSH connection where a system connects lazily;
        # keep that out of the timed part, without listing anything
        self.run(["stat", "-c", "%i", str(self.mnt)], budget)
        self.last_mount_s = time.monotonic() - t0
        self.mount_times.append(self.last_mount_s)
        return self.mount

    def drop_mount(self, timeout: float = 120) -> float | None:
        """Unmount politely if mounted (by force if that fails); seconds it took."""
        m, self.mount = self.mount, None
        if m is None:
            return None
        try:
            return m.unmount(timeout)
        except (MountError, subprocess.TimeoutExpired) as e:
            print(f"  [{self.system.name}] unmount failed, forced: {e}", file=sys.stderr)
            return None

    def reset(self) -> None:
        """After a time-out or error: the mount may hang, so tear it down by force."""
        m, self.mount = self.mount, None
        if m is not None:
            m.kill()

    # ------------------------------------------------------------ commands
    def run(self, args: list[str], budget: Budget, cwd: Path | None = None,
            check: bool = True) -> tuple[float, subprocess.CompletedProcess]:
        """Run a command under the budget; (seconds, result). Killed with its whole
        process group on time-out. A non-zero exit raises Failed when check."""
        t0 = time.monotonic()
        proc = subprocess.Popen(args, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=clean_env(LC_ALL="C"),
                                start_new_session=True)
        try:
            out, err = proc.communicate(timeout=budget.left())
        except (subprocess.TimeoutExpired, Timeout):
            self._kill_group(proc)
            raise Timeout(f"{args[0]} still running after the {budget.seconds:.0f} s limit") from None
        except BaseException:  # interrupted: leave nothing running in the mount
            self._kill_group(proc)
            raise
        seconds = time.monotonic() - t0
        res = subprocess.CompletedProcess(args, proc.returncode, out.decode(errors="replace"),
                                          err.decode(errors="replace"))
        if check and res.returncode != 0:
            raise Failed(f"{' '.join(args[:2])} exit {res.returncode}: {res.stderr.strip()[-400:]}")
        return seconds, res

    def _kill_group(self, proc: subprocess.Popen) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        try:
            proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            # stuck in the file system: abort the mount, then it can die
            self.reset()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.communicate(timeout=10)

    # ------------------------------------------------------------ history
    def last_was(self, *wids: int) -> bool:
        """Did the previous workload (one of wids) just run on the live mount?"""
        return bool(self.history) and self.history[-1][0] in wids and \
            self.history[-1][1] in ("ok", "FAILED") and \
            self.mount is not None and self.mount.alive()

    def status_of(self, wid: int) -> str | None:
        for w, status in self.history:
            if w == wid:
                return status
        return None
