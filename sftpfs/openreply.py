"""Open-reply flags pyfuse3 cannot set: a kernel cache for listings, no FLUSH for readers.

* FOPEN_CACHE_DIR (+ FOPEN_KEEP_CACHE) on OPENDIR. Without it every `ls` or
  `find` of a directory costs three synchronous FUSE round trips (OPENDIR,
  READDIRPLUS, and the empty READDIRPLUS that ends the listing), each a
  wake-up of this process: on a small VM a warm find took four times as long
  as on local disk. With it the kernel answers getdents from its page cache
  and only OPENDIR reaches us.
* FOPEN_NOFLUSH on read-only OPENs: close(2) of a file opened for reading
  then does not wait for a FLUSH round trip (there is nothing to flush).

pyfuse3 (up to 3.5) replies to OPENDIR with these bits clear and lets OPEN set
only direct_io, keep_cache and nonseekable. Its extension calls libfuse's
`fuse_reply_open` through its PLT, so we point the extension's GOT slot for
that symbol at a ctypes function that sets the bits the handler asked for
just before returning (nothing runs in between: pyfuse3 replies right after
the handler returns), then calls libfuse.

It is installed only when every check passes: a little-endian x86-64 or
AArch64 ELF extension, libfuse 3.11 or later (keep_cache is bit 2,
cache_readdir bit 6 and noflush bit 7 of the word after `flags` in every
FUSE 3 header since; later fields were appended after them), the
relocation found by name, and the slot holding libfuse's function or a stub
inside the extension. Otherwise sftpfs logs why and runs without. Delete this
module once pyfuse3 lets opendir and open return these flags.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import mmap
import platform
import struct
import sys

import pyfuse3

log = logging.getLogger(__name__)

KEEP_CACHE = 1 << 2  # fuse_file_info bits (fuse_common.h, FUSE 3.11+)
CACHE_READDIR = 1 << 6
NOFLUSH = 1 << 7
SLOT_TYPES = {"x86_64": {6, 7}, "aarch64": {1025, 1026}}  # GLOB_DAT, JUMP_SLOT
SHT_RELA, SHT_DYNSYM = 4, 11
PT_LOAD, PT_GNU_RELRO = 1, 0x6474E552

_ReplyOpen = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
# The real function is called holding the GIL, as pyfuse3 calls it: released, another
# thread (paramiko's, a disk writer) may keep it for a switch interval (5 ms) before
# this request's reply goes out.
_ReplyOpenHoldingGil = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)

active = False
_pending = 0
_real: _ReplyOpenHoldingGil | None = None
_hook: _ReplyOpen | None = None  # kept alive for as long as the process runs


def next_opendir(keep: bool) -> None:
    """Ask for kernel caching in the reply to the OPENDIR being answered now.

    `keep` keeps what the kernel cached at an earlier open (FOPEN_KEEP_CACHE);
    without it the kernel drops that and lists through us again.
    """
    global _pending
    if active:
        _pending = CACHE_READDIR | (KEEP_CACHE if keep else 0)


def next_open_readonly() -> None:
    """The OPEN being answered now is read-only: close(2) need not send FLUSH."""
    global _pending
    if active:
        _pending = NOFLUSH


def _reply_open(req: int, fi: int) -> int:
    # Called from C with a request to answer: whatever happens, answer it.
    global _pending
    bits, _pending = _pending, 0
    try:
        if bits and fi:
            word = ctypes.c_uint32.from_address(fi + 4)  # after `int flags`
            word.value |= bits
    except Exception:  # noqa: BLE001 - the flags are an optimisation, the reply is not
        log.exception("setting open-reply flags failed")
    return _real(req, fi)  # type: ignore[misc]  # set before the hook is installed


def install() -> bool:
    """Install the interposer once; False (and a log line saying why) if it cannot be."""
    if active:
        return True
    try:
        why = _install()
    except (OSError, ValueError, struct.error, AttributeError) as e:
        why = f"{type(e).__name__}: {e}"
    if why:
        log.info("open-reply flags not available (%s): no kernel directory cache", why)
        return False
    return True


def _install() -> str | None:
    global active, _real, _hook
    arch = platform.machine()
    if arch not in SLOT_TYPES or sys.byteorder != "little":
        return f"unsupported platform {arch}"
    so = pyfuse3.__file__
    if not so or not so.endswith(".so"):
        return f"pyfuse3 is not an ELF extension ({so})"
    try:  # the library pyfuse3 is linked with, loaded already (find_library runs ldconfig)
        libfuse = ctypes.CDLL("libfuse3.so.3")
    except OSError:
        libfuse = ctypes.CDLL(ctypes.util.find_library("fuse3") or "libfuse3.so.3")
    version = libfuse.fuse_version()
    if not 311 <= version < 400:
        return f"libfuse version {version}"
    with open(so, "rb") as f:  # mapped: the headers and tables are read, not its 4 MB
        elf = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    try:
        slot_off, relro, init_name, init_off = _parse(elf, "fuse_reply_open", SLOT_TYPES[arch])
        size = _mapped_size(elf)
    finally:
        elf.close()
    # The extension's load address, from a symbol it exports.
    init = ctypes.cast(getattr(ctypes.CDLL(so), init_name), ctypes.c_void_p).value
    if init is None:
        return "cannot locate the pyfuse3 extension in memory"
    base = init - init_off
    slot = base + slot_off
    real = ctypes.cast(libfuse.fuse_reply_open, ctypes.c_void_p).value
    current = ctypes.c_void_p.from_address(slot).value
    if current != real and not (base <= (current or 0) < base + size):
        return "unexpected GOT contents"
    _real = _ReplyOpenHoldingGil(real)
    _hook = _ReplyOpen(_reply_open)
    hook_addr = ctypes.cast(_hook, ctypes.c_void_p).value
    if relro and relro[0] <= slot_off < relro[1]:
        _write_protected(slot, hook_addr)
    else:
        ctypes.c_void_p.from_address(slot).value = hook_addr
    active = True
    return None


def _parse(elf: bytes | mmap.mmap, symbol: str, slot_types: set[int]) -> tuple[int, tuple[int, int] | None, str, int]:
    """(slot offset, RELRO range, exported PyInit_ name, its offset) from the section headers."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise ValueError("not a little-endian ELF64 file")
    phoff, shoff = struct.unpack_from("<QQ", elf, 0x20)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", elf, 0x36)
    relro = None
    for i in range(phnum):
        ptype, _flags, _off, vaddr, _pa, _fs, memsz = struct.unpack_from("<IIQQQQQ", elf, phoff + i * phentsize)
        if ptype == PT_GNU_RELRO:
            relro = (vaddr, vaddr + memsz)
    sections = [struct.unpack_from("<IIQQQQIIQQ", elf, shoff + i * shentsize) for i in range(shnum)]
    slot = None
    init: tuple[str, int] | None = None
    for _n, stype, _fl, _addr, off, size, link, _info, _al, entsize in sections:
        if stype == SHT_DYNSYM:
            strtab = sections[link]
            for j in range(size // entsize):
                st_name, _i, _o, shndx, value, _s = struct.unpack_from("<IBBHQQ", elf, off + j * entsize)
                name = _cstr(elf, strtab[4] + st_name)
                if name.startswith("PyInit_") and shndx:
                    init = (name, value)
        if stype == SHT_RELA:
            symtab = sections[link]
            strtab = sections[symtab[6]]
            for j in range(size // entsize):
                r_offset, r_info, _add = struct.unpack_from("<QQq", elf, off + j * entsize)
                if r_info & 0xFFFFFFFF not in slot_types:
                    continue
                st_name = struct.unpack_from("<I", elf, symtab[4] + (r_info >> 32) * symtab[9])[0]
                if _cstr(elf, strtab[4] + st_name) == symbol:
                    slot = r_offset
    if slot is None or init is None:
        raise ValueError(f"no relocation for {symbol}")
    return slot, relro, init[0], init[1]


def _cstr(elf: bytes | mmap.mmap, at: int) -> str:
    end = elf.find(b"\0", at)
    if end < 0:
        raise ValueError("unterminated string in the ELF file")
    return elf[at:end].decode("ascii", "replace")


def _mapped_size(elf: bytes | mmap.mmap) -> int:
    phoff = struct.unpack_from("<Q", elf, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    end = 0
    for i in range(phnum):
        ptype, _f, _o, vaddr, _p, _fs, memsz = struct.unpack_from("<IIQQQQQ", elf, phoff + i * phentsize)
        if ptype == PT_LOAD:
            end = max(end, vaddr + memsz)
    return end


def _write_protected(addr: int, value: int) -> None:
    """Write a pointer into a page the loader made read-only (full RELRO)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    page = addr & ~(mmap.PAGESIZE - 1)
    if libc.mprotect(page, mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_WRITE) != 0:
        raise OSError(ctypes.get_errno(), "mprotect")
    ctypes.c_void_p.from_address(addr).value = value
    libc.mprotect(page, mmap.PAGESIZE, mmap.PROT_READ)
