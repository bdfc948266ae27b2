"""Wire format: byte-exact against the SFTP v3 draft."""

import errno
import struct

import pytest

from sftpfs.remote import protocol as p
from sftpfs.remote.errors import SftpError


def test_attrs_roundtrip_all_fields():
    a = p.Attrs(size=2**40 + 3, uid=1000, gid=100, mode=0o100644, atime=1, mtime=2**31 + 5)
    r = p.Reader(a.encode())
    assert r.attrs() == a
    assert r.at_end()


def test_attrs_encode_only_what_is_set():
    assert p.Attrs().encode() == b"\0\0\0\0"
    assert p.Attrs(mode=0o755).encode() == struct.pack(">II", p.ATTR_PERMISSIONS, 0o755)


def test_attrs_times_and_ids_travel_together():
    with pytest.raises(ValueError):
        p.Attrs(atime=1).encode()
    with pytest.raises(ValueError):
        p.Attrs(uid=1).encode()


def test_attrs_extended_pairs_are_skipped():
    body = struct.pack(">IQ", p.ATTR_SIZE | p.ATTR_EXTENDED, 7) + struct.pack(">I", 1)
    body += p.string(b"name@x") + p.string(b"value") + b"tail"
    r = p.Reader(body)
    assert r.attrs() == p.Attrs(size=7)
    assert r.buf[r.pos:] == b"tail"


def test_packet_framing():
    pkt = p.packet(p.FXP_LSTAT, 7, p.string(b"/x"))
    assert pkt == struct.pack(">IBI", 1 + 4 + 4 + 2, p.FXP_LSTAT, 7) + b"\0\0\0\x02/x"
    assert p.packet(p.FXP_INIT, None, p.u32(3)) == struct.pack(">IBI", 5, p.FXP_INIT, 3)


def test_parse_version_with_extensions():
    payload = p.u32(3) + p.string(b"posix-rename@openssh.com") + p.string(b"1")
    assert p.parse_version(payload) == (3, {b"posix-rename@openssh.com": b"1"})


def test_truncated_string_is_an_error():
    with pytest.raises(ValueError):
        p.Reader(p.u32(10) + b"abc").string()


@pytest.mark.parametrize(("status", "code"), [
    (p.FX_NO_SUCH_FILE, errno.ENOENT),
    (p.FX_PERMISSION_DENIED, errno.EACCES),
    (p.FX_FAILURE, errno.EIO),
    (p.FX_OP_UNSUPPORTED, errno.ENOTSUP),
    (p.FX_BAD_MESSAGE, errno.EINVAL),
])
def test_status_errno(status, code):
    e = SftpError(status, "", b"/x")
    assert e.errno == code
    refined = e.with_errno(errno.ENOSPC)
    assert refined.errno == errno.ENOSPC and "space" in refined.strerror


def test_split_packets_any_cut() -> None:
    """Replies cut at every possible byte across two reads come out whole and in order."""
    bodies = [b"\x65" + bytes(range(i % 7)) * 30 for i in range(5)] + [b"", b"x" * 300]
    wire = b"".join(len(b).to_bytes(4, "big") + b for b in bodies)
    for cut in range(len(wire) + 1):
        got, rest = p.split_packets(b"", wire[:cut])
        more, rest = p.split_packets(rest, wire[cut:])
        assert [bytes(x) for x in got + more] == bodies
        assert rest == b""


def test_split_packets_byte_by_byte() -> None:
    bodies = [b"abc", b"", b"defgh"]
    wire = b"".join(len(b).to_bytes(4, "big") + b for b in bodies)
    out, rest = [], b""
    for i in range(len(wire)):
        got, rest = p.split_packets(rest, wire[i : i + 1])
        out += [bytes(x) for x in got]
    assert out == bodies and rest == b""


def test_string_view_is_the_string_without_a_copy():
    buf = bytearray(p.string(b"hello") + p.string(b"world"))
    r = p.Reader(memoryview(buf))
    v = r.string_view()
    assert isinstance(v, memoryview) and bytes(v) == b"hello"
    assert r.string() == b"world" and r.at_end()
    buf[4] = ord("j")  # a view: sees the buffer it came from
    assert bytes(v) == b"jello"
    with pytest.raises(ValueError):
        p.Reader(b"\0\0\0\x09abc").string_view()


@pytest.mark.parametrize("fault", ["eof", "socket closed", "channel closed"])
def test_a_session_ended_during_sftp_setup_names_the_likely_cause(fault):
    """A forced command ends the session; depending on timing paramiko reports an EOF,
    a closed socket or a closed channel (seen flaking on a real sshd): one message."""
    import paramiko

    from sftpfs.remote.channel import NO_SFTP, open_sftp_channel
    from sftpfs.remote.errors import ConnectionLost

    class Chan:
        in_buffer = None

        def settimeout(self, t):
            pass

        def invoke_subsystem(self, name):
            if fault == "channel closed":
                raise paramiko.SSHException("Channel closed.")

        def sendall(self, data):
            if fault == "socket closed":
                raise OSError("Socket is closed")

        def recv(self, n):
            return b""

    class Transport:
        def open_session(self, **kw):
            return Chan()

    with pytest.raises(ConnectionLost) as e:
        open_sftp_channel(Transport(), timeout=5)
    assert NO_SFTP in str(e.value)
