"""SFTP version 3 wire format (draft-ietf-secsh-filexfer-02 plus OpenSSH's PROTOCOL).

Pure encoding and decoding, no I/O, so it can be unit-tested byte for byte.
"""

from __future__ import annotations

import stat
import struct
from dataclasses import dataclass

# Packet types.
FXP_INIT = 1
FXP_VERSION = 2
FXP_OPEN = 3
FXP_CLOSE = 4
FXP_READ = 5
FXP_WRITE = 6
FXP_LSTAT = 7
FXP_FSTAT = 8
FXP_SETSTAT = 9
FXP_FSETSTAT = 10
FXP_OPENDIR = 11
FXP_READDIR = 12
FXP_REMOVE = 13
FXP_MKDIR = 14
FXP_RMDIR = 15
FXP_REALPATH = 16
FXP_STAT = 17
FXP_RENAME = 18
FXP_READLINK = 19
FXP_SYMLINK = 20
FXP_STATUS = 101
FXP_HANDLE = 102
FXP_DATA = 103
FXP_NAME = 104
FXP_ATTRS = 105
FXP_EXTENDED = 200
FXP_EXTENDED_REPLY = 201

# Status codes.
FX_OK = 0
FX_EOF = 1
FX_NO_SUCH_FILE = 2
FX_PERMISSION_DENIED = 3
FX_FAILURE = 4
FX_BAD_MESSAGE = 5
FX_NO_CONNECTION = 6
FX_CONNECTION_LOST = 7
FX_OP_UNSUPPORTED = 8

# Open flags.
FXF_READ = 0x01
FXF_WRITE = 0x02
FXF_APPEND = 0x04
FXF_CREAT = 0x08
FXF_TRUNC = 0x10
FXF_EXCL = 0x20

# Attribute flags.
ATTR_SIZE = 0x01
ATTR_UIDGID = 0x02
ATTR_PERMISSIONS = 0x04
ATTR_ACMODTIME = 0x08
ATTR_EXTENDED = 0x80000000

_TYPE_ID = struct.Struct(">BI")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


@dataclass(slots=True)
class Attrs:
    """File attributes as SFTP v3 carries them; None means "not sent"."""

    size: int | None = None
    uid: int | None = None
    gid: int | None = None
    mode: int | None = None
    atime: int | None = None
    mtime: int | None = None

    @property
    def is_dir(self) -> bool:
        return self.mode is not None and stat.S_ISDIR(self.mode)

    @property
    def is_link(self) -> bool:
        return self.mode is not None and stat.S_ISLNK(self.mode)

    @property
    def is_reg(self) -> bool:
        return self.mode is not None and stat.S_ISREG(self.mode)

    def encode(self) -> bytes:
        flags = 0
        out = []
        if self.size is not None:
            flags |= ATTR_SIZE
            out.append(_U64.pack(self.size))
        if self.uid is not None or self.gid is not None:
            if self.uid is None or self.gid is None:
                raise ValueError("uid and gid travel together in SFTP v3")
            flags |= ATTR_UIDGID
            out.append(_U32.pack(self.uid) + _U32.pack(self.gid))
        if self.mode is not None:
            flags |= ATTR_PERMISSIONS
            out.append(_U32.pack(self.mode))
        if self.atime is not None or self.mtime is not None:
            if self.atime is None or self.mtime is None:
                raise ValueError("atime and mtime travel together in SFTP v3")
            flags |= ATTR_ACMODTIME
            out.append(_U32.pack(self.atime & 0xFFFFFFFF) + _U32.pack(self.mtime & 0xFFFFFFFF))
        return _U32.pack(flags) + b"".join(out)


