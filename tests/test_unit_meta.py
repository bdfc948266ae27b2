"""Metadata cache: freshness, negative entries, and our own changes."""

import time

from sftpfs.remote.protocol import Attrs
from sftpfs.vfs.meta import MetaCache

F = Attrs(size=1, mode=0o100644, mtime=1)
D = Attrs(size=4096, mode=0o040755, mtime=1)


class Clock:
    t = 0.0

    def __call__(self):
        return self.t


def cache(ttl=10):
    clock = Clock()
    return MetaCache(ttl, clock), clock


def test_listing_answers_lookups_and_misses():
    m, _ = cache()
    m.put_listing(b"d", [(b"a", F), (b"sub", D)])
    assert m.attrs(b"d/a") == F
    assert m.absent(b"d/nope")
    assert not m.absent(b"d/a")
    assert not m.absent(b"other/x")  # nothing known about "other"
    assert [n for n, _ in m.listing(b"d")] == [b"a", b"sub"]


def test_entries_expire():
    m, clock = cache(ttl=5)
    m.put_listing(b"", [(b"a", F)])
    clock.t = 6
    assert m.attrs(b"a") is None
    assert not m.absent(b"zzz")
    assert m.listing(b"") is None


def test_own_changes_update_listing():
    m, _ = cache()
    m.put_listing(b"", [(b"a", F), (b"d", D)])
    m.put_listing(b"d", [(b"x", F)])
    m.added(b"b", F)
    assert not m.absent(b"b")
    m.removed(b"a")
    assert m.absent(b"a") and m.attrs(b"a") is None
    m.renamed(b"d", b"e")
    assert m.absent(b"d") and m.attrs(b"d/x") is None
    assert m.attrs(b"e/x") == F
    assert [n for n, _ in m.listing(b"e")] == [b"x"]


def test_rename_over_existing_drops_target_subtree():
    m, _ = cache()
    m.put_listing(b"", [(b"a", F), (b"b", D)])
    m.put_listing(b"b", [(b"old", F)])
    m.renamed(b"a", b"b")
    assert m.attrs(b"b") == F
    assert m.attrs(b"b/old") is None


def test_relisting_drops_vanished_subtrees():
    m, _ = cache()
    m.put_listing(b"", [(b"d", D)])
    m.put_listing(b"d", [(b"x", F)])
    m.put_listing(b"", [])
    assert m.attrs(b"d/x") is None and m.listing(b"d") is None


def test_update_keeps_age():
    m, clock = cache(ttl=5)
    m.put_attrs(b"a", F)
    clock.t = 4
    assert m.update(b"a", size=9).size == 9
    clock.t = 6
    assert m.attrs(b"a") is None


def test_a_name_found_later_joins_the_listing():
    m, clock = cache(ttl=5)
    m.put_listing(b"", [(b"a", F)])
    clock.t = 10  # listing expired; a lookup finds a new name
    m.put_attrs(b"new", F)
    assert [n for n, _ in m.listing(b"", max_age=100)] == [b"a", b"new"]


def test_pinned_names_survive_server_listings():
    m, _ = cache()
    m.added(b"new", F)
    m.pin(b"new")
    m.put_listing(b"", [(b"old", F)])  # the server does not have it yet
    assert [n for n, _ in m.listing(b"")] == [b"new", b"old"]
    m.pin_absent(b"old")
    m.put_listing(b"", [(b"old", F)])
    assert [n for n, _ in m.listing(b"")] == [b"new"]
    assert m.absent(b"old")


def test_single_misses_are_remembered_until_created():
    m, clock = cache(ttl=5)
    m.put_absent(b"d/x")  # no listing of d: remembered on its own
    assert m.absent(b"d/x")
    m.added(b"d/x", F)
    assert not m.absent(b"d/x")
    m.put_absent(b"d/y")
    clock.t = 6
    assert not m.absent(b"d/y")


def test_the_root_is_no_entry_of_its_own_listing():
    """The root's own attributes (a stat of the mount point) never show up as a
    nameless entry of the root listing: the kernel fails the whole listing with EIO."""
    m = MetaCache(10)
    m.put_listing(b"", [(b"a", Attrs(size=1, mode=0o100644))])
    m.put_local(b"", Attrs(size=4096, mode=0o040755))
    m.pin(b"")
    m.put_absent(b"")
    assert [n for n, _a in m.listing(b"")] == [b"a"]


def test_answers_about_a_tree_moved_away_meanwhile_are_dropped():
    """A listing or lstat asked before its directory (or one above) was renamed or
    removed describes a tree that is no longer there: it must not be stored."""
    m, _ = cache()
    m.put_listing(b"", [(b"d1", D)])
    m.put_listing(b"d1", [(b"sub", D)])
    since = m.mark()  # a listing of d1/sub and an lstat of d1/sub/f go out
    m.renamed(b"d1", b"d2")
    m.put_listing(b"d1/sub", [(b"f", F)], since)
    m.put_attrs_if_unchanged(b"d1/sub/f", F, since)
    assert not m.listed(b"d1/sub") and m.attrs(b"d1/sub/f") is None
    since = m.mark()
    m.put_listing(b"d2/sub", [(b"f", F)], since)  # asked after the rename: kept
    assert [n for n, _ in m.listing(b"d2/sub")] == [b"f"]
    since = m.mark()
    m.renamed(b"other", b"d2")  # replaces d2: what was asked about d2 before is void
    m.put_listing(b"d2/sub", [(b"g", F)], since)
    assert not m.listed(b"d2/sub")


def test_a_long_run_of_removals_does_not_rebuild_the_change_counter_each_time():
    """Each removal makes two keys (its change and its "gone" mark): pruning at a
    fixed size left the counter above it, and every later change rebuilt it."""
    m, _ = cache()
    m.put_listing(b"", [])
    for i in range(100_200):
        m.removed(b"f%d" % i)
    t0 = time.perf_counter()
    for i in range(1_000):
        m.removed(b"g%d" % i)
    assert time.perf_counter() - t0 < 2  # ~0.01 s; rebuilding each time: ~15 s
    assert len(m._changed) <= m._prune_at
