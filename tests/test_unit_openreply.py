"""The ELF reading behind openreply's interposer (the mount tests exercise the rest)."""

import platform

import pyfuse3
import pytest

from sftpfs import openreply


@pytest.mark.skipif(platform.machine() not in openreply.SLOT_TYPES, reason="platform")
def test_finds_the_slot_and_load_symbol_in_the_pyfuse3_extension():
    with open(pyfuse3.__file__, "rb") as f:
        elf = f.read()
    slot, _relro, init, init_off = openreply._parse(elf, "fuse_reply_open",
                                                    openreply.SLOT_TYPES[platform.machine()])
    assert init.startswith("PyInit_") and init_off > 0
    assert 0 < slot < openreply._mapped_size(elf)
    with pytest.raises(ValueError):
        openreply._parse(elf, "no_such_symbol", openreply.SLOT_TYPES[platform.machine()])


def test_refuses_what_is_not_an_elf64_file():
    with pytest.raises(ValueError):
        openreply._parse(b"#!/bin/sh\n" + bytes(100), "fuse_reply_open", {7})


def test_flags_are_only_requested_once_installed(monkeypatch):
    monkeypatch.setattr(openreply, "active", False)
    monkeypatch.setattr(openreply, "_pending", 0)
    openreply.next_opendir(keep=True)
    openreply.next_open_readonly()
    assert openreply._pending == 0
    monkeypatch.setattr(openreply, "active", True)
    openreply.next_opendir(keep=True)
    assert openreply._pending == openreply.CACHE_READDIR | openreply.KEEP_CACHE
    openreply.next_open_readonly()
    assert openreply._pending == openreply.NOFLUSH
