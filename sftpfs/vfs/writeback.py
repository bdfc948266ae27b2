"""Write-back: changes return at once and reach the server in the background.

Every change is first made durable locally, then shown in the local view,
then replayed on the server by the uploader.

Local state, in `<cache dir>/writeback/`:

* `journal`: one JSON line per record, appended with a single write(2)
  before the syscall that caused it returns. The page cache holds it from
  then on, so killing sftpfs (even SIGKILL) loses nothing acknowledged; a
  crash of the machine can lose what was not fsync'd, and fsync (file or
  directory) waits until the server has it. Records: `op` (a change to
  replay), `f` (a file gets local dirty data), `w` (bytes written), `t`
  (truncated), `done`/`fail` (an op finished), `gone` (a file's data is all
  on the server). A torn last line (power loss) is ignored.
* `data/<id>`: the dirty contents of one file, sparse, at file offsets.
* `recovery/`: data the server refused, kept for the user (`sftpfs status`).

Ordering: ops touching the same path, or a path and one of its ancestors,
run in the order they were made; other ops run in parallel (up to
`parallel`). That keeps `mkdir d; create d/f; rename d e` right while a
thousand unrelated files upload at once.

Invariants (see docs/architecture.md):
* A pinned path's cached attributes are ours, not the server's (meta pins);
  a pin is released when the last pending op touching the path is done.
* A file's dirty ranges are uploaded before any later op on its path runs
  (`data` ops are ordered like any other op), and taken out of `ranges`
  only when the upload succeeded.
* Replaying an op twice (a crash after the server did it, before `done`
  was journaled) is harmless: each op tolerates finding its effect done.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import trio

from ..remote import protocol as p
from ..remote.client import Remote
from ..remote.errors import ConnectionLost, RequestTimeout
from .meta import MetaCache, is_below, parent_of

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # bytes read from a dirty file per upload step
JOURNAL_COMPACT_AT = 64 << 20
# Seconds between the last close of a written file and its upload, for the utimes and
# chmod tools send next to fold into it: one round trip (a fold saves a request, not
# worth waiting longer for), within these bounds. 50 ms at 0 ms RTT made the last
# files of an rsync reach the server 45 ms later than they could.
CLOSE_SETTLE_MIN, CLOSE_SETTLE_MAX = 0.005, 0.05
EAGER_BYTES = 4 << 20  # dirty bytes of one file that start its upload without waiting
SCHEDULE_WINDOW = 384  # unfinished ops looked at per scheduling pass (parallel is 48)
WRITES_AHEAD = 32  # WRITE requests in flight per uploading file
SPARE_FILES = 64  # empty data files kept for reuse: creating one costs 0.1-0.4 ms on ext4


async def _settle(status, first_error: BaseException | None) -> BaseException | None:
    """Await one write status; keep the first failure but await every one (they hold slots)."""
    try:
        await status()
    except (OSError, trio.Cancelled) as e:
        if isinstance(e, trio.Cancelled):
            raise
        return first_error or e
    return first_error


def _enc(path: bytes | None) -> str | None:
    return None if path is None else path.decode("latin-1")


def _dec(s: str | None) -> bytes | None:
    return None if s is None else s.encode("latin-1")


def _ancestors(path: bytes) -> list[bytes]:
    """The directories above `path`, up to the root (b"")."""
    out = []
    while path:
        path = path.rpartition(b"/")[0]
        out.append(path)
    return out


# ---- dirty ranges ------------------------------------------------------------------------


class Ranges:
    """Disjoint, sorted [start, end) intervals."""

    def __init__(self, spans: list[tuple[int, int]] | None = None) -> None:
        self.spans: list[tuple[int, int]] = []
        for s, e in spans or ():
            self.add(s, e)

    def add(self, start: int, end: int) -> None:
        if end <= start:
            return
        out = []
        for s, e in self.spans:
            if e < start or s > end:
                out.append((s, e))
            else:
                start, end = min(s, start), max(e, end)
        out.append((start, end))
        out.sort()
        self.spans = out

    def update(self, other: Ranges) -> None:
        for s, e in other.spans:
            self.add(s, e)

    def clip(self, size: int) -> None:
        self.spans = [(s, min(e, size)) for s, e in self.spans if s < size]

    def covers(self, start: int, end: int) -> bool:
        return any(s <= start and end <= e for s, e in self.spans)

    def total(self) -> int:
        return sum(e - s for s, e in self.spans)

    def __bool__(self) -> bool:
        return bool(self.spans)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(list(self.spans))


# ---- journal ----------------------------------------------------------------------------


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def append(self, rec: dict) -> None:
        os.write(self.fd, (json.dumps(rec, separators=(",", ":")) + "\n").encode())

    def read(self) -> list[dict]:
        out = []
        with open(self.path, "rb") as f:
            lines = f.read().split(b"\n")
        for i, line in enumerate(lines):
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except ValueError:
                if i < len(lines) - 2:
                    log.warning("write-back journal: skipping a damaged record (line %d)", i + 1)
        return out

    def rewrite(self, recs: list[dict]) -> None:
        """Replace the journal atomically (compaction)."""
        tmp = self.path.with_suffix(".new")
        with open(tmp, "wb") as f:
            for rec in recs:
                f.write((json.dumps(rec, separators=(",", ":")) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        os.close(self.fd)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def fsync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


# ---- state --------------------------------------------------------------------------------


@dataclass(eq=False)
class DirtyFile:
    """Local contents of a file not yet (all) on the server."""

    id: int
    path: bytes | None  # its local path now; None once unlinked
    new: bool  # created here: no server contents underneath
    base: tuple[int | None, int | None] | None  # server (size, mtime) our changes apply to
    size: int
    fd: int
    mtime: int
    ranges: Ranges = field(default_factory=Ranges)
    opens: int = 0
    last_write: float = 0.0
    error: OSError | None = None
    queued: Op | None = None  # its create/data op that has not started yet
    inflight: Ranges = field(default_factory=Ranges)  # taken by a running upload
    unfinished: int = 0  # ops naming this file that have not finished

    def fully_dirty(self) -> bool:
        """Every byte is ours, counting those an upload has taken (`inflight`)."""
        if self.new or self.size == 0:
            return True
        every = Ranges(list(self.ranges))
        every.update(self.inflight)
        return every.covers(0, self.size)


@dataclass(eq=False)
class Op:
    seq: int
    kind: str  # mkdir create data setattr rename unlink rmdir symlink link
    paths: tuple[bytes, ...]
    args: dict
    ready_at: float = 0.0
    state: str = "pending"  # pending running done failed
    attempts: int = 0
    hurry: bool = False  # someone waits for it: no write-back delay (not journaled)

    def record(self) -> dict:
        return {"op": self.kind, "seq": self.seq, "paths": [_enc(x) for x in self.paths],
                "args": self.args}


def claim_slot(base: Path) -> Path:
    """A journal directory no other running mount uses: `base/<n>`, held by an flock.

    Two mounts of one remote each get their own journal; a slot whose mount
    died (its lock went with it) is taken, and its journal replayed, by the
    next mount that comes along.
    """
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    for n in range(64):
        slot = base / str(n)
        slot.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(slot / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        _held_locks.append(fd)  # held for the life of the process
        return slot
    raise OSError(errno.EBUSY, f"64 mounts of this remote already hold {base}")


_held_locks: list[int] = []


class WriteBack:
    def __init__(self, remote: Remote, rpath: Callable[[bytes], bytes], meta: MetaCache,
                 directory: Path, *, delay: float = 0.5, dirty_limit: int = 2 << 30,
                 parallel: int = 48, stall_timeout: float = 30.0) -> None:
        self.remote = remote
        self.rpath = rpath
        self.meta = meta
        self.dir = directory
        (directory / "data").mkdir(mode=0o700, exist_ok=True)
        (directory / "recovery").mkdir(mode=0o700, exist_ok=True)
        self.delay = delay
        self.dirty_limit = dirty_limit
        self.parallel = parallel
        self.stall_timeout = stall_timeout
        self.journal = Journal(directory / "journal")
        self.ops: list[Op] = []
        self.files: dict[int, DirtyFile] = {}
        self.by_path: dict[bytes, DirtyFile] = {}
        self.failures: list[dict] = []
        self.errors: dict[bytes, OSError] = {}  # by local path, returned at next flush/fsync
        self._path_ops: dict[bytes, int] = {}  # unfinished ops per path: pins live while > 0
        self._moves: dict[bytes, int] = {}  # unfinished ops per path that move things on the server
        self._last_op: dict[bytes, Op] = {}  # the newest unfinished op naming each path
        self._last_below: dict[bytes, Op] = {}  # the newest unfinished op naming a path below
        self._done_count = 0
        self._finished_total = 0
        self._hurried = 0  # unfinished ops with `hurry` set
        self._seq = 0
        self._next_file = 1
        self._running = 0
        self._wake = trio.Event()
        self._progress = trio.Event()  # set whenever an op finishes
        self._dirty_bytes = 0
        self.uploaded_bytes = 0
        self.owner: tuple[int | None, int | None] | None = None
        # Data files of finished uploads, emptied, named data/spare-N, fds open: a new
        # dirty file takes one with a rename instead of creating a file.
        self._spare: list[tuple[int, str]] = []
        self._spare_serial = 0
        self._drop_spares()
        self._recover()

    # ---- recording changes (trio thread; each returns after the journal has it) -----------

    def _op(self, kind: str, paths: tuple[bytes, ...], delay: float = 0.0, **args) -> Op:
        self._seq += 1
        op = Op(self._seq, kind, paths, args, ready_at=trio.current_time() + delay)
        self.journal.append(op.record())
        self._track(op)
        self._wake.set()
        return op

    def _track(self, op: Op) -> None:
        self.ops.append(op)
        f = self.files.get(op.args.get("file", -1))
        if f is not None:
            f.unfinished += 1
        for path in op.paths:
            self._last_op[path] = op
            for up in _ancestors(path):
                self._last_below[up] = op
            self._path_ops[path] = self._path_ops.get(path, 0) + 1
            if op.kind not in ("data", "setattr"):
                self._moves[path] = self._moves.get(path, 0) + 1
            if op.kind in ("unlink", "rmdir") or (op.kind == "rename" and path == op.paths[0]):
                self.meta.pin_absent(path)
            else:
                self.meta.pin(path)

    def _untrack(self, op: Op) -> None:
        """`op` is finished (done or failed): release what it held."""
        op.state = "done"
        self._done_count += 1
        self._finished_total += 1
        if op.hurry:
            self._hurried -= 1
        f = self.files.get(op.args.get("file", -1))
        if f is not None:
            f.unfinished -= 1
        for path in op.paths:
            if self._last_op.get(path) is op:
                del self._last_op[path]
            for up in _ancestors(path):
                if self._last_below.get(up) is op:
                    del self._last_below[up]
            n = self._path_ops.get(path, 1) - 1
            if n <= 0:
                self._path_ops.pop(path, None)
                self.meta.unpin(path)
            else:
                self._path_ops[path] = n
            if op.kind not in ("data", "setattr"):
                n = self._moves.get(path, 1) - 1
                if n <= 0:
                    self._moves.pop(path, None)
                else:
                    self._moves[path] = n
        if op.kind == "rename":
            # Pins moved below the new name by the rename outlive the ops that made
            # them (those ops name the old paths): release them now.
            for q in self.meta.pins_below(op.paths[1]):
                if q not in self._path_ops:
                    self.meta.unpin(q)
        if self._done_count > 256 and self._done_count * 2 > len(self.ops):
            self.ops = [o for o in self.ops if o.state != "done"]
            self._done_count = 0

    def mkdir(self, path: bytes, mode: int) -> None:
        self._op("mkdir", (path,), mode=mode)

    def symlink(self, path: bytes, target: bytes) -> None:
        self._op("symlink", (path,), target=_enc(target))

    def link(self, src: bytes, dst: bytes) -> None:
        self._op("link", (src, dst))

    def create(self, path: bytes, mode: int) -> DirtyFile:
        f = self._new_file(path, new=True, base=None, size=0)
        f.queued = self._op("create", (path,), delay=self.delay, mode=mode, file=f.id)
        return f

    def open_for_write(self, path: bytes, attrs: p.Attrs) -> DirtyFile:
        """Dirty state for an existing server file, made on first write or truncate."""
        f = self.by_path.get(path)
        if f is None:
            f = self._new_file(path, new=False, base=(attrs.size, attrs.mtime), size=attrs.size or 0)
        return f

    def _new_file(self, path: bytes, *, new: bool, base, size: int) -> DirtyFile:
        fid = self._next_file
        self._next_file += 1
        name = self.dir / "data" / str(fid)
        fd = self._take_spare(name)
        if fd is None:
            fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        if size:  # a spare is as empty as a new file
            os.ftruncate(fd, size)
        f = DirtyFile(fid, path, new, base, size, fd, int(time.time()))
        self.journal.append({"f": fid, "path": _enc(path), "new": new,
                             "base": list(base) if base else None, "size": size})
        self.files[fid] = f
        self.by_path[path] = f
        return f

    async def write(self, f: DirtyFile, offset: int, data: bytes) -> None:
        while self._dirty_bytes >= self.dirty_limit and self._has_uploadable():
            self._urgent = True  # back-pressure: writers wait for uploads, never fail
            self._wake.set()
            await self._wait_progress()
        os.pwrite(f.fd, data, offset)
        self.journal.append({"w": f.id, "o": offset, "n": len(data)})
        before = f.ranges.total()
        f.ranges.add(offset, offset + len(data))
        self._dirty_bytes += f.ranges.total() - before
        f.size = max(f.size, offset + len(data))
        f.mtime = int(time.time())
        f.last_write = trio.current_time()
        self._queue_data(f)
        if f.queued is not None and f.queued.state == "pending" and \
                f.ranges.total() >= EAGER_BYTES and f.queued.ready_at > 0:
            # A big file streams to the server while it is being written.
            f.queued.ready_at = 0.0
            self._wake.set()

    def truncate(self, f: DirtyFile, size: int) -> None:
        os.ftruncate(f.fd, size)
        self.journal.append({"t": f.id, "s": size})
        if size > f.size:
            f.ranges.add(f.size, size)  # the new tail reads as zeros
        f.ranges.clip(size)
        f.size = size  # every upload also sets the server's size to this
        f.mtime = int(time.time())
        f.last_write = trio.current_time()
        self._queue_data(f)

    def _queue_data(self, f: DirtyFile) -> None:
        """Make sure an upload of `f` is queued behind the changes made so far."""
        if f.path is None or (f.queued is not None and f.queued.state == "pending"):
            return
        f.queued = self._op("data", (f.path,), delay=self.delay, file=f.id)

    def setattr(self, path: bytes, changes: p.Attrs, *, follow: bool) -> None:
        args = {k: getattr(changes, k) for k in ("mode", "uid", "gid", "atime", "mtime")
                if getattr(changes, k) is not None}
        f = self.by_path.get(path)
        if f is not None and changes.mtime is not None:
            f.mtime = changes.mtime  # an upload sets the server's mtime to this
        if not self._fold(path, args, follow):
            # Which dirty file this is *now*: at its turn in the replay the op's path names
            # the same file on the server, while by then `by_path` may name another (renames).
            extra = {"base_of": f.id} if f is not None else {}
            self._op("setattr", (path,), follow=follow, **args, **extra)

    def _fold(self, path: bytes, args: dict, follow: bool) -> bool:
        """Merge attribute changes into the path's newest op if it has not started.

        rsync and cp -p follow every file with utimes and chmod: folded into the
        pending upload (whose final FSETSTAT sets mode and times anyway) they
        cost no request of their own.
        """
        last = self._last_op.get(path)
        if last is None or last.state != "pending" or last.paths != (path,):
            return False
        below = self._last_below.get(path)
        if below is not None and below.seq > last.seq:
            # Entries changed inside the directory since: on the server they move its
            # mtime, so times set now must be set after them, not folded before.
            return False
        if last.kind == "create" and "uid" not in args and "gid" not in args:
            fold = {k: v for k, v in args.items() if k in ("mode", "atime", "mtime")}
        elif last.kind == "setattr" and last.args.get("follow", True) == follow:
            fold = args
        else:
            return False
        last.args.update(fold)
        self.journal.append({"amend": last.seq, "args": fold})
        return True

    def rename(self, old: bytes, new: bytes, noreplace: bool) -> None:
        self._op("rename", (old, new), noreplace=noreplace)
        replaced = self.by_path.pop(new, None)
        if replaced is not None:
            replaced.path = None
        for q in [q for q in self.by_path if is_below(q, old)]:
            f = self.by_path.pop(q)
            f.path = new + q[len(old):]
            self.by_path[f.path] = f

    def unlink(self, path: bytes) -> None:
        f = self.by_path.pop(path, None)
        if f is not None:
            f.path = None
            if self._cancel_unstarted(path, f):
                self.meta.pin_absent(path)
                self._release_pins_later(path)
                return
        self._op("unlink", (path,))

    def rmdir(self, path: bytes) -> None:
        self._op("rmdir", (path,))

    def _cancel_unstarted(self, path: bytes, f: DirtyFile) -> bool:
        """A file created here and deleted before upload never reaches the server."""
        mine = [op for op in self.ops if op.state != "done" and path in op.paths]
        if not mine or any(op.state != "pending" for op in mine):
            return False
        if mine[0].kind != "create" or mine[0].args.get("file") != f.id:
            return False
        if any(op.kind not in ("create", "data", "setattr") for op in mine):
            return False
        for op in mine:
            self.journal.append({"done": op.seq})
            self._untrack(op)
        f.queued = None
        if f.opens == 0:
            self._drop_file(f)  # else at its last close: it is still readable until then
        return True

    def _release_pins_later(self, path: bytes) -> None:
        if path not in self._path_ops:
            self.meta.unpin(path)
            self.meta.removed(path)

    def opened(self, f: DirtyFile) -> None:
        f.opens += 1

    def closed(self, f: DirtyFile) -> None:
        f.opens -= 1
        if f.opens == 0:
            if f.path is None and f.queued is None and not self._file_busy(f):
                self._drop_file(f)
            else:
                # A closed file uploads without waiting for quiet: after a moment,
                # for the utimes/chmod that tools send right after close to fold in.
                q = f.queued
                if q is not None and q.state == "pending":
                    q.ready_at = min(q.ready_at, trio.current_time() + self._close_settle())
                self._wake.set()

    def _close_settle(self) -> float:
        rtt = self.remote.rtt
        return CLOSE_SETTLE_MAX if rtt is None else min(CLOSE_SETTLE_MAX, max(CLOSE_SETTLE_MIN, rtt))

    def _file_busy(self, f: DirtyFile) -> bool:
        return f.unfinished > 0

    # ---- reading through dirty state --------------------------------------------------

    def file_for(self, path: bytes) -> DirtyFile | None:
        return self.by_path.get(path)

    def read_local(self, f: DirtyFile, offset: int, size: int) -> bytes:
        return os.pread(f.fd, size, offset)

    def error_for(self, f: DirtyFile | None, path: bytes | None) -> OSError | None:
        """An upload failure to report at the next flush/fsync, once."""
        if f is not None and f.error is not None:
            e, f.error = f.error, None
            return e
        if path is not None:
            return self.errors.pop(path, None)
        return None

    # ---- barriers -------------------------------------------------------------------------

    def _waited_for(self, path: bytes, *, below: bool) -> list[Op]:
        """Unfinished ops naming `path` or a directory above it (with `below`, also
        anything inside it)."""
        return [op for op in self.ops if op.state != "done" and any(
            is_below(path, q) or (below and is_below(q, path)) for q in op.paths)]

    def unsettled(self, path: bytes) -> bool:
        """A queued change moves `path` or a directory above it on the server (a
        rename, a mkdir, a removal...), so the server would answer about the old tree."""
        return path in self._moves or any(a in self._moves for a in _ancestors(path))

    async def settle(self, path: bytes, *, below: bool = False, patient: bool = True) -> None:
        """Wait until every change made so far to `path` (its ancestors, and with
        `below` its descendants) is on the server, or failed.

        Those changes, and the earlier ones they wait for, skip the write-back
        delay; the rest of the queue keeps it. Not `patient`: give up with
        ETIMEDOUT once nothing has moved towards the server for `stall_timeout`
        (a lookup must not hang on a dead link; an fsync must, as long as the
        mount lives).
        """
        waited = self._waited_for(path, below=below)
        if not waited:
            return
        self._hurry(waited)
        moved, since = self._motion(), trio.current_time()
        while any(op.state != "done" for op in waited):
            if patient:
                await self._wait_progress()
                continue
            with trio.move_on_after(1.0):
                await self._wait_progress()
            if self._motion() != moved:
                moved, since = self._motion(), trio.current_time()
            elif trio.current_time() - since >= self.stall_timeout:
                raise OSError(errno.ETIMEDOUT, "changes here are not reaching the server")

    def _hurry(self, ops: list[Op]) -> None:
        """Let `ops` and every earlier op they wait for (transitively: the same
        path, a directory above, or something inside) skip the delay."""
        last = max(op.seq for op in ops)
        wanted = {id(op) for op in ops}
        paths: set[bytes] = set()
        above: set[bytes] = set()
        for op in reversed(self.ops):  # an op only ever waits for earlier ones
            if op.seq > last or op.state == "done":
                continue
            if id(op) in wanted or any(q in paths or q in above or any(a in paths for a in _ancestors(q))
                                for q in op.paths):
                if not op.hurry:
                    op.hurry = True
                    self._hurried += 1
                paths.update(op.paths)
                for q in op.paths:
                    above.update(_ancestors(q))
        self._wake.set()

    def _motion(self) -> tuple[int, int, int]:
        """Changes as the uploader advances: ops finishing, requests going out."""
        return self._finished_total, self.remote.generation, self.remote.requests

    async def sync_all(self, progress: Callable[[dict], None] | None = None) -> bool:
        """Wait until everything changed so far is on the server; False if some failed."""
        upto = self._seq
        failed_before = len(self.failures)
        self._urgent = True
        self._wake.set()
        last = 0.0
        while any(op.seq <= upto and op.state != "done" for op in self.ops):
            with trio.move_on_after(0.5):
                await self._wait_progress()
            if progress is not None and trio.current_time() - last >= 0.5:
                last = trio.current_time()
                progress(self.status())
        self._urgent = False
        return len(self.failures) == failed_before

    async def _wait_progress(self) -> None:
        if self._progress.is_set():
            self._progress = trio.Event()
        await self._progress.wait()

    def status(self) -> dict:
        pending = [op for op in self.ops if op.state != "done"]
        files = {op.args.get("file") for op in pending if op.kind in ("create", "data")}
        return {
            "pending_ops": len(pending),
            "pending_files": len(files),
            "pending_bytes": sum(f.ranges.total() for f in self.files.values() if f.id in files),
            "uploaded_bytes": self.uploaded_bytes,
            "failures": list(self.failures),
            "recovery": self._recovery_files(),
            "connected": self.remote.connected,
        }

    def _recovery_files(self) -> list[str]:
        try:
            return sorted(str(x) for x in (self.dir / "recovery").iterdir())
        except OSError:  # the cache directory was removed under us
            return []

    # ---- the uploader -------------------------------------------------------------------

    _urgent = False

    def _has_uploadable(self) -> bool:
        return any(op.state in ("pending", "running") for op in self.ops)

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as n:
            task_status.started()
            while True:
                self._wake = trio.Event()
                next_ready = self._schedule(n)
                timeout = max(0.0, next_ready - trio.current_time()) if next_ready else 60
                with trio.move_on_after(timeout):
                    await self._wake.wait()
                if self._running:
                    await trio.sleep(0.005)  # let completions gather: one pass for many

    def _schedule(self, nursery: trio.Nursery) -> float | None:
        """Start every op whose turn it is; return when the next one becomes ready."""
        now = trio.current_time()
        busy: set[bytes] = set()  # paths of earlier unfinished ops
        busy_above: set[bytes] = set()  # their ancestors
        next_ready = None
        window = 0
        if not self._path_ops:
            self._urgent = False
        for op in self.ops:
            if op.state == "done":
                continue
            window += 1
            beyond = window > SCHEDULE_WINDOW
            if beyond and not self._hurried:
                break  # past the window only ops someone waits for start
            blocked = any(q in busy or q in busy_above or self._ancestor_in(q, busy)
                          for q in op.paths)
            if op.state == "pending" and not blocked and self._running < self.parallel \
                    and (op.hurry or not beyond):
                # Urgency (someone waits) skips the write-back delay, and a retry's
                # backoff only once connected again: against a dead server it spun.
                if op.ready_at <= now or ((self._urgent or op.hurry) and
                                          (not op.attempts or self.remote.connected)):
                    op.state = "running"
                    self._running += 1
                    nursery.start_soon(self._execute, op)
                else:
                    next_ready = op.ready_at if next_ready is None else min(next_ready, op.ready_at)
            for q in op.paths:
                busy.add(q)
                a = parent_of(q)
                while a and a not in busy_above:
                    busy_above.add(a)
                    a = parent_of(a)
                busy_above.add(b"")
        return next_ready

    @staticmethod
    def _ancestor_in(path: bytes, busy: set[bytes]) -> bool:
        if b"" in busy:
            return True
        a = parent_of(path)
        while a:
            if a in busy:
                return True
            a = parent_of(a)
        return False

    async def _execute(self, op: Op) -> None:
        log.debug("write-back: %s %r", op.kind, op.paths)
        try:
            await self._apply(op)
        except (ConnectionLost, RequestTimeout) as e:
            op.attempts += 1
            backoff = min(30.0, 0.5 * 2 ** min(op.attempts, 6))
            log.info("%s %r: %s; retrying in %.0f s", op.kind, op.paths[-1], e, backoff)
            op.state = "pending"
            op.ready_at = trio.current_time() + backoff
            self._running -= 1
            self._wake.set()
            return
        except OSError as e:
            self._fail_safely(op, e)
        except Exception as e:  # noqa: BLE001 - a bug must not stop the uploader
            log.exception("write-back of %s %r failed", op.kind, op.paths)
            self._fail_safely(op, OSError(errno.EIO, f"internal error: {e}"))
        else:
            self.journal.append({"done": op.seq})
            self._untrack(op)
        self._running -= 1
        self._finished(op)

    def _finished(self, op: Op) -> None:
        f = self.files.get(op.args.get("file", -1))
        if f is not None:
            if f.queued is op:
                f.queued = None
            if f.opens == 0 and f.queued is None and not f.ranges and not self._file_busy(f):
                self._drop_file(f)
        if not self._path_ops and not self.files:
            self.ops.clear()
            self._done_count = 0
            self.journal.rewrite([])
        elif os.fstat(self.journal.fd).st_size > JOURNAL_COMPACT_AT:
            self._compact()  # a long busy mount: keep the journal to what is pending
        self._progress.set()
        self._wake.set()

    def _drop_file(self, f: DirtyFile) -> None:
        self._dirty_bytes -= f.ranges.total()
        self.files.pop(f.id, None)
        if f.path is not None and self.by_path.get(f.path) is f:
            del self.by_path[f.path]
        self._recycle(f)
        self.journal.append({"gone": f.id})

    def _recycle(self, f: DirtyFile) -> None:
        """Empty a finished file's data file and keep it for the next new file.

        The rename comes first: from then on a restart finds no data/<id>,
        exactly as if it had been deleted (a restart deletes spares).
        """
        data = self.dir / "data"
        if len(self._spare) < SPARE_FILES:
            self._spare_serial += 1
            spare = f"spare-{self._spare_serial}"
            try:
                os.rename(data / str(f.id), data / spare)
            except OSError:
                pass
            else:
                try:
                    os.ftruncate(f.fd, 0)
                except OSError:
                    os.close(f.fd)
                    (data / spare).unlink(missing_ok=True)
                    return
                self._spare.append((f.fd, spare))
                return
        os.close(f.fd)
        (data / str(f.id)).unlink(missing_ok=True)

    def _take_spare(self, name: Path) -> int | None:
        """An empty spare data file renamed to `name`, open; None if there is none."""
        while self._spare:
            fd, spare = self._spare.pop()
            try:
                os.rename(self.dir / "data" / spare, name)
                return fd
            except OSError:
                os.close(fd)
        return None

    def _drop_spares(self) -> None:
        for fd, _name in self._spare:
            os.close(fd)
        self._spare.clear()
        for spare in (self.dir / "data").glob("spare-*"):
            spare.unlink(missing_ok=True)

    # ---- applying ops on the server ------------------------------------------------------

    async def _apply(self, op: Op) -> None:
        a = op.args
        path = op.paths[-1]
        rp = self.rpath(path)
        if op.kind == "mkdir":
            try:
                await self.remote.mkdir(rp, a["mode"])
            except OSError as e:
                if e.errno != errno.EEXIST or not (await self.remote.lstat(rp)).is_dir:
                    raise
        elif op.kind in ("create", "data"):
            await self._upload(op)
        elif op.kind == "setattr":
            ch = p.Attrs(mode=a.get("mode"), atime=a.get("atime"), mtime=a.get("mtime"))
            if "uid" in a or "gid" in a:
                cur = await self.remote.lstat(rp)
                ch.uid, ch.gid = a.get("uid", cur.uid), a.get("gid", cur.gid)
            if ch != p.Attrs():
                after = await self.remote.setstat(rp, ch, follow=a.get("follow", True))
                f = self.files.get(a["base_of"]) if "base_of" in a else None
                if f is not None and after is not None and not f.new:
                    f.base = (after.size, after.mtime)  # our own change is no conflict
        elif op.kind == "rename":
            src = self.rpath(op.paths[0])
            try:
                await self.remote.rename(src, rp, replace=not a.get("noreplace"))
            except OSError as e:
                # Replayed after a crash: already moved.
                if e.errno != errno.ENOENT or await self._missing(src) is False:
                    raise
                await self.remote.lstat(rp)
        elif op.kind == "unlink":
            try:
                await self.remote.remove(rp)
            except OSError as e:
                if e.errno != errno.ENOENT:
                    raise
        elif op.kind == "rmdir":
            try:
                await self.remote.rmdir(rp)
            except OSError as e:
                if e.errno != errno.ENOENT:
                    raise
        elif op.kind == "symlink":
            try:
                await self.remote.symlink(_dec(a["target"]), rp)
            except OSError as e:
                if e.errno != errno.EEXIST or await self.remote.readlink(rp) != _dec(a["target"]):
                    raise
        elif op.kind == "link":
            try:
                await self.remote.hardlink(self.rpath(op.paths[0]), rp)
            except OSError as e:
                if e.errno != errno.EEXIST:
                    raise
        else:
            raise OSError(errno.EINVAL, f"unknown write-back op {op.kind}")

    async def _missing(self, rp: bytes) -> bool:
        try:
            await self.remote.lstat(rp)
        except OSError as e:
            return e.errno == errno.ENOENT
        return False

    async def _upload(self, op: Op) -> None:
        """Send a file's dirty ranges; on success they are no longer dirty."""
        f = self.files.get(op.args["file"])
        if f is None:
            return
        path = op.paths[-1]
        taken, f.ranges = f.ranges, Ranges()
        f.inflight = taken  # still pending as far as the journal is concerned
        size, mtime = f.size, op.args.get("mtime", f.mtime)
        try:
            create = op.kind == "create" or f.new
            if not create:
                conflict = await self._conflict(f, path)
                if conflict is not None:
                    path, create = conflict, True
                    taken = Ranges([(0, size)])
            sent, attrs = await self._send(f, self.rpath(path), taken, size, mtime,
                                           create=create, mode=op.args.get("mode"))
        except BaseException:
            taken.update(f.ranges)
            f.ranges = taken
            f.inflight = Ranges()
            raise
        f.inflight = Ranges()
        self._dirty_bytes -= taken.total()
        self.uploaded_bytes += sent
        if self.owner is None and create:
            self.owner = (attrs.uid, attrs.gid)  # who our files belong to on the server
        if path == op.paths[-1]:
            f.base = (attrs.size, attrs.mtime)
            f.new = False

    async def _send(self, f: DirtyFile, rp: bytes, ranges: Ranges, size: int, mtime: int, *,
                    create: bool, mode: int | None) -> tuple[int, p.Attrs]:
        flags = p.FXF_WRITE | (p.FXF_CREAT | p.FXF_TRUNC if create else 0)
        rf = self.remote.open(rp, flags)
        await rf.open(0o600 if mode is None else mode)
        sent = 0
        try:
            statuses: list = []
            first_error: BaseException | None = None
            io = self.remote.io_sizes[1]
            for start, end in ranges:
                for off in range(start, end, CHUNK):
                    data = memoryview(os.pread(f.fd, min(CHUNK, end - off), off))
                    for sub in range(0, len(data), io):
                        piece = data[sub:sub + io]  # a view: the packet is its one copy
                        statuses.append(await rf.submit_write(off + sub, piece))
                        sent += len(piece)
                        while len(statuses) > WRITES_AHEAD:
                            first_error = await _settle(statuses.pop(0), first_error)
            ch = p.Attrs(size=size, atime=mtime, mtime=mtime)
            if create and mode is not None:
                ch.mode = mode & 0o7777
            # The last writes, the attributes and the close travel together.
            finishing = await rf.submit_finish(ch)
            while statuses:
                first_error = await _settle(statuses.pop(0), first_error)
            try:
                attrs = await finishing()
            except OSError as e:
                first_error = first_error or e
            if first_error is not None:
                raise first_error
        except BaseException:
            await rf.close()  # no-op if finish already closed it
            raise
        return sent, attrs

    async def _conflict(self, f: DirtyFile, path: bytes) -> bytes | None:
        """If someone else changed the server file since our changes' base version:
        keep theirs, and return where ours goes instead (or raise if ours is partial)."""
        try:
            now = await self.remote.lstat(self.rpath(path))
        except OSError as e:
            if e.errno == errno.ENOENT:
                raise OSError(errno.ENOENT, "the file was deleted on the server") from None
            raise
        if f.base is None or (now.size, now.mtime) == tuple(f.base):
            return None
        if not f.fully_dirty():
            raise OSError(errno.EBUSY, "the file changed on the server while we had changes "
                          "to parts of it")
        alt = path + b".sftpfs-conflict-" + time.strftime("%Y%m%d-%H%M%S").encode()
        log.warning("%r changed on the server while we had changes to it: keeping the "
                    "server's version, ours is saved next to it as %r", path, alt)
        self.failures.append({"path": os.fsdecode(path), "op": "data",
                              "error": "changed on the server", "kept_as": os.fsdecode(alt),
                              "recovery_path": None})
        self.meta.invalidate_dir(parent_of(path))
        return alt

    def _fail_safely(self, op: Op, e: OSError) -> None:
        try:
            self._fail(op, e)
        except Exception:  # noqa: BLE001 - the uploader must outlive its own bugs
            log.exception("handling the failure of %s %r failed", op.kind, op.paths)
            if op.state != "done":
                self._untrack(op)

    def _fail(self, op: Op, e: OSError) -> None:
        """The server refused: keep the data, tell the user, drop dependent ops."""
        self.journal.append({"fail": op.seq})
        self._untrack(op)
        path = op.paths[-1]
        f = self.files.get(op.args.get("file", -1))
        saved = None
        if f is not None:
            saved = self._save_recovery(f, path)
            f.error = e  # reported by the next flush/fsync of the file, once
        else:
            self.errors[path] = e
        log.error("could not %s %r on the server: %s%s", op.kind, path, e.strerror or e,
                  f"; the data is kept in {saved}" if saved else "")
        self.failures.append({"path": os.fsdecode(path), "op": op.kind,
                              "error": e.strerror or str(e),
                              "recovery_path": str(saved) if saved else None})
        # Later ops on this path (or below a failed directory) cannot succeed either.
        for later in self.ops:
            if later.seq > op.seq and later.state == "pending" and any(
                    is_below(q, path) for q in later.paths):
                self.journal.append({"fail": later.seq})
                self._untrack(later)
                lf = self.files.get(later.args.get("file", -1))
                if lf is not None:
                    if lf.queued is later:
                        lf.queued = None
                    if lf is not f:
                        self._save_recovery(lf, later.paths[-1])
                        lf.error = e
                    lf.ranges = Ranges()
        if f is not None:
            self._dirty_bytes -= f.ranges.total()
            f.ranges = Ranges()  # kept in the recovery area, not retried
        for q in op.paths:
            self.meta.invalidate(q)
            self.meta.invalidate_dir(parent_of(q))

    def _save_recovery(self, f: DirtyFile, path: bytes) -> Path:
        name = os.fsdecode(path).replace("/", "_")[-120:]
        dest = self.dir / "recovery" / f"{time.strftime('%Y%m%d-%H%M%S')}-{f.id}-{name}"
        with open(dest, "wb") as out:
            for start, end in (Ranges([(0, f.size)]) if f.fully_dirty() else f.ranges):
                for off in range(start, end, CHUNK):
                    out.seek(off)
                    out.write(os.pread(f.fd, min(CHUNK, end - off), off))
            out.truncate(f.size)
        if not f.fully_dirty():
            (dest.with_name(dest.name + ".ranges")).write_text(
                "".join(f"{s} {e}\n" for s, e in f.ranges))
        return dest

    # ---- restart: replay the journal --------------------------------------------------------

    def _recover(self) -> None:
        recs = self.journal.read()
        if not recs:
            return
        done = {r["done"] for r in recs if "done" in r} | {r["fail"] for r in recs if "fail" in r}
        gone = {r["gone"] for r in recs if "gone" in r}
        for r in recs:
            if "f" in r and r["f"] not in gone:
                fid = r["f"]
                data = self.dir / "data" / str(fid)
                if not data.exists():
                    continue
                fd = os.open(data, os.O_RDWR)
                f = DirtyFile(fid, _dec(r["path"]), r["new"], tuple(r["base"]) if r["base"] else None,
                              r["size"], fd, int(os.fstat(fd).st_mtime))
                self.files[fid] = f
                self._next_file = max(self._next_file, fid + 1)
            elif "w" in r and r["w"] in self.files:
                f = self.files[r["w"]]
                f.ranges.add(r["o"], r["o"] + r["n"])
                f.size = max(f.size, r["o"] + r["n"])
            elif "t" in r and r["t"] in self.files:
                f = self.files[r["t"]]
                if r["s"] > f.size:
                    f.ranges.add(f.size, r["s"])
                f.ranges.clip(r["s"])
                f.size = r["s"]
            elif "amend" in r:
                for op in self.ops:
                    if op.seq == r["amend"]:
                        op.args.update(r["args"])
            elif "op" in r:
                self._seq = max(self._seq, r["seq"])
                paths = tuple(_dec(x) for x in r["paths"])
                if r["op"] == "rename":
                    for f in self.files.values():
                        if f.path is not None and is_below(f.path, paths[0]):
                            f.path = paths[1] + f.path[len(paths[0]):]
                        elif f.path == paths[1]:
                            f.path = None
                elif r["op"] == "unlink":
                    for f in self.files.values():
                        if f.path == paths[0]:
                            f.path = None
                if r["seq"] not in done:
                    self.ops.append(Op(r["seq"], r["op"], paths, r["args"], state="pending"))
        live = {op.args.get("file") for op in self.ops}
        for f in list(self.files.values()):
            if f.id not in live:
                # Its data ops all finished; only the `gone` record was missing.
                os.close(f.fd)
                (self.dir / "data" / str(f.id)).unlink(missing_ok=True)
                del self.files[f.id]
                continue
            if f.path is not None:
                self.by_path[f.path] = f
            self._dirty_bytes += f.ranges.total()
        recovered, self.ops = self.ops, []
        for op in recovered:
            self._track(op)
            f = self.files.get(op.args.get("file", -1))
            if f is not None and op.kind in ("create", "data"):
                f.queued = op
        self._compact()
        if self.ops:
            log.warning("resuming %d changes not yet on the server (%d files, %d bytes)",
                        len(self.ops), len(self.files), self._dirty_bytes)

    def _compact(self) -> None:
        """Rewrite the journal with exactly what is still needed."""
        keep: list[dict] = []
        for f in self.files.values():
            keep.append({"f": f.id, "path": _enc(f.path), "new": f.new,
                         "base": list(f.base) if f.base else None, "size": 0})
            pending = Ranges(list(f.ranges))
            pending.update(f.inflight)
            keep.extend({"w": f.id, "o": s, "n": e - s} for s, e in pending)
            keep.append({"t": f.id, "s": f.size})
        keep.extend(op.record() for op in self.ops if op.state != "done")
        self.journal.rewrite(keep)

    def overlay(self, path: bytes, server: p.Attrs | None, upto: int | None = None) -> p.Attrs | None:
        """What `path` looks like with our pending changes applied on top of the
        server's attributes (None: the server has no such path).

        Needed when a pinned path has no cached attributes, e.g. after a restart.
        """
        a = server
        for op in self.ops:
            if upto is not None and op.seq >= upto:
                break
            if op.state == "done" or path not in op.paths:
                continue
            args = op.args
            if op.kind == "rename" and path == op.paths[1]:
                # Moved here: what the source looked like then (if we made it).
                a = self.overlay(op.paths[0], None, upto=op.seq)
                continue
            if op.kind == "mkdir":
                a = p.Attrs(size=4096, mode=stat.S_IFDIR | args["mode"] & 0o7777, mtime=int(time.time()))
            elif op.kind == "create":
                a = p.Attrs(size=0, mode=stat.S_IFREG | args["mode"] & 0o7777, mtime=int(time.time()))
            elif op.kind == "symlink":
                a = p.Attrs(size=len(_dec(args["target"])), mode=stat.S_IFLNK | 0o777,
                            mtime=int(time.time()))
            elif op.kind in ("unlink", "rmdir") or (op.kind == "rename" and path == op.paths[0]):
                a = None
            elif a is not None and op.kind == "setattr":
                a = p.Attrs(size=a.size, uid=args.get("uid", a.uid), gid=args.get("gid", a.gid),
                            mode=(a.mode or 0) & ~0o7777 | args["mode"] if "mode" in args else a.mode,
                            atime=args.get("atime", a.atime), mtime=args.get("mtime", a.mtime))
        f = self.by_path.get(path)
        if a is not None and f is not None:
            a = p.Attrs(size=f.size, uid=a.uid, gid=a.gid, mode=a.mode, atime=a.atime, mtime=f.mtime)
        return a

    def close(self) -> None:
        self.journal.close()
        for f in self.files.values():
            os.close(f.fd)
        try:
            self._drop_spares()
        except OSError:  # the cache directory is gone: nothing to tidy
            pass
