"""The control channel (control.py, controlserver.py) with a fake handler, and the CLI's formatting
of what it returns (controlcmd.py). No server, no FUSE: a Unix socket in tmp."""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import stat
from pathlib import Path

import pytest
import trio

from sftpfs import control, controlcmd, controlserver
from sftpfs.control import ControlError, control_path, request
from sftpfs.controlserver import serve_control


def _status(**kw) -> dict:
    d = {"connected": True, "pending_ops": 0, "pending_files": 0, "pending_bytes": 0,
         "uploaded_bytes": 0, "failures": [], "recovery": [], "remote": "h:/srv",
         "mountpoint": "/mnt/x"}
    d.update(kw)
    return d


class FakeHandler:
    """status() returns `state`; sync() plays `steps`: (sleep, progress dict | None)."""

    def __init__(self, steps=(), result=None) -> None:
        self.state = _status(pending_ops=3, pending_files=2, pending_bytes=3000)
        self.steps = list(steps)
        self.result = result
        self.syncs = 0
        self.cancelled = 0
        self.finished = 0

    def status(self) -> dict:
        return dict(self.state)

    async def sync(self, progress) -> dict:
        self.syncs += 1
        try:
            for delay, d in self.steps:
                await trio.sleep(delay)
                if d is not None:
                    progress(d)
        except trio.Cancelled:
            self.cancelled += 1
            raise
        self.finished += 1
        return self.result if self.result is not None else {**_status(), "ok": True}


