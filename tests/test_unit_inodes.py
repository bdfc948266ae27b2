"""Inode table: lookup counts, forget, rename of subtrees."""

import pyfuse3
import pytest

from sftpfs.fs import ROOT, InodeTable
from sftpfs.remote.protocol import Attrs

A = Attrs(size=0, mode=0o100644)
D = Attrs(size=0, mode=0o040755)


def test_lookup_counts_and_forget():
    t = InodeTable()
    ino = t.remember(b"a", A)
    assert t.remember(b"a", A) == ino
    t.forget(ino, 1)
    assert t.path(ino) == b"a"
    t.forget(ino, 1)
    with pytest.raises(pyfuse3.FUSEError):
        t.path(ino)
    assert len(t) == 1  # only the root remains
    assert t.remember(b"a", A) != ino  # numbers are not reused


def test_root_is_never_forgotten():
    t = InodeTable()
    t.forget(ROOT, 10)
    assert t.path(ROOT) == b""


def test_rename_moves_subtree_and_replaces_target():
    t = InodeTable()
    d = t.remember(b"d", D)
    x = t.remember(b"d/x", A)
    old_target = t.remember(b"e", A)
    t.renamed(b"d", b"e")
    assert t.path(d) == b"e" and t.path(x) == b"e/x"
    with pytest.raises(pyfuse3.FUSEError):
        t.path(old_target)
    assert t.last_attrs(old_target) == A  # still answerable for open files


def test_unlinked_inode_lives_until_forget():
    t = InodeTable()
    ino = t.remember(b"f", A)
    t.removed(b"f")
    assert t.last_attrs(ino) == A
    new = t.remember(b"f", A)
    assert new != ino
    t.forget(ino, 1)
    assert t.path(new) == b"f"