def split_packets(rest: bytes, data: bytes) -> tuple[list[memoryview], bytes]:
    """Cut length-prefixed packets out of `rest + data`: (payloads, new rest).

    Payloads are views into `data` where they lie wholly inside it, so a big
    READ reply is not copied here; only a packet split across two reads is.
    """
    out: list[memoryview] = []
    pos, end = 0, len(data)
    if rest:
        if len(rest) < 4:
            pos = min(4 - len(rest), end)
            rest += data[:pos]
            if len(rest) < 4:
                return out, rest
        need = 4 + int.from_bytes(rest[:4], "big") - len(rest)
        if end - pos < need:
            return out, rest + data[pos:]
        out.append(memoryview(rest + data[pos : pos + need])[4:])
        pos += need
    view = memoryview(data)
    while end - pos >= 4:
        n = int.from_bytes(view[pos : pos + 4], "big")
        if end - pos - 4 < n:
            break
        out.append(view[pos + 4 : pos + 4 + n])
        pos += 4 + n
    return out, (data[pos:] if pos < end else b"")


class Reader:
    """Sequential decoder over one packet's payload."""

    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes | memoryview, pos: int = 0) -> None:
        self.buf = buf
        self.pos = pos

    def u32(self) -> int:
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self) -> int:
        (v,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def string(self) -> bytes:
        n = self.u32()
        end = self.pos + n
        if end > len(self.buf):
            raise ValueError("truncated SFTP string")
        v = bytes(self.buf[self.pos : end])
        self.pos = end
        return v

    def string_view(self) -> memoryview:
        """A string without copying it: a view into the received data, for callers
        that copy it on at once (holding it holds the whole receive buffer)."""
        n = self.u32()
        end = self.pos + n
        if end > len(self.buf):
            raise ValueError("truncated SFTP string")
        v = memoryview(self.buf)[self.pos : end]
        self.pos = end
        return v

    def attrs(self) -> Attrs:
        flags = self.u32()
        a = Attrs()
        if flags & ATTR_SIZE:
            a.size = self.u64()
        if flags & ATTR_UIDGID:
            a.uid = self.u32()
            a.gid = self.u32()
        if flags & ATTR_PERMISSIONS:
            a.mode = self.u32()
        if flags & ATTR_ACMODTIME:
            a.atime = self.u32()
            a.mtime = self.u32()
        if flags & ATTR_EXTENDED:
            for _ in range(self.u32()):
                self.string()
                self.string()
        return a

    def at_end(self) -> bool:
        return self.pos >= len(self.buf)


def u32(v: int) -> bytes:
    return _U32.pack(v)


def u64(v: int) -> bytes:
    return _U64.pack(v)


def string(v: bytes | str) -> bytes:
    if isinstance(v, str):
        v = v.encode()
    return _U32.pack(len(v)) + v


def packet(ptype: int, req_id: int | None, *fields: bytes | memoryview) -> bytes:
    """Frame one packet: length, type, request id (all but INIT), fields.

    Fields may be views (a WRITE's data): they are copied once, here.
    """
    head = bytes([ptype]) if req_id is None else _TYPE_ID.pack(ptype, req_id)
    size = len(head) + sum(len(f) for f in fields)
    return b"".join((_U32.pack(size), head, *fields))


def parse_version(payload: bytes) -> tuple[int, dict[bytes, bytes]]:
    """VERSION reply (after the type byte): protocol version and extensions offered."""
    r = Reader(payload)
    version = r.u32()
    exts: dict[bytes, bytes] = {}
    while not r.at_end():
        name = r.string()
        exts[name] = r.string()
    return version, exts


@dataclass(slots=True, frozen=True)
class Statvfs:
    bsize: int
    frsize: int
    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    favail: int
    fsid: int
    flag: int
    namemax: int

    @classmethod
    def decode(cls, r: Reader) -> Statvfs:
        return cls(*(r.u64() for _ in range(11)))


@dataclass(slots=True, frozen=True)
class Limits:
    max_packet: int
    max_read: int
    max_write: int
    max_handles: int

    @classmethod
    def decode(cls, r: Reader) -> Limits:
        return cls(*(r.u64() for _ in range(4)))
