"""The workloads: what a user does with a mounted remote tree, timed and checked.

Read workloads (1-6) use the server's ``ro/`` directory: ``tree/`` and ``big.bin``.
Write workloads (7-12) use a per-system ``rw-<system>/`` directory, empty at the
first of them. "Cold" means a fresh mount with an empty cache directory; "warm"
reuses the mount of the workload before it (and if that did not just run, does
its work first, untimed). Times that say "durable" run from the start of the
command until the server's directory, read directly, holds the right data.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .dataset import Dataset
from .session import Budget, Failed, Session
from .verify import (
    FIND_FORMAT,
    TreeComparer,
    compare_find,
    files_equal,
    find_listing,
    poll,
    summarize,
)

MIME_FILES = 300
PENDING_FILES = 100  # small files uploaded (with the big one) before the unmount is timed
DIR_MTIME_GRACE = 10.0  # seconds for directory mtimes to follow the data to the server
NOOP_SETTLE = 30.0  # a no-op rsync must leave the server's tree right within this


@dataclass
class Result:
    status: str = "ok"  # ok | FAILED | timeout | error | skipped
    seconds: dict[str, float | None] = field(default_factory=dict)  # phase -> seconds
    detail: str = ""
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"status": self.status, "seconds": self.seconds, "detail": self.detail,
                "extra": self.extra}


@dataclass
class Workload:
    id: int
    key: str
    title: str  # may name {big} (the big file's size) and {mime} (files given to `file`)
    phases: tuple[str, ...]
    run: Callable[[Session, Budget, Result], None]

    def describe(self, data: Dataset) -> str:
        return self.title.format(big=f"{data.spec.big_size >> 20} MiB",
                                 mime=min(MIME_FILES, len(data.files)))


# ---------------------------------------------------------------- helpers

def _check(problems: list[str], what: str) -> None:
    if problems:
        raise Failed(f"{what}: " + "; ".join(problems))


def _find(s: Session, budget: Budget, r: Result | None) -> None:
    secs, res = s.run(["find", str(s.mnt / "tree"), "-printf", FIND_FORMAT], budget)
    if r is not None:
        r.seconds["time"] = secs
    ref = find_listing(s.server_dir("ro") / "tree")
    _check(compare_find(res.stdout, ref), "find output differs from the server")


def _read_big(s: Session, budget: Budget, r: Result | None) -> None:
    # cmp against the local source copy: one read through the mount, verified
    secs, res = s.run(["cmp", str(s.mnt / "big.bin"), str(s.data.big)], budget, check=False)
    if r is not None:
        r.seconds["time"] = secs
        r.extra["MB_per_s"] = round(s.data.spec.big_size / 1e6 / max(secs, 1e-9), 1)
    if res.returncode != 0:
        raise Failed(f"big.bin read through the mount differs: {(res.stdout + res.stderr).strip()}")


def _transferred(rsync_stats: str) -> int | None:
    m = re.search(r"Number of regular files transferred: ([\d,]+)", rsync_stats)
    return int(m.group(1).replace(",", "")) if m else None


def _wait_tree(s: Session, budget: Budget, src: Path, t0: float, r: Result | None,
               state: str = "", limit: float | None = None) -> None:
    """Wait until the server's rw/tree holds src. The data (names, contents, file
    mtimes) must arrive within the budget (or ``limit``); directory mtimes, which
    rsync -t sets last, get DIR_MTIME_GRACE more. Durable time counts from t0."""
    cmp = TreeComparer(src, s.server_dir("rw") / "tree")
    wait = budget.left() if limit is None else min(budget.left(), limit)
    data_at = poll(lambda: cmp.equal(dir_mtimes=False), time.monotonic() + wait)
    if data_at is None:
        problems = cmp.problems()
        if r is not None:
            r.extra["not_durable"] = problems
        budget.left()  # raises Timeout when that is why
        raise Failed("server tree differs: " + "; ".join(problems))
    if state:
        s.tree_state = state
    all_at = poll(cmp.equal, min(data_at + DIR_MTIME_GRACE, time.monotonic() + budget.left()))
    if r is not None and "durable" in r.seconds:
        r.seconds["durable"] = (all_at or data_at) - t0
    if all_at is None:
        _check(cmp.problems(), "server tree differs (data arrived, the rest did not)")


def _rsync_up(s: Session, budget: Budget, r: Result | None, src: Path, state: str) -> None:
    """rsync src/ into the mount's tree/; times until it returns and until the
    server's rw/tree equals src."""
    s.tree_state = ""
    t0 = time.monotonic()
    secs, res = s.run(["rsync", "-rlt", "--stats", f"{src}/", f"{s.mnt}/tree/"], budget)
    if r is not None:
        r.seconds["returns"] = secs
        r.seconds["durable"] = None
        r.extra["files_transferred"] = _transferred(res.stdout)
    _wait_tree(s, budget, src, t0, r, state)


