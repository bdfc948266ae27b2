"""Attribute and directory-listing cache, with negative entries.

An SFTP listing carries every entry's attributes, so one READDIR answers
the lstat of every name in the directory, and also the lookup of every name
that is *not* there: while a directory's listing is known, a missing name is
known to be missing without asking the server (rsync's lstat of files it is
about to create, a file manager's probes for .hidden).

Every entry has an age (wall clock, since listings outlive the process in
metastore). Callers choose how old an answer may be: `ttl` for a fresh one,
longer for a stale one served while a revalidation runs.

Paths are bytes relative to the mount root (b"" is the root).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import replace

from ..remote.protocol import Attrs


def parent_of(path: bytes) -> bytes:
    return path.rpartition(b"/")[0]


def name_of(path: bytes) -> bytes:
    return path.rpartition(b"/")[2]


def join(parent: bytes, name: bytes) -> bytes:
    return parent + b"/" + name if parent else name


def is_below(path: bytes, top: bytes) -> bool:
    """True if `path` is `top` or inside it."""
    return not top or path == top or path.startswith(top + b"/")


def same_version(a: Attrs, b: Attrs) -> bool:
    """What a user would notice changing: type, permissions, size, mtime, owner."""
    return (a.mode, a.size, a.mtime, a.uid, a.gid) == (b.mode, b.size, b.mtime, b.uid, b.gid)


class MetaCache:
    """Attributes and complete directory listings, each with its age."""

    def __init__(self, ttl: float, clock: Callable[[], float] = time.time) -> None:
        self.ttl = ttl
        self.clock = clock
        self._attrs: dict[bytes, tuple[Attrs, float]] = {}
        self._dirs: dict[bytes, tuple[set[bytes], float]] = {}
        self._missing: dict[bytes, float] = {}  # single ENOENT answers, by time
        # Directories whose listing changed since metastore last saved them.
        self.dirty: set[bytes] = set()
        # Bumped by every change of a path's attributes, so an answer that was
        # requested before a change can be told apart and dropped.
        self._changed: dict[bytes, int] = {}
        self._prune_at = 200_000
        self._tick = 0
        # Paths with changes not yet on the server (write-back): what the
        # server says about them is not the truth yet, so it is not stored.
        self._pinned: set[bytes] = set()  # exists locally, with our attributes
        self._pinned_absent: set[bytes] = set()  # removed locally

    # ---- pins (write-back) ----------------------------------------------------------

    def pin(self, path: bytes) -> None:
        """`path` exists with the attributes we hold, whatever the server says."""
        self._pinned_absent.discard(path)
        self._pinned.add(path)

    def pin_absent(self, path: bytes) -> None:
        self._pinned.discard(path)
        self._pinned_absent.add(path)

    def unpin(self, path: bytes) -> None:
        self._pinned.discard(path)
        self._pinned_absent.discard(path)

    def pins_below(self, path: bytes) -> list[bytes]:
        return [q for pins in (self._pinned, self._pinned_absent) for q in pins
                if is_below(q, path)]

    def pinned(self, path: bytes) -> bool:
        return path in self._pinned or path in self._pinned_absent

    def _move_pins(self, old: bytes, new: bytes) -> None:
        # Pins are few (only paths with pending changes): plain scans are fine.
        for pins in (self._pinned, self._pinned_absent):
            pins.difference_update([q for q in pins if is_below(q, new)])
        for pins in (self._pinned, self._pinned_absent):
            moved = [q for q in pins if is_below(q, old)]
            pins.difference_update(moved)
            pins.update(new + q[len(old):] for q in moved)

    # ---- change counter ----------------------------------------------------------

    def _parent_listing(self, path: bytes) -> tuple[set[bytes], float] | None:
        """The listing `path` is a name in; the root is in none (its parent_of is itself)."""
        return self._dirs.get(parent_of(path)) if path else None

    def mark(self) -> int:
        """A point in time for `put_attrs_if_unchanged` and `put_listing(since=)`."""
        return self._tick

    def _bump(self, path: bytes) -> None:
        self._tick += 1
        self._changed[path] = self._tick
        parent = parent_of(path)
        self._changed[b"\0entries\0" + parent] = self._tick  # its listing changed too
        if parent in self._dirs:
            self.dirty.add(parent)
        if len(self._changed) > self._prune_at:
            # Requests in flight span a few thousand changes at most. A change makes up
            # to three keys: prune again only once the rest has doubled, or a run of
            # changes would rebuild the dict at every one.
            horizon = self._tick - 100_000
            self._changed = {k: v for k, v in self._changed.items() if v > horizon}
            self._prune_at = max(200_000, 2 * len(self._changed))

    def changed_since(self, path: bytes, since: int) -> bool:
        return self._changed.get(path, 0) > since

    def _moved_since(self, path: bytes, since: int) -> bool:
        """`path` or a directory above it was removed or renamed after `since`: an
        answer about it describes a tree that is no longer there."""
        while True:
            if self._changed.get(b"\0gone\0" + path, 0) > since:
                return True
            if not path:
                return False
            path = parent_of(path)

    def _entries_changed_since(self, path: bytes, since: int) -> bool:
        return self._changed.get(b"\0entries\0" + path, 0) > since

    def _young(self, t: float, max_age: float | None) -> bool:
        return self.clock() - t < (self.ttl if max_age is None else max_age)

    # ---- queries -------------------------------------------------------------------

    def attrs(self, path: bytes, max_age: float | None = None) -> Attrs | None:
        """Attributes no older than `max_age` (default: the TTL)."""
        hit = self._attrs.get(path)
        if hit is not None and (self._young(hit[1], max_age) or path in self._pinned):
            return hit[0]
        return None

    def absent(self, path: bytes, max_age: float | None = None) -> bool:
        """The parent's listing, no older than `max_age`, proves `path` does not exist."""
        if not path or path in self._pinned:
            return False
        if path in self._pinned_absent:
            return True
        miss = self._missing.get(path)
        if miss is not None and self._young(miss, max_age):
            return True
        hit = self._parent_listing(path)
        return hit is not None and self._young(hit[1], max_age) and name_of(path) not in hit[0]

    def listed(self, path: bytes, max_age: float | None = None) -> bool:
        hit = self._dirs.get(path)
        return hit is not None and self._young(hit[1], max_age)

    def listing(self, path: bytes, max_age: float | None = None) -> list[tuple[bytes, Attrs]] | None:
        """A listing no older than `max_age`, with attributes for every entry, else None."""
        hit = self._dirs.get(path)
        if hit is None or not self._young(hit[1], max_age):
            return None
        out = []
        for name in sorted(hit[0]):
            a = self._attrs.get(join(path, name))
            if a is None:
                return None
            out.append((name, a[0]))
        return out

    def overlay(self, path: bytes, entries: list[tuple[bytes, Attrs]]) -> list[tuple[bytes, Attrs]]:
        """Server entries of `path` corrected by what we know better (pending changes)."""
        out = {}
        for name, a in entries:
            p = join(path, name)
            if p in self._pinned_absent:
                continue
            mine = self._attrs.get(p) if p in self._pinned else None
            out[name] = mine[0] if mine else a
        for p in self._pinned:
            if p and parent_of(p) == path and p in self._attrs:  # the root is no one's child
                out[name_of(p)] = self._attrs[p][0]
        return sorted(out.items())

    def listing_time(self, path: bytes) -> float | None:
        hit = self._dirs.get(path)
        return hit[1] if hit is not None else None

    # ---- what the server told us -----------------------------------------------------

    def put_attrs(self, path: bytes, attrs: Attrs) -> None:
        """The server says `path` exists with these attributes."""
        if path in self._pinned or path in self._pinned_absent:
            return
        self._missing.pop(path, None)
        self._attrs[path] = (attrs, self.clock())
        hit = self._parent_listing(path)
        if hit is not None:
            hit[0].add(name_of(path))  # found after the listing was made
        self._bump(path)

    def put_attrs_if_unchanged(self, path: bytes, attrs: Attrs, since: int) -> None:
        """Store an answer requested at `since`, unless the path changed after that."""
        if not self.changed_since(path, since) and not self._moved_since(path, since):
            self.put_attrs(path, attrs)

    def put_listing(self, path: bytes, entries: Iterable[tuple[bytes, Attrs]],
                    since: int | None = None, fetched: float | None = None) -> list[bytes]:
        """Store a listing requested at `since` (None: just now); returns changed names.

        The names returned are those added, removed or changed (see
        `same_version`) compared with the listing held before, so the kernel's
        view of them can be invalidated. If entries changed locally while the
        listing was in flight, it is no longer complete: the attributes of
        untouched names are kept, the listing is not. `fetched` backdates an
        old listing (loaded from disk).
        """
        if since is not None and self._moved_since(path, since):
            return []
        at = self.clock() if fetched is None else fetched
        old = self._dirs.get(path)
        names = set()
        changed = []
        for name, a in entries:
            p = join(path, name)
            if p in self._pinned_absent:
                continue
            self._missing.pop(p, None)
            names.add(name)
            if p in self._pinned or (since is not None and self.changed_since(p, since)):
                continue
            prev = self._attrs.get(p)
            if old is not None and (prev is None or not same_version(prev[0], a)):
                changed.append(name)
            self._attrs[p] = (a, at)
        if since is not None and self._entries_changed_since(path, since):
            return changed
        # Names with pending changes exist whatever the server says (pins are few).
        names |= {name_of(q) for q in self._pinned if q and parent_of(q) == path}
        if old is not None:
            for gone in old[0] - names:
                changed.append(gone)
                self._drop_tree(join(path, gone))
        self._dirs[path] = (names, at)
        if fetched is None:
            self.dirty.add(path)
        return changed

    def put_absent(self, path: bytes) -> None:
        """The server said ENOENT: forget what we had, and note it in the parent."""
        if path in self._pinned:
            return
        self._drop_tree(path)
        hit = self._parent_listing(path)
        if hit is not None:
            hit[0].discard(name_of(path))
        elif path:
            if len(self._missing) > 100_000:
                self._missing.clear()
            self._missing[path] = self.clock()

    # ---- our own changes ---------------------------------------------------------------

    def added(self, path: bytes, attrs: Attrs) -> None:
        """A new object made by us: a new directory is known to be empty."""
        self.put_local(path, attrs)
        if attrs.is_dir:
            self._dirs[path] = (set(), self.clock())
            self.dirty.add(path)

    def put_local(self, path: bytes, attrs: Attrs) -> None:
        """Our own knowledge of an existing path's attributes (pins do not apply)."""
        self._missing.pop(path, None)
        self._attrs[path] = (attrs, self.clock())
        hit = self._parent_listing(path)
        if hit is not None:
            hit[0].add(name_of(path))
        self._bump(path)

    def removed(self, path: bytes) -> None:
        self._pinned.discard(path)
        self.put_absent(path)

    def renamed(self, old: bytes, new: bytes) -> None:
        self._move_pins(old, new)
        self._drop_tree(new)
        if self._has_subtree(old):
            moved_attrs = {p: v for p, v in self._attrs.items() if is_below(p, old)}
            moved_dirs = {p: v for p, v in self._dirs.items() if is_below(p, old)}
        else:
            moved_attrs = {old: self._attrs[old]} if old in self._attrs else {}
            moved_dirs = {}
        self._drop_tree(old)
        self._missing.pop(new, None)
        for p, v in moved_attrs.items():
            self._attrs[new + p[len(old):]] = v
            self._bump(new + p[len(old):])
        for p, v in moved_dirs.items():
            self._dirs[new + p[len(old):]] = v
            self.dirty.add(new + p[len(old):])
        src_dir = self._dirs.get(parent_of(old))
        if src_dir is not None:
            src_dir[0].discard(name_of(old))
        dst_dir = self._dirs.get(parent_of(new))
        if dst_dir is not None:
            dst_dir[0].add(name_of(new))

    def update(self, path: bytes, **changes: int | None) -> Attrs | None:
        """Apply a local change to cached attributes (keeps their age)."""
        hit = self._attrs.get(path)
        if hit is None:
            return None
        a = replace(hit[0], **{k: v for k, v in changes.items() if v is not None})
        self._attrs[path] = (a, hit[1])
        self._bump(path)
        return a

    def invalidate(self, path: bytes) -> None:
        """Forget the attributes of `path` (not its listing membership)."""
        self._attrs.pop(path, None)
        self._bump(path)

    def invalidate_dir(self, path: bytes) -> None:
        """Forget the listing of `path`: the next readdir asks the server."""
        if self._dirs.pop(path, None) is not None:
            self.dirty.add(path)

    def forget_all(self) -> None:
        """Drop everything (cache=no remounts, tests)."""
        self._missing.clear()
        self._attrs.clear()
        self._dirs.clear()
        self.dirty.clear()

    def _has_subtree(self, top: bytes) -> bool:
        """Only a known directory has cached descendants: files need no scan.

        Descendants are cached only after their directory was (a path walk
        looks up every component), and dropping a directory drops them.
        """
        if top in self._dirs:
            return True
        hit = self._attrs.get(top)
        return hit is not None and hit[0].is_dir

    def _drop_tree(self, top: bytes) -> None:
        self._bump(top)
        self._changed[b"\0gone\0" + top] = self._tick
        if not self._has_subtree(top):
            self._attrs.pop(top, None)
            return
        for p in [p for p in self._attrs if is_below(p, top)]:
            del self._attrs[p]
        for p in [p for p in self._dirs if is_below(p, top)]:
            del self._dirs[p]
            self.dirty.add(p)  # metastore must forget it too
