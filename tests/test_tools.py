"""A working mount: stock tools (rsync, cp, mv, ln, find, df, ...) against a
real sftpfs mount of a real SFTP-only sshd.

Results are checked on the SERVER's files, read directly from the exported
directory, after ``mount.unmount(mnt)`` (unmount is the durability barrier:
sftpfs writes back asynchronously, and everything acknowledged must be on
the server once unmount returns).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import random
import stat
import subprocess
import time
from pathlib import Path

import pytest

# ------------------------------------------------------------------ helpers


def run(cmd, *, check=True, timeout=300, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("capture_output", True)
    kw.setdefault("stdin", subprocess.DEVNULL)
    r = subprocess.run([str(c) for c in cmd], timeout=timeout, **kw)
    if check:
        out = r.stdout.decode(errors="replace") if isinstance(r.stdout, bytes) else r.stdout
        err = r.stderr.decode(errors="replace") if isinstance(r.stderr, bytes) else r.stderr
        assert r.returncode == 0, f"{cmd} failed rc={r.returncode}\nstdout: {out[-3000:]}\nstderr: {err[-3000:]}"
    return r


def open_close(path, flags: int) -> None:
    os.close(os.open(path, flags, 0o644))


def sha256(path: Path | bytes | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def random_file(path: Path, size: int, seed: int | None = None) -> Path:
    rng = random.Random(seed)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 1 << 20)
            f.write(rng.randbytes(n) if seed is not None else os.urandom(n))
            left -= n
    return path


def server_file(server, path: Path, data: bytes = b"", mode: int = 0o644, mtime: int | None = None) -> Path:
    """Create a file directly on the server, owned by the SFTP user."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, mode)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    server.chown(path)
    return path


def make_tree(root: Path, seed: int = 7) -> None:
    """~200 small files in nested dirs, a few larger ones, symlinks, modes, old mtimes."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    dirs = [root]
    for i in range(14):
        d = rng.choice(dirs) / f"dir{i:02d}"
        d.mkdir()
        dirs.append(d)
    (root / "empty-dir").mkdir()
    dirs.append(root / "empty-dir")
    files = []
    for i in range(200):
        f = rng.choice(dirs[:-1]) / f"file{i:03d}.dat"
        f.write_bytes(rng.randbytes(rng.choice([0, 1, 100, 511, 4096, 4097, 20000])))
        files.append(f)
    for i, size in enumerate([1 << 20, 2_500_001, 4 * (1 << 20) + 123]):
        f = rng.choice(dirs[:-1]) / f"large{i}.bin"
        random_file(f, size, seed=seed + i)
        files.append(f)
    modes = [0o600, 0o755, 0o644, 0o640, 0o444, 0o700]
    for f in files:
        os.chmod(f, rng.choice(modes))
        t = rng.randint(1_000_000_000, 1_600_000_000)  # 2001 .. 2020, whole seconds
        os.utime(f, (t, t))
    os.symlink("dir00/../file-target", root / "dangling-link")
    target = files[0].relative_to(root)
    os.symlink(str(target), root / "link-to-file")
    os.symlink("dir00", root / "link-to-dir")
    for link in ("dangling-link", "link-to-file", "link-to-dir"):
        os.utime(root / link, (1_200_000_000, 1_200_000_000), follow_symlinks=False)
    os.chmod(dirs[3], 0o700)
    os.chmod(dirs[4], 0o750)
    for d in sorted(dirs, key=lambda p: -len(p.parts)):  # deepest first
        t = rng.randint(1_000_000_000, 1_600_000_000)
        os.utime(d, (t, t))


def tree_meta(root: Path, *, dir_mtimes: bool = True) -> dict[str, tuple]:
    """rel path -> (type, mode, size, mtime-second, link target or sha256)."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("l", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("d", oct(stat.S_IMODE(st.st_mode)), int(st.st_mtime) if dir_mtimes else None)
            elif stat.S_ISREG(st.st_mode):
                out[rel] = ("f", oct(stat.S_IMODE(st.st_mode)), st.st_size, int(st.st_mtime), sha256(p))
            else:
                out[rel] = ("?", st.st_mode)
    return out