@pytest.fixture
def mp(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    (tmp_path / "run").mkdir(mode=0o700)
    return tmp_path / "mnt"


@contextlib.asynccontextmanager
async def serving(path: Path, handler):
    async with trio.open_nursery() as n:
        await n.start(serve_control, path, handler)
        yield n
        n.cancel_scope.cancel()


async def ask(mp: Path, cmd: str, **kw):
    """request() from a thread, as the CLI does; returns (result, progress list)."""
    got: list[dict] = []
    res = await trio.to_thread.run_sync(lambda: request(mp, cmd, on_progress=got.append, **kw))
    return res, got


def _raw(path: Path, data: bytes, *, shut: bool = False, timeout: float = 10) -> bytes:
    """Send raw bytes to the socket; everything the server answers before closing."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        with control._address(path) as addr:
            s.connect(addr)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(data)
        if shut:
            s.shutdown(socket.SHUT_WR)
        out = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                out += chunk
        return out
    finally:
        s.close()


async def raw(path: Path, data: bytes, **kw) -> bytes:
    return await trio.to_thread.run_sync(lambda: _raw(path, data, **kw))


# ------------------------------------------------------------------- protocol


def test_control_path_keyed_like_pidfile(mp):
    from sftpfs import runtime
    p = control_path(mp)
    assert p.parent == runtime.runtime_home()
    assert p.name.startswith("mount-") and p.name.endswith(".sock")
    assert p.stem == runtime.pidfile(mp).stem
    # the same point named differently (relative, through a symlinked parent) -> same socket
    link = mp.parent / "link"
    link.symlink_to(mp.parent, target_is_directory=True)
    assert control_path(link / "mnt") == p


async def test_status(mp):
    h = FakeHandler()
    path = control_path(mp)
    async with serving(path, h):
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
        res, prog = await ask(mp, "status")
        assert res == h.status() and prog == []
    assert not path.exists(), "socket not removed at exit"


async def test_sync_progress_lines(mp):
    steps = [(0.05, _status(pending_files=2, uploaded_bytes=10)),
             (0.3, _status(pending_files=1, uploaded_bytes=20)),
             (0.3, _status(pending_files=0, uploaded_bytes=30)),
             (0.1, None)]   # progress right before the result may be dropped: the result wins
    h = FakeHandler(steps, result={**_status(uploaded_bytes=30), "ok": True})
    async with serving(control_path(mp), h):
        res, prog = await ask(mp, "sync")
    assert res["ok"] is True and res["uploaded_bytes"] == 30
    # first where it starts from (a status), then the handler's progress
    assert prog[0] == h.status()
    assert [p["uploaded_bytes"] for p in prog[1:]] == [10, 20, 30]
    assert h.finished == 1


async def test_sync_heartbeat_when_handler_is_quiet(mp, monkeypatch):
    monkeypatch.setattr(controlserver, "HEARTBEAT", 0.2)
    h = FakeHandler([(1.1, None)])
    async with serving(control_path(mp), h):
        res, prog = await ask(mp, "sync")
    assert res["ok"] is True
    assert len(prog) >= 3, prog   # a fresh status() every HEARTBEAT
    assert all(p["pending_ops"] == 3 for p in prog)


async def test_sync_progress_coalesces_for_slow_readers(mp):
    # 500 progress calls without yielding: the client gets the newest, not 500 lines
    class Burst(FakeHandler):
        async def sync(self, progress):
            for i in range(500):
                progress(_status(uploaded_bytes=i))
            await trio.sleep(0.2)
            return {**_status(), "ok": True}

    async with serving(control_path(mp), Burst()):
        _res, prog = await ask(mp, "sync")
    assert len(prog) == 2 and prog[1]["uploaded_bytes"] == 499, prog


async def test_no_daemon(mp):
    with pytest.raises(ControlError) as e:
        await ask(mp, "status")
    assert str(e.value) == f"no sftpfs daemon for {mp} (is it mounted?)"


async def test_dead_socket_file(mp):
    path = control_path(mp)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()  # a socket file nobody listens on: a daemon that died
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    with pytest.raises(ControlError, match="no sftpfs daemon"):
        await ask(mp, "status")
    # a new daemon replaces it
    async with serving(path, FakeHandler()):
        res, _ = await ask(mp, "status")
        assert res["connected"] is True
    assert not path.exists()


async def test_regular_file_in_the_way_is_replaced(mp):
    path = control_path(mp)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    path.write_text("junk")
    async with serving(path, FakeHandler()):
        res, _ = await ask(mp, "status")
        assert res["pending_files"] == 2


async def test_socket_dir_made_private(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir(mode=0o755)
    os.chmod(run, 0o755)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(run))
    mp = tmp_path / "mnt"
    path = control_path(mp)
    async with serving(path, FakeHandler()):
        assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
        await ask(mp, "status")


async def test_malformed_requests(mp):
    path = control_path(mp)
    async with serving(path, FakeHandler()):
        for bad in (b"not json\n", b"[1,2]\n", b'{"nocmd": 1}\n', b"\xff\xfe\n"):
            reply = json.loads(await raw(path, bad))
            assert "malformed request" in reply["error"], (bad, reply)
        reply = json.loads(await raw(path, b'{"cmd": "frobnicate"}\n'))
        assert "unknown command 'frobnicate'" in reply["error"]
        with pytest.raises(ControlError, match="unknown command"):
            await ask(mp, "frobnicate")
        # a request without its newline, then EOF, still counts
        reply = json.loads(await raw(path, b'{"cmd": "status"}', shut=True))
        assert reply["result"]["pending_ops"] == 3
        # the daemon is unharmed
        res, _ = await ask(mp, "status")
        assert res["pending_ops"] == 3


async def test_long_line(mp):
    path = control_path(mp)
    async with serving(path, FakeHandler()):
        for data in (b"x" * (1 << 20), b'{"cmd": "status", "pad": "' + b"x" * 8000 + b'"}\n'):
            out = await raw(path, data)
            assert json.loads(out.splitlines()[0]) == {"error": "request line too long"}
        res, _ = await ask(mp, "status")
        assert res["pending_ops"] == 3


async def test_silent_client_is_dropped(mp, monkeypatch):
    monkeypatch.setattr(controlserver, "REQUEST_TIMEOUT", 0.3)
    path = control_path(mp)
    async with serving(path, FakeHandler()):
        silent = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(5)]
        try:
            for s in silent:
                s.connect(str(path))
            # others are served meanwhile
            res, _ = await ask(mp, "status")
            assert res["pending_ops"] == 3
            await trio.sleep(0.6)
            for s in silent:
                s.settimeout(5)
                assert s.recv(100) == b"", "a silent client was not dropped"
        finally:
            for s in silent:
                s.close()


async def test_client_gone_mid_sync_cancels_the_wait(mp):
    h = FakeHandler([(0.1, _status())] * 100)   # ten seconds of progress
    path = control_path(mp)
    async with serving(path, h):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(path))
        s.sendall(b'{"cmd": "sync"}\n')
        await trio.sleep(0.3)
        s.close()
        with trio.fail_after(5):
            while not h.cancelled:
                await trio.sleep(0.05)
        res, _ = await ask(mp, "status")
        assert res["pending_ops"] == 3


async def test_handler_error_is_one_reply_not_a_dead_daemon(mp):
    class Broken(FakeHandler):
        def status(self):
            raise RuntimeError("boom")

        async def sync(self, progress):
            raise KeyError("bang")

    path = control_path(mp)
    async with serving(path, Broken()):
        for cmd in ("status", "sync", "status"):
            with pytest.raises(ControlError, match="internal error"):
                await ask(mp, cmd)


async def test_request_timeout(mp):
    h = FakeHandler([(30, None)])
    async with serving(control_path(mp), h) as n:
        with pytest.raises(ControlError, match="no answer .* within 0.5 s"):
            await ask(mp, "sync", timeout=0.5)
        n.cancel_scope.cancel()


async def test_daemon_that_stops_answering(mp, monkeypatch):
    monkeypatch.setattr(control, "IDLE_TIMEOUT", 0.5)
    path = control_path(mp)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    # a listener that accepts (the kernel does) but never answers
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(str(path))
    lst.listen(1)
    try:
        with pytest.raises(ControlError, match="stopped answering"):
            await ask(mp, "sync")
    finally:
        lst.close()


async def test_socket_removed_only_if_ours(mp):
    path = control_path(mp)
    async with serving(path, FakeHandler()):
        path.unlink()
        path.write_text("someone else's")
    assert path.read_text() == "someone else's"


async def test_long_socket_path(tmp_path, monkeypatch):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(deep))
    mp = tmp_path / "mnt"
    path = control_path(mp)
    assert len(str(path)) > 108
    async with serving(path, FakeHandler()):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        res, _ = await ask(mp, "status")
        assert res["pending_ops"] == 3
    assert not path.exists()


async def test_non_utf8_names_travel(mp):
    name = os.fsdecode(b"caf\xe9.txt")
    h = FakeHandler()
    h.state["failures"] = [{"path": name, "error": "Permission denied", "recovery_path": None}]
    h.state["recovery"] = [b"/var/rec/caf\xe9.txt"]
    async with serving(control_path(mp), h):
        res, _ = await ask(mp, "status")
    assert res["failures"][0]["path"] == name
    assert res["recovery"] == [os.fsdecode(b"/var/rec/caf\xe9.txt")]
    text = controlcmd.format_status(res, mp)
    assert "caf\\xe9.txt" in text


# ----------------------------------------------------------------- fallbacks


async def test_read_only_and_labelled_handlers(mp):
    inner = controlserver.ReadOnlyHandler(connected=lambda: True, stats=lambda: {"open_files": 4})
    h = controlserver.LabelledHandler(inner, remote="me@h:/srv", mountpoint=str(mp))
    async with serving(control_path(mp), h):
        st, _ = await ask(mp, "status")
        res, _ = await ask(mp, "sync")
    for d in (st, res):
        assert d["remote"] == "me@h:/srv" and d["mountpoint"] == str(mp)
        assert d["pending_ops"] == d["pending_files"] == d["pending_bytes"] == 0
        assert d["connected"] is True and d["failures"] == []
    assert res["ok"] is True
    assert st["counters"] == {"open_files": 4}


# ---------------------------------------------------------------- CLI output


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_progress_on_a_terminal():
    out, clock = io.StringIO(), Clock()
    p = controlcmd.Progress(Path("/mnt/x"), out, tty=True, clock=clock)
    mib = 1 << 20
    for i in range(5):
        clock.t += 0.5
        p.update(_status(pending_files=10 - i, pending_bytes=(10 - i) * mib, uploaded_bytes=i * mib))
    clock.t += 0.5
    p.finish({**_status(uploaded_bytes=5 * mib), "ok": True})
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")
    frames = text.split("\r")[1:]
    assert len(frames) == 6
    assert "10 files, 10.0 MiB left" in frames[0]
    assert "6 files, 6.0 MiB left, 2.0 MiB/s, ETA 3s" in frames[4]
    assert frames[-1].startswith("sftpfs: synced /mnt/x: 5.0 MiB uploaded in 3s")
    # each frame overwrites the last one completely
    assert all(len(frames[i + 1].rstrip("\n")) >= len(frames[i].rstrip()) for i in range(5))


def test_progress_in_a_log():
    out, clock = io.StringIO(), Clock()
    p = controlcmd.Progress(Path("/mnt/x"), out, tty=False, clock=clock)
    for _ in range(40):    # 20 s of progress every 0.5 s
        clock.t += 0.5
        p.update(_status(pending_ops=7, connected=False))
    p.finish({**_status(), "ok": True})
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert 4 <= len(lines) <= 5, lines
    assert lines[0] == "sftpfs: syncing /mnt/x: 7 changes left, 0 B/s, disconnected, waiting to reconnect"
    assert lines[-1].startswith("sftpfs: synced /mnt/x")


def test_short_sync_prints_nothing():
    for tty in (True, False):
        out, clock = io.StringIO(), Clock()
        p = controlcmd.Progress(Path("/mnt/x"), out, tty=tty, clock=clock)
        p.update(_status(pending_files=1))      # the daemon's first line comes at once
        clock.t += 0.4
        p.update(_status())
        p.finish({**_status(), "ok": True})
        assert out.getvalue() == ""


def test_format_status():
    st = _status(pending_ops=5, pending_files=2, pending_bytes=3 << 20, uploaded_bytes=1 << 30,
                 connected=False,
                 failures=[{"path": "a/b.txt", "error": "Permission denied",
                            "recovery_path": "/rec/1/a/b.txt"},
                           {"path": "c", "error": "No space left on device", "recovery_path": None}],
                 recovery=["/rec/1/a/b.txt"])
    text = controlcmd.format_status(st, Path("/mnt/x"))
    assert text.splitlines()[0] == "/mnt/x: h:/srv"
    assert "disconnected" in text
    assert "5 changes, 2 files, 3.0 MiB to upload" in text
    assert "1.0 GiB since mount" in text
    assert "a/b.txt: Permission denied" in text and "data kept in /rec/1/a/b.txt" in text
    assert "c: No space left on device" in text
    assert "recovery:    1 file kept locally" in text
    ok = controlcmd.format_status(_status(), Path("/mnt/x"))
    assert "nothing, everything is on the server" in ok and "failed" not in ok


async def test_cmd_sync_and_status(mp, capsys):
    fails = [{"path": "x", "error": "Permission denied", "recovery_path": "/rec/x"},
             {"path": "y", "error": "Permission denied", "recovery_path": "/rec/y"}]
    h = FakeHandler(result={**_status(failures=fails), "ok": False})
    async with serving(control_path(mp), h):
        rc = await trio.to_thread.run_sync(controlcmd.cmd_sync, [str(mp)])
        err = capsys.readouterr().err
        assert rc == 1
        assert err == f"sftpfs: 2 files could not be uploaded, see: sftpfs status {mp}\n"
        h.result = {**_status(), "ok": True}
        assert await trio.to_thread.run_sync(controlcmd.cmd_sync, [str(mp)]) == 0
        assert capsys.readouterr().err == ""
        assert await trio.to_thread.run_sync(controlcmd.cmd_status, [str(mp), "--json"]) == 0
        assert json.loads(capsys.readouterr().out) == h.status()
        h.result = {**_status(failures=fails), "ok": False}
        assert await trio.to_thread.run_sync(controlcmd.sync_before_unmount, mp) == 0
        assert capsys.readouterr().err == (
            "sftpfs: warning: 2 files could not be uploaded; unmounting anyway, "
            "their data is kept in /rec\n")
    assert await trio.to_thread.run_sync(controlcmd.cmd_status, [str(mp)]) == 1
    assert capsys.readouterr().err == f"sftpfs: no sftpfs daemon for {mp} (is it mounted?)\n"
    # no daemon: unmount goes on
    assert await trio.to_thread.run_sync(controlcmd.sync_before_unmount, mp) == 0
