"""Checks of a workload's answer against the server's directory, read directly as root.

A fast wrong answer is not a result: the benchmark never trusts the system under
test to say whether it is right, and never reads the server through it.
"""

from __future__ import annotations

import os
import stat
import subprocess
import time
from pathlib import Path

FIND_FORMAT = "%y %m %s %T@ %P\\n"  # type, mode, size, mtime, name relative to the start
MAX_PROBLEMS = 5


def parse_find(text: str) -> dict[str, tuple[str, str, int, int]]:
    """name -> (type, mode, size, whole-second mtime) from FIND_FORMAT output."""
    out = {}
    for line in text.splitlines():
        kind, mode, size, mtime, name = line.split(" ", 4)
        out[name] = (kind, mode, int(size), int(float(mtime)))
    return out


def find_listing(root: Path) -> str:
    return subprocess.run(["find", str(root), "-printf", FIND_FORMAT], capture_output=True,
                          text=True, check=True).stdout


def compare_find(got: str, ref: str) -> list[str]:
    """Names, types, modes and file sizes must match exactly; mtimes to the second
    (directory sizes differ between file systems and say nothing)."""
    g, r = parse_find(got), parse_find(ref)
    problems = [f"missing {n!r}" for n in sorted(r.keys() - g.keys())]
    problems += [f"extra {n!r}" for n in sorted(g.keys() - r.keys())]
    for name in sorted(r.keys() & g.keys()):
        (gk, gm, gs, gt), (rk, rm, rs, rt) = g[name], r[name]
        what = []
        if gk != rk:
            what.append(f"type {gk} != {rk}")
        if gm != rm:
            what.append(f"mode {gm} != {rm}")
        if rk == "f" and gs != rs:
            what.append(f"size {gs} != {rs}")
        if gt != rt:
            what.append(f"mtime {gt} != {rt}")
        if what:
            problems.append(f"{name or '.'}: {', '.join(what)}")
    return summarize(problems)


def summarize(problems: list[str]) -> list[str]:
    if len(problems) > MAX_PROBLEMS:
        return problems[:MAX_PROBLEMS] + [f"... and {len(problems) - MAX_PROBLEMS} more"]
    return problems