def assert_same_tree(expected: Path, actual: Path, what: str, *, dir_mtimes: bool = True) -> None:
    r = run(["diff", "-r", "--no-dereference", expected, actual], check=False, text=True)
    assert r.returncode == 0, f"{what}: diff -r differs:\n{r.stdout[-4000:]}{r.stderr[-2000:]}"
    a, b = tree_meta(expected, dir_mtimes=dir_mtimes), tree_meta(actual, dir_mtimes=dir_mtimes)
    diffs = [f"  {k}: expected {a.get(k)} got {b.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    assert not diffs, f"{what}: metadata differs ({len(diffs)} entries):\n" + "\n".join(diffs[:40])


RSYNC = ["rsync", "-a", "--no-owner", "--no-group"]


# -------------------------------------------------------------------- rsync


def test_rsync_tree_in_and_out(sftp_server, remote_dir, mount, tmp_path):
    src = tmp_path / "src"
    make_tree(src)
    mnt = mount()
    run([*RSYNC, f"{src}/", f"{mnt}/dst/"])
    # the mount itself shows the tree at once
    assert_same_tree(src, mnt / "dst", "through the mount right after rsync")
    mount.unmount(mnt)
    # the server has it, with modes, mtimes (to the second) and link targets
    assert_same_tree(src, remote_dir / "dst", "on the server after unmount")

    # a fresh mount: rsync sees nothing to do, and copying out gives the same tree
    mnt = mount(mnt=mnt)
    r = run([*RSYNC, "-i", f"{src}/", f"{mnt}/dst/"], text=True)
    assert r.stdout.strip() == "", f"no-op rsync into the mount transferred something:\n{r.stdout[:3000]}"
    out = tmp_path / "out"
    run([*RSYNC, f"{mnt}/dst/", f"{out}/"])
    assert_same_tree(src, out, "rsync out of the mount")


# ----------------------------------------------------------------------- cp


def test_cp_100mb_in_and_out(sftp_server, remote_dir, mount, tmp_path):
    big = random_file(tmp_path / "big.bin", 100 * (1 << 20))
    want = sha256(big)
    mnt = mount()
    run(["cp", big, mnt / "big.bin"])
    assert os.stat(mnt / "big.bin").st_size == big.stat().st_size
    mount.unmount(mnt)
    assert sha256(remote_dir / "big.bin") == want, "server's copy differs"

    # read back through a mount with an empty block cache
    mnt = mount(mnt=mnt, opts=[f"cache_dir={tmp_path / 'fresh-cache'}"])
    run(["cp", mnt / "big.bin", tmp_path / "back.bin"])
    assert sha256(tmp_path / "back.bin") == want, "copy read back through the mount differs"


def test_concurrent_writers(sftp_server, remote_dir, mount, tmp_path):
    srcs = [random_file(tmp_path / f"w{i}.bin", 5 * (1 << 20) + i * 4097) for i in range(8)]
    mnt = mount()
    procs = [subprocess.Popen(["cp", str(s), str(mnt / s.name)], stderr=subprocess.PIPE) for s in srcs]
    errs = []
    for p in procs:
        _, err = p.communicate(timeout=300)
        if p.returncode:
            errs.append(err.decode(errors="replace"))
    assert not errs, f"concurrent cp failed: {errs}"
    mount.unmount(mnt)
    for s in srcs:
        assert sha256(remote_dir / s.name) == sha256(s), f"{s.name} differs on the server"


# --------------------------------------------------------------------- find


def test_find_matches_server(sftp_server, remote_dir, mount, tmp_path):
    data = remote_dir / "data"
    make_tree(data, seed=11)
    sftp_server.chown(data)
    want = {}
    for dirpath, dirnames, filenames in os.walk(data):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            kind = "d" if stat.S_ISDIR(st.st_mode) else "l" if stat.S_ISLNK(st.st_mode) else "f"
            want[os.path.relpath(p, data)] = (kind, None if kind == "d" else st.st_size)
    mnt = mount()
    r = run(["find", mnt / "data", "-mindepth", "1", "-printf", r"%P\0%y\0%s\0"])
    fields = r.stdout.split(b"\0")[:-1]
    got = {}
    for i in range(0, len(fields), 3):
        rel, kind, size = os.fsdecode(fields[i]), fields[i + 1].decode(), int(fields[i + 2])
        got[rel] = (kind, None if kind == "d" else size)
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    wrong = sorted(k for k in set(want) & set(got) if want[k] != got[k])
    assert not (missing or extra or wrong), (
        f"find through the mount differs from the server: missing {missing[:10]}, "
        f"extra {extra[:10]}, wrong {[(k, want[k], got[k]) for k in wrong[:10]]}"
    )


# ----------------------------------------------------------------- mv / ln


def test_mv_file_over_existing_and_dir(sftp_server, remote_dir, mount):
    server_file(sftp_server, remote_dir / "a", b"content of a\n")
    server_file(sftp_server, remote_dir / "b", b"old content of b, longer\n")
    server_file(sftp_server, remote_dir / "d1" / "sub" / "f", b"in d1\n")
    sftp_server.mkdir(f"{remote_dir.name}/e")
    sftp_server.chown(remote_dir)
    mnt = mount()
    run(["mv", mnt / "a", mnt / "b"])
    assert not os.path.exists(mnt / "a")
    assert (mnt / "b").read_bytes() == b"content of a\n"
    run(["mv", mnt / "d1", mnt / "d2"])
    assert (mnt / "d2" / "sub" / "f").read_bytes() == b"in d1\n"
    assert not os.path.exists(mnt / "d1")
    run(["mv", mnt / "d2", mnt / "e"])
    assert (mnt / "e" / "d2" / "sub" / "f").read_bytes() == b"in d1\n"
    mount.unmount(mnt)
    assert not (remote_dir / "a").exists(), "source of mv still on the server"
    assert (remote_dir / "b").read_bytes() == b"content of a\n", "target of mv not replaced on the server"
    assert not (remote_dir / "d1").exists() and not (remote_dir / "d2").exists()
    assert (remote_dir / "e" / "d2" / "sub" / "f").read_bytes() == b"in d1\n"


def test_symlink_and_hardlink(sftp_server, remote_dir, mount):
    server_file(sftp_server, remote_dir / "f", b"target file\n")
    mnt = mount()
    run(["ln", "-s", "f", mnt / "sym"])
    run(["ln", "-s", "/no/such/abs/target", mnt / "dangling"])
    assert os.readlink(mnt / "sym") == "f"
    r = run(["readlink", mnt / "dangling"], text=True)
    assert r.stdout.strip() == "/no/such/abs/target"
    assert (mnt / "sym").read_bytes() == b"target file\n"
    run(["ln", mnt / "f", mnt / "hard"])
    assert (mnt / "hard").read_bytes() == b"target file\n"
    mount.unmount(mnt)
    assert os.readlink(remote_dir / "sym") == "f"
    assert os.readlink(remote_dir / "dangling") == "/no/such/abs/target"
    st_f, st_h = os.lstat(remote_dir / "f"), os.lstat(remote_dir / "hard")
    assert stat.S_ISREG(st_h.st_mode), "hard link is not a regular file on the server"
    assert st_f.st_ino == st_h.st_ino, "ln did not make a hard link on the server"
    assert st_f.st_nlink == 2


# ----------------------------------------------- chmod, touch, truncate, df


def test_chmod_touch_truncate(sftp_server, remote_dir, mount):
    server_file(sftp_server, remote_dir / "m", b"x", mode=0o644)
    server_file(sftp_server, remote_dir / "t", b"y")
    grow = bytes(range(256)) * 40  # 10240 bytes
    server_file(sftp_server, remote_dir / "grow", grow)
    server_file(sftp_server, remote_dir / "shrink", grow)
    mnt = mount()
    run(["chmod", "0751", mnt / "m"])
    assert stat.S_IMODE(os.stat(mnt / "m").st_mode) == 0o751
    run(["touch", "-d", "2001-02-03 04:05:06", mnt / "t"])
    want_mtime = int(run(["date", "-d", "2001-02-03 04:05:06", "+%s"], text=True).stdout)
    assert int(os.stat(mnt / "t").st_mtime) == want_mtime
    run(["truncate", "-s", "1M", mnt / "grow"])
    run(["truncate", "-s", "100", mnt / "shrink"])
    assert os.stat(mnt / "grow").st_size == 1 << 20
    assert (mnt / "shrink").read_bytes() == grow[:100]
    mount.unmount(mnt)
    assert stat.S_IMODE(os.stat(remote_dir / "m").st_mode) == 0o751, "chmod not on the server"
    assert int(os.stat(remote_dir / "t").st_mtime) == want_mtime, "touch -d not on the server"
    g = (remote_dir / "grow").read_bytes()
    assert len(g) == 1 << 20 and g[: len(grow)] == grow and g[len(grow):] == bytes(len(g) - len(grow))
    assert (remote_dir / "shrink").read_bytes() == grow[:100]


def test_df(sftp_server, remote_dir, mount):
    mnt = mount()
    r = run(["df", "-P", mnt], text=True)
    line = r.stdout.strip().splitlines()[-1].split()
    assert int(line[1]) > 0, f"df reports size 0: {r.stdout}"
    st = os.statvfs(mnt)
    assert st.f_blocks > 0 and st.f_bsize > 0


# ------------------------------------------------------------ directories


def test_mkdir_rmdir_rm_r(sftp_server, remote_dir, mount):
    mnt = mount()
    run(["mkdir", "-p", mnt / "keep" / "x" / "y"])
    run(["mkdir", "-p", mnt / "a" / "b" / "c"])
    (mnt / "a" / "b" / "file").write_bytes(b"z")
    run(["rmdir", mnt / "a" / "b" / "c"])
    assert not os.path.exists(mnt / "a" / "b" / "c")
    r = run(["rmdir", mnt / "a" / "b"], check=False, text=True)
    assert r.returncode != 0 and "Directory not empty" in r.stderr, r.stderr
    with pytest.raises(OSError) as ei:
        os.rmdir(mnt / "a")
    assert ei.value.errno == errno.ENOTEMPTY
    run(["rm", "-r", mnt / "a"])
    assert not os.path.exists(mnt / "a")
    mount.unmount(mnt)
    assert (remote_dir / "keep" / "x" / "y").is_dir()
    assert not (remote_dir / "a").exists()


# --------------------------------------------------------------- odd names


ODD_NAMES = [b"with space", b"new\nline", b"caf\xe9", b"x" * 255, "ünïcödé ✓".encode(), b"-dash", b"tab\tname"]


def test_odd_names(sftp_server, remote_dir, mount):
    mnt = mount()
    bmnt = os.fsencode(mnt)
    for name in ODD_NAMES:
        with open(os.path.join(bmnt, name), "wb") as f:
            f.write(b"content:" + name)
    assert set(ODD_NAMES) <= set(os.listdir(bmnt))
    for fn in (lambda p: open_close(p, os.O_WRONLY | os.O_CREAT), os.mkdir):
        with pytest.raises(OSError) as ei:
            fn(os.path.join(bmnt, b"y" * 256))
        assert ei.value.errno == errno.ENAMETOOLONG
    mount.unmount(mnt)
    bremote = os.fsencode(remote_dir)
    assert set(ODD_NAMES) <= set(os.listdir(bremote)), sorted(os.listdir(bremote))
    for name in ODD_NAMES:
        with open(os.path.join(bremote, name), "rb") as f:
            assert f.read() == b"content:" + name
    # and the other way round: names made on the server, read through a new mount
    for name in ODD_NAMES:
        server_file(sftp_server, Path(os.fsdecode(os.path.join(bremote, b"srv-" + name[:250]))), name)
    mnt = mount(mnt=mnt)
    # A remount answers from the disk cache at once and revalidates behind it
    # (README, Consistency): the server's new names show up moments later.
    wanted = {b"srv-" + name[:250] for name in ODD_NAMES}
    deadline = time.monotonic() + 10
    while not wanted <= (listing := set(os.listdir(bmnt))):
        assert time.monotonic() < deadline, sorted(wanted - listing)
        time.sleep(0.1)
    for name in ODD_NAMES:
        assert b"srv-" + name[:250] in listing
        with open(os.path.join(bmnt, b"srv-" + name[:250]), "rb") as f:
            assert f.read() == name


# ----------------------------------------------------------- server refusal


def test_server_permission_denied(sftp_server, remote_dir, mount, tmp_path):
    ro = sftp_server.mkdir(f"{remote_dir.name}/readonly", mode=0o555)
    src = tmp_path / "src"
    src.write_bytes(b"data" * 1000)
    mnt = mount()
    r = run(["cp", src, mnt / "readonly" / "new"], check=False, text=True)
    assert r.returncode != 0, "cp into a directory the server refuses succeeded"
    assert "Permission denied" in r.stderr, r.stderr
    with pytest.raises(PermissionError), open(mnt / "readonly" / "new2", "wb") as f:
        f.write(b"x" * 10000)
        f.flush()
        os.fsync(f.fileno())
    mount.unmount(mnt)
    assert os.listdir(ro) == [], f"refused files appeared on the server: {os.listdir(ro)}"


def test_disk_full(sftp_server, remote_dir, mount, small_fs, tmp_path):
    full = small_fs("1m")
    keep = server_file(sftp_server, full / "keep", os.urandom(100_000))
    keep_sum = sha256(keep)
    big = random_file(tmp_path / "big", 3 * (1 << 20))
    mnt = mount()
    with open(mnt / "full" / "small", "wb") as f:
        f.write(b"s" * 10_000)
        f.flush()
        os.fsync(f.fileno())
    # With write-back the server's refusal arrives at fsync (or a later close):
    # a copy that asks for durability must fail.
    r = run(["dd", f"if={big}", f"of={mnt / 'full' / 'big'}", "bs=1M", "conv=fsync"],
            check=False, text=True)
    assert r.returncode != 0, "a 3 MB write into a 1 MB file system was reported durable"
    assert "No space left on device" in r.stderr, r.stderr
    mount.unmount(mnt)
    assert sha256(keep) == keep_sum, "an unrelated file on the full server disk was changed"
    assert (full / "small").read_bytes() == b"s" * 10_000


# -------------------------------------------------------------------- xattr


def test_xattr_not_supported_fast(sftp_server, remote_dir, mount):
    server_file(sftp_server, remote_dir / "f", b"x")
    mnt = mount()
    os.stat(mnt / "f")
    t0 = time.monotonic()
    with pytest.raises(OSError) as ei:
        os.setxattr(mnt / "f", "user.x", b"1")
    assert ei.value.errno == errno.ENOTSUP
    r = run(["getfattr", "-n", "user.x", mnt / "f"], check=False, text=True)
    elapsed = time.monotonic() - t0
    assert r.returncode != 0
    assert "Operation not supported" in r.stderr, r.stderr
    assert elapsed < 1.0, f"xattr calls took {elapsed:.2f}s"


# ---------------------------------------------------------------- renameat2

AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


def renameat2(old: Path, new: Path, flags: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.renameat2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    rc = fn(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags)
    return 0 if rc == 0 else ctypes.get_errno()


def test_renameat2_flags(sftp_server, remote_dir, mount):
    server_file(sftp_server, remote_dir / "a", b"A")
    server_file(sftp_server, remote_dir / "b", b"B")
    mnt = mount()
    assert renameat2(mnt / "a", mnt / "b", RENAME_NOREPLACE) == errno.EEXIST
    assert (mnt / "a").read_bytes() == b"A" and (mnt / "b").read_bytes() == b"B"
    assert renameat2(mnt / "a", mnt / "c", RENAME_NOREPLACE) == 0
    assert renameat2(mnt / "c", mnt / "b", RENAME_EXCHANGE) == errno.EINVAL
    assert (mnt / "c").read_bytes() == b"A" and (mnt / "b").read_bytes() == b"B"
    mount.unmount(mnt)
    assert not (remote_dir / "a").exists()
    assert (remote_dir / "c").read_bytes() == b"A"
    assert (remote_dir / "b").read_bytes() == b"B"


# ------------------------------------------------------ remote changes seen


def test_server_change_visible_after_attr_timeout(sftp_server, remote_dir, mount):
    now = int(time.time())
    server_file(sftp_server, remote_dir / "f", b"old", mtime=now - 100)
    server_file(sftp_server, remote_dir / "gone", b"will be deleted")
    server_file(sftp_server, remote_dir / "same", b"version 1", mtime=now - 100)
    # cache_timeout bounds how stale sftpfs's own listings may be; the kernel's
    # caches are bounded by attr_timeout and entry_timeout.
    mnt = mount(opts=["attr_timeout=1", "entry_timeout=1", "cache_timeout=1"])
    assert (mnt / "f").read_bytes() == b"old"
    assert (mnt / "same").read_bytes() == b"version 1"
    assert sorted(os.listdir(mnt)) == ["f", "gone", "same"]
    # another writer changes the server
    server_file(sftp_server, remote_dir / "f", b"new and longer", mtime=now - 50)
    server_file(sftp_server, remote_dir / "same", b"version 2", mtime=now - 50)  # same size
    server_file(sftp_server, remote_dir / "new", b"created on the server")
    (remote_dir / "gone").unlink()
    time.sleep(2)
    assert (mnt / "f").read_bytes() == b"new and longer"
    assert os.stat(mnt / "f").st_size == len(b"new and longer")
    assert (mnt / "same").read_bytes() == b"version 2", "stale cached blocks of a same-size file"
    assert sorted(os.listdir(mnt)) == ["f", "new", "same"], "directory listing is stale"
    assert not os.path.exists(mnt / "gone")
    assert (mnt / "new").read_bytes() == b"created on the server"


def test_fsync_reaches_server(sftp_server, remote_dir, mount):
    """fsync returns when the file's data and metadata are on the server."""
    mnt = mount()
    with open(mnt / "f", "wb") as f:
        f.write(b"durable" * 1000)
        os.fchmod(f.fileno(), 0o600)
        f.flush()
        os.fsync(f.fileno())
        assert (remote_dir / "f").read_bytes() == b"durable" * 1000, "fsync returned before the data was on the server"
        assert stat.S_IMODE(os.stat(remote_dir / "f").st_mode) == 0o600


# ----------------------------------------------------------------- ro mount


def test_read_only_mount(sftp_server, remote_dir, mount):
    server_file(sftp_server, remote_dir / "f", b"readable")
    mnt = mount(opts=["ro"])
    assert (mnt / "f").read_bytes() == b"readable"
    for action in (
        lambda: open_close(mnt / "f", os.O_WRONLY | os.O_APPEND),
        lambda: open_close(mnt / "new", os.O_WRONLY | os.O_CREAT),
        lambda: os.mkdir(mnt / "d"),
        lambda: os.chmod(mnt / "f", 0o600),
        lambda: os.unlink(mnt / "f"),
    ):
        with pytest.raises(OSError) as ei:
            action()
        assert ei.value.errno == errno.EROFS
    r = run(["touch", mnt / "new"], check=False, text=True)
    assert r.returncode != 0 and "Read-only file system" in r.stderr, r.stderr
    mount.unmount(mnt)
    assert sorted(os.listdir(remote_dir)) == ["f"]
    assert (remote_dir / "f").read_bytes() == b"readable"
    assert stat.S_IMODE(os.stat(remote_dir / "f").st_mode) == 0o644


# --------------------------------------------------------- the server itself


def test_server_is_sftp_only(sftp_server, remote_dir, tmp_path):
    """rsync over ssh cannot work against this server: that is why sftpfs exists."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    r = run(["rsync", "-a", "-e", f"ssh -F {sftp_server.ssh_config}", f"{src}/",
             f"sftpfs-test:{remote_dir}/x/"], check=False, text=True, timeout=60)
    assert r.returncode != 0
    assert "protocol version mismatch" in r.stderr, r.stderr
    assert not (remote_dir / "x").exists()