def _tree_on_server(s: Session, budget: Budget, r: Result, warm: bool = True) -> None:
    """Make sure the server's rw/tree holds the source tree and the mount has seen it.

    After workload 8 that is so. Without it (not selected, or it did not finish,
    as sshfs's upload does not within 300 s at 40 ms) the tree is put on the server directly, the
    mount is made afresh and one untimed no-op rsync warms it, so that 9-11 still
    measure what they are about instead of another slow upload. `warm=False`: the
    tree only (workload 13 mounts afresh itself)."""
    if s.tree_state == "source":
        return
    s.drop_mount()
    if not s.rw_ready:
        s.prepare_rw()
    tree = s.server_dir("rw") / "tree"
    if tree.exists():
        shutil.rmtree(tree)
    shutil.copytree(s.data.tree, tree, copy_function=shutil.copy2)
    s.chown(tree)
    s.tree_state = "source"
    if not warm:
        return
    s.fresh_mount("rw", budget)
    s.run(["rsync", "-rlt", f"{s.data.tree}/", f"{s.mnt}/tree/"], budget)
    r.detail = ("no upload by workload 8 to build on: tree put on the server directly, then warmed "
                "by one untimed rsync through a fresh mount")


# ---------------------------------------------------------------- read workloads

def find_cold(s: Session, budget: Budget, r: Result) -> None:
    s.fresh_mount("ro", budget)
    _find(s, budget, r)


WARM_RUNS = 5  # a warm find takes milliseconds: the median of a few runs


