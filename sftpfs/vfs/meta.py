"""Attribute and directory-listing cache, with negative entries.

An SFTP listing carries every entry's attributes, so one READDIR answers
the lstat of every name in the directory, and also the lookup of every name
that is *not* there: while a directory's listing is fresh, a missing name is
known to be missing without asking the server (rsync's lstat of files it is
about to create, a file manager's probes for .hidden).

Paths are bytes relative to the mount root (b"" is the root). Timestamps come
from the injected clock so tests can move time.
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


class MetaCache:
    """Fresh-for-`ttl` attributes and complete directory listings."""

    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.clock = clock
        self._attrs: dict[bytes, tuple[Attrs, float]] = {}
        self._dirs: dict[bytes, tuple[set[bytes], float]] = {}
        # Bumped by every change of a path's attributes, so an answer that was
        # requested before a change can be told apart and dropped.
        self._changed: dict[bytes, int] = {}
        self._tick = 0

    def mark(self) -> int:
        """A point in time for `put_attrs_if_unchanged`."""
        return self._tick

    def _bump(self, path: bytes) -> None:
        self._tick += 1
        self._changed[path] = self._tick
        parent = parent_of(path)
        self._changed[b"\0entries\0" + parent] = self._tick  # its listing changed too
        if len(self._changed) > 200_000:
            # Requests in flight span a few thousand changes at most.
            horizon = self._tick - 100_000
            self._changed = {k: v for k, v in self._changed.items() if v > horizon}

    def changed_since(self, path: bytes, since: int) -> bool:
        return self._changed.get(path, 0) > since

    def _entries_changed_since(self, path: bytes, since: int) -> bool:
        return self._changed.get(b"\0entries\0" + path, 0) > since

    def _fresh(self, t: float) -> bool:
        return self.clock() - t < self.ttl

    # ---- queries ---------------------------------------------------------------

    def attrs(self, path: bytes) -> Attrs | None:
        hit = self._attrs.get(path)
        if hit is not None and self._fresh(hit[1]):
            return hit[0]
        return None

    def absent(self, path: bytes) -> bool:
        """The parent's fresh listing proves that `path` does not exist."""
        if not path:
            return False
        hit = self._dirs.get(parent_of(path))
        return hit is not None and self._fresh(hit[1]) and name_of(path) not in hit[0]

    def listing(self, path: bytes) -> list[tuple[bytes, Attrs]] | None:
        """A fresh listing with fresh attributes for every entry, else None."""
        hit = self._dirs.get(path)
        if hit is None or not self._fresh(hit[1]):
            return None
        out = []
        for name in sorted(hit[0]):
            a = self.attrs(join(path, name))
            if a is None:
                return None
            out.append((name, a))
        return out

    # ---- what the server told us -------------------------------------------------

    def put_attrs(self, path: bytes, attrs: Attrs) -> None:
        self._attrs[path] = (attrs, self.clock())
        self._bump(path)

    def put_attrs_if_unchanged(self, path: bytes, attrs: Attrs, since: int) -> None:
        """Store an answer requested at `since`, unless the path changed after that."""
        if not self.changed_since(path, since):
            self.put_attrs(path, attrs)

    def put_listing(self, path: bytes, entries: Iterable[tuple[bytes, Attrs]],
                    since: int | None = None) -> None:
        """Store a listing requested at `since` (None: just now).

        If entries changed locally while it was in flight, it is no longer
        complete: keep the attributes of untouched names, not the listing.
        """
        now = self.clock()
        names = set()
        for name, a in entries:
            names.add(name)
            p = join(path, name)
            if since is None or not self.changed_since(p, since):
                self._attrs[p] = (a, now)
        if since is not None and self._entries_changed_since(path, since):
            return
        # Entries that vanished take their cached subtree with them.
        old = self._dirs.get(path)
        if old is not None:
            for gone in old[0] - names:
                self._drop_tree(join(path, gone))
        self._dirs[path] = (names, now)

    def put_absent(self, path: bytes) -> None:
        """The server said ENOENT: forget what we had, and note it in the parent."""
        self._drop_tree(path)
        hit = self._dirs.get(parent_of(path))
        if hit is not None:
            hit[0].discard(name_of(path))

    # ---- our own changes -------------------------------------------------------------

    def added(self, path: bytes, attrs: Attrs) -> None:
        self._attrs[path] = (attrs, self.clock())
        self._bump(path)
        hit = self._dirs.get(parent_of(path))
        if hit is not None:
            hit[0].add(name_of(path))
        if attrs.is_dir:
            self._dirs[path] = (set(), self.clock())

    def removed(self, path: bytes) -> None:
        self.put_absent(path)

    def renamed(self, old: bytes, new: bytes) -> None:
        self._drop_tree(new)
        if self._has_subtree(old):
            moved_attrs = {p: v for p, v in self._attrs.items() if is_below(p, old)}
            moved_dirs = {p: v for p, v in self._dirs.items() if is_below(p, old)}
        else:
            moved_attrs = {old: self._attrs[old]} if old in self._attrs else {}
            moved_dirs = {}
        self._drop_tree(old)
        for p, v in moved_attrs.items():
            self._attrs[new + p[len(old):]] = v
            self._bump(new + p[len(old):])
        for p, v in moved_dirs.items():
            self._dirs[new + p[len(old):]] = v
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
        self._dirs.pop(path, None)

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
        if not self._has_subtree(top):
            self._attrs.pop(top, None)
            return
        for p in [p for p in self._attrs if is_below(p, top)]:
            del self._attrs[p]
        for p in [p for p in self._dirs if is_below(p, top)]:
            del self._dirs[p]