class TreeComparer:
    """Compares a destination tree with a source tree, as rsync -rlt should leave it:
    same names and types, same file contents, same mtimes to the second (files and
    directories; directory mtimes can be left out, to tell "the data is there" from
    "everything is right"). Modes are not compared: rsync -rlt does not preserve them.

    Polled repeatedly while a system uploads in the background, and the poll waits
    4× a comparison's cost between two, so a comparison must be cheap: the source
    (which does not change) is read once; the destination costs one listing per
    directory and one lstat per entry; file contents already found equal are not
    read again while their (size, mtime, ctime, inode) on the destination stay the
    same.
    """

    def __init__(self, src: Path, dst: Path, mtimes: bool = True):
        self.src, self.dst, self.mtimes = Path(src), Path(dst), mtimes
        self._equal: dict[str, tuple] = {}
        self._source: list[tuple[str, int, list[str], dict[str, os.stat_result]]] | None = None

    def _scan_source(self) -> list[tuple[str, int, list[str], dict[str, os.stat_result]]]:
        """(dir relative to src, its mtime, its subdirectories, its files' lstat), top-down."""
        if self._source is None:
            self._source = []
            for dirpath, dirnames, filenames in os.walk(self.src):
                rel_dir = os.path.relpath(dirpath, self.src)
                rel_dir = "" if rel_dir == "." else rel_dir
                files = {n: os.lstat(os.path.join(dirpath, n)) for n in filenames}
                self._source.append((rel_dir, int(os.stat(dirpath).st_mtime), sorted(dirnames), files))
        return self._source

    def problems(self, contents: bool = True, dir_mtimes: bool = True) -> list[str]:
        out, unchecked = self._metadata(dir_mtimes)
        if contents:
            out += self._contents(unchecked)
        return summarize(out)

    def equal(self, dir_mtimes: bool = True) -> bool:
        """Metadata first; contents only once all the metadata agrees."""
        out, unchecked = self._metadata(dir_mtimes)
        return not out and not self._contents(unchecked)

    def _metadata(self, dir_mtimes: bool) -> tuple[list[str], list[tuple[str, tuple]]]:
        """Problems with names, types, sizes and mtimes; and the files whose metadata
        is right but whose contents are not known to be (with their destination key)."""
        out: list[str] = []
        unchecked: list[tuple[str, tuple]] = []
        if not self.dst.is_dir():
            return [f"{self.dst} does not exist"], []
        missing_dirs: set[str] = set()
        for rel_dir, src_mtime, dirnames, files in self._scan_source():
            if rel_dir and (rel_dir in missing_dirs or os.path.dirname(rel_dir) in missing_dirs):
                missing_dirs.add(rel_dir)
                continue
            try:
                with os.scandir(self.dst / rel_dir) as it:
                    present = {e.name: e for e in it}
            except OSError as e:
                out.append(f"{rel_dir or '.'}: {e.strerror}")
                missing_dirs.add(rel_dir)
                continue
            wanted = set(dirnames) | set(files)
            out += [f"extra {os.path.join(rel_dir, n)!r}" for n in sorted(present.keys() - wanted)]
            out += [f"missing {os.path.join(rel_dir, n)!r}" for n in sorted(wanted - present.keys())]
            missing_dirs.update(os.path.join(rel_dir, d) for d in dirnames if d not in present)
            if self.mtimes and dir_mtimes:
                dm = int(os.lstat(self.dst / rel_dir).st_mtime)
                if dm != src_mtime:
                    out.append(f"{rel_dir or '.'}: mtime {dm} != {src_mtime}")
            for name in sorted(files.keys() & present.keys()):
                rel = os.path.join(rel_dir, name)
                st_s, st_d = files[name], present[name].stat(follow_symlinks=False)
                if not stat.S_ISREG(st_d.st_mode):
                    out.append(f"{rel}: not a regular file")
                    continue
                if st_s.st_size != st_d.st_size:
                    out.append(f"{rel}: size {st_d.st_size} != {st_s.st_size}")
                    continue
                if self.mtimes and int(st_s.st_mtime) != int(st_d.st_mtime):
                    out.append(f"{rel}: mtime {int(st_d.st_mtime)} != {int(st_s.st_mtime)}")
                key = (st_d.st_size, st_d.st_mtime_ns, st_d.st_ctime_ns, st_d.st_ino)
                if self._equal.get(rel) != key:
                    unchecked.append((rel, key))
            if len(out) > 200:
                break
        return out, unchecked

    def _contents(self, unchecked: list[tuple[str, tuple]]) -> list[str]:
        out = []
        for rel, key in unchecked:
            try:
                same = same_bytes(self.src / rel, self.dst / rel)
            except OSError as e:
                out.append(f"{rel}: {e.strerror}")
                continue
            if same:
                self._equal[rel] = key
            else:
                out.append(f"{rel}: contents differ")
        return out


def same_bytes(a: Path, b: Path) -> bool:
    """Byte comparison without filecmp's cache, which trusts (size, mtime) and
    would hide a file rewritten in place with its mtime set back."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


def files_equal(a: Path, b: Path) -> bool:
    try:
        return a.stat().st_size == b.stat().st_size and same_bytes(a, b)
    except OSError:
        return False


def poll(cond, deadline: float, interval: float = 0.005) -> float | None:
    """Monotonic time at which cond() first held, or None if it did not by deadline.
    A costly check (walking a big tree) is spaced out so that the harness takes at
    most a fifth of a core from the system it measures; a cheap one (a stat) is
    repeated often, so that the time found is late by little more than the check."""
    while True:
        t0 = time.monotonic()
        if cond():
            return time.monotonic()
        now = time.monotonic()
        if now >= deadline:
            return None
        time.sleep(min(max(interval, 4 * (now - t0)), max(0.0, deadline - now)))