def find_warm(s: Session, budget: Budget, r: Result) -> None:
    if not s.last_was(1):
        s.fresh_mount("ro", budget)
        _find(s, budget, None)
    runs = []
    for _ in range(WARM_RUNS):
        _find(s, budget, r)
        runs.append(r.seconds["time"])
    r.seconds["time"] = sorted(runs)[len(runs) // 2]
    r.extra["runs"] = [round(x, 4) for x in runs]


def read_cold(s: Session, budget: Budget, r: Result) -> None:
    s.fresh_mount("ro", budget)
    _read_big(s, budget, r)


def read_warm(s: Session, budget: Budget, r: Result) -> None:
    if not s.last_was(3):
        s.fresh_mount("ro", budget)
        _read_big(s, budget, None)
    # A remount, keeping the cache directory: what a system keeps on disk counts,
    # not what the kernel's page cache still holds for the old mount.
    s.remount(budget)
    _read_big(s, budget, r)


def file_mime(s: Session, budget: Budget, r: Result) -> None:
    s.fresh_mount("ro", budget)
    names = s.data.sample(MIME_FILES, "mime")
    args = ["file", "--mime-type", "--", *names]
    secs, res = s.run(args, budget, cwd=s.mnt / "tree")
    r.seconds["time"] = secs
    _, ref = s.run(args, budget, cwd=s.server_dir("ro") / "tree")
    got, want = res.stdout.splitlines(), ref.stdout.splitlines()
    _check(summarize([f"{g!r} != {w!r}" for g, w in zip(got, want, strict=False) if g != w]
                     + ([f"{len(got)} lines != {len(want)}"] if len(got) != len(want) else [])),
           "file --mime-type differs from the server")


def rsync_down(s: Session, budget: Budget, r: Result) -> None:
    s.fresh_mount("ro", budget)
    dest = s.work / "download"
    if dest.exists():
        shutil.rmtree(dest)
    secs, _ = s.run(["rsync", "-rlt", f"{s.mnt}/tree/", f"{dest}/"], budget)
    r.seconds["time"] = secs
    _check(TreeComparer(s.server_dir("ro") / "tree", dest).problems(),
           "downloaded tree differs from the server")


# ---------------------------------------------------------------- write workloads

def cp_big_in(s: Session, budget: Budget, r: Result) -> None:
    if not s.rw_ready:
        s.prepare_rw()
    s.ensure_mount("rw", budget)
    target = s.server_dir("rw") / "big.bin"
    t0 = time.monotonic()
    secs, _ = s.run(["cp", str(s.data.big), str(s.mnt / "big.bin")], budget)
    r.seconds["returns"] = secs
    done = poll(lambda: files_equal(s.data.big, target), time.monotonic() + budget.left())
    if done is None:
        budget.left()
        raise Failed("big.bin on the server differs from the source")
    r.seconds["durable"] = done - t0
    r.extra["MB_per_s_durable"] = round(s.data.spec.big_size / 1e6 / max(done - t0, 1e-9), 1)


def rsync_up(s: Session, budget: Budget, r: Result) -> None:
    if not s.rw_ready:
        s.prepare_rw()
    s.ensure_mount("rw", budget)
    _rsync_up(s, budget, r, s.data.tree, "source")


def _noop(s: Session, budget: Budget, r: Result) -> None:
    secs, res = s.run(["rsync", "-rlt", "--stats", f"{s.data.tree}/", f"{s.mnt}/tree/"], budget)
    r.seconds["time"] = secs
    n = r.extra["files_transferred"] = _transferred(res.stdout)
    if n:
        r.detail = (r.detail + "; " if r.detail else "") + \
            f"rsync re-sent {n} unchanged files (mtime or size looked different)"
    _wait_tree(s, budget, s.data.tree, time.monotonic(), None, limit=NOOP_SETTLE)


def rsync_noop(s: Session, budget: Budget, r: Result) -> None:
    _tree_on_server(s, budget, r)
    _noop(s, budget, r)


def rsync_noop_remount(s: Session, budget: Budget, r: Result) -> None:
    _tree_on_server(s, budget, r)
    s.ensure_mount("rw", budget)
    unmount_s, _ = s.remount(budget)
    r.extra["unmount_s"] = round(unmount_s, 3)
    r.extra["mount_s"] = round(s.last_mount_s, 3)
    _noop(s, budget, r)


def rsync_noop_cold(s: Session, budget: Budget, r: Result) -> None:
    """The everyday sync: the tree is on the server already, the mount is new (empty
    cache). rsync lists nothing on the receiving side; it stats every name."""
    _tree_on_server(s, budget, r, warm=False)
    s.fresh_mount("rw", budget)
    _noop(s, budget, r)


def rsync_changed(s: Session, budget: Budget, r: Result) -> None:
    _tree_on_server(s, budget, r)
    s.ensure_mount("rw", budget)
    _rsync_up(s, budget, r, s.changed, "changed")


def unmount_pending(s: Session, budget: Budget, r: Result) -> None:
    if not s.rw_ready:
        s.prepare_rw()
    s.ensure_mount("rw", budget)
    names = s.data.sample(PENDING_FILES, "pending")
    listing = s.work / "pending-files.txt"
    listing.write_text("".join(n + "\n" for n in names))
    t0 = time.monotonic()
    s.run(["cp", str(s.data.big), str(s.mnt / "pending.bin")], budget)
    s.run(["rsync", "-rlt", f"--files-from={listing}", f"{s.data.tree}/",
           f"{s.mnt}/pending-tree/"], budget)
    r.extra["upload_returns_s"] = round(time.monotonic() - t0, 3)
    m, s.mount = s.mount, None
    r.seconds["time"] = m.unmount(budget.left())
    rw = s.server_dir("rw")
    problems = [] if files_equal(s.data.big, rw / "pending.bin") else ["pending.bin differs"]
    for n in names:
        src, dst = s.data.tree / n, rw / "pending-tree" / n
        if not files_equal(src, dst):
            problems.append(f"{n}: contents differ or missing")
        elif int(src.stat().st_mtime) != int(dst.stat().st_mtime):
            problems.append(f"{n}: mtime {int(dst.stat().st_mtime)} != {int(src.stat().st_mtime)}")
    _check(summarize(problems), "not on the server after unmount returned and the process exited")


WORKLOADS = [
    Workload(1, "find-cold", "find -printf over the tree, cold", ("time",), find_cold),
    Workload(2, "find-warm", "find -printf again, warm (median of 5)", ("time",), find_warm),
    Workload(3, "read-cold", "read the {big} file, cold", ("time",), read_cold),
    Workload(4, "read-warm", "re-read the {big} file after a remount", ("time",), read_warm),
    Workload(5, "file-mime", "file --mime-type on {mime} files, cold", ("time",), file_mime),
    Workload(6, "rsync-down", "rsync -rlt tree mount→local, cold", ("time",), rsync_down),
    Workload(7, "cp-in", "cp the {big} file into the mount", ("returns", "durable"), cp_big_in),
    Workload(8, "rsync-up", "rsync -rlt tree local→mount, initial", ("returns", "durable"),
             rsync_up),
    Workload(9, "rsync-noop", "rsync -rlt no-op, warm", ("time",), rsync_noop),
    Workload(10, "rsync-noop-remount", "rsync -rlt no-op after remount", ("time",),
             rsync_noop_remount),
    Workload(11, "rsync-changed", "rsync -rlt after 1% of files changed", ("returns", "durable"),
             rsync_changed),
    Workload(12, "unmount-pending", "unmount right after an upload", ("time",), unmount_pending),
    Workload(13, "rsync-noop-cold", "rsync -rlt no-op, fresh mount, tree on the server",
             ("time",), rsync_noop_cold),
]
BY_ID = {w.id: w for w in WORKLOADS}
BY_KEY = {w.key: w for w in WORKLOADS}


def select(spec: str) -> list[Workload]:
    """'1,2,7', 'find-cold,rsync-up', ranges '1-6' or 'all' -> workloads in id order."""
    if spec in ("", "all"):
        return list(WORKLOADS)
    chosen: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if re.fullmatch(r"\d+-\d+", part):
            a, b = map(int, part.split("-"))
            chosen.update(range(a, b + 1))
        elif part.isdigit():
            chosen.add(int(part))
        elif part in BY_KEY:
            chosen.add(BY_KEY[part].id)
        else:
            raise ValueError(f"unknown workload {part!r} (known: 1-13 or {', '.join(BY_KEY)})")
    unknown = chosen - BY_ID.keys()
    if unknown:
        raise ValueError(f"unknown workload ids {sorted(unknown)}")
    return [BY_ID[i] for i in sorted(chosen)]
