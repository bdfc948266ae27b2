"""Reads through a real mount: byte-exact under any access pattern, never a mix of
versions, the block cache bounded, sparse, persistent and robust, and the
`sftpfs cache` commands.

Files are made directly in the server's directory. Their mtimes are set in the
past unless a test is about recent ones: a version younger than RECENT seconds
is not cached (SFTP mtimes are whole seconds).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sftpfs import runtime
from sftpfs.vfs.blocks import BLOCK_SIZE, read_stats
from tests.conftest import require
from tests.test_meta import daemon_pid, stats

OLD = 1_500_000_000


def put(server, path: Path, data: bytes, mtime: int | None = OLD) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    server.chown(path.parent)
    return path


def pread(path: Path, offset: int, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def blocks_dir(cache: Path) -> Path:
    dirs = [d for d in cache.iterdir() if (d / "remote.txt").exists()]
    assert len(dirs) == 1, dirs
    return dirs[0] / "blocks"


def cache_entries(cache: Path) -> tuple[int, int]:
    """(entries, bytes) in the block cache, read from outside (after unmount)."""
    import diskcache

    with diskcache.Cache(str(blocks_dir(cache))) as c:
        return len(c), c.volume()


def sftpfs(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sftpfs", *args], capture_output=True, text=True,
                          env=env, timeout=60, stdin=subprocess.DEVNULL)


def warnings_in(log: str, word: str) -> list[str]:
    return [line for line in log.splitlines() if "WARNING" in line and word in line]


# ------------------------------------------------------------------ byte-exact reads


def test_random_reads_are_byte_exact(sftp_server, remote_dir, mount):
    rng = random.Random(5)
    size = 3 * 2**20 + 12345
    data = rng.randbytes(size)
    put(sftp_server, remote_dir / "f.bin", data)
    put(sftp_server, remote_dir / "small.txt", b"hello\n" * 17)
    put(sftp_server, remote_dir / "empty", b"")
    mnt = mount()
    f = mnt / "f.bin"
    with open(f, "rb") as fh:
        fd = fh.fileno()
        for _ in range(1500):
            off = rng.choice([rng.randrange(size + 100_000),
                              rng.randrange(size // BLOCK_SIZE + 1) * BLOCK_SIZE - rng.randrange(3)])
            off = max(0, off)
            n = rng.choice([1, 4096, 131072, rng.randrange(1, 600_000)])
            assert os.pread(fd, n, off) == data[off:off + n], (off, n)
    # sequential, with odd buffer sizes, and again (kernel page cache kept)
    for bufsize in (1_000_003, 65536):
        with open(f, "rb", buffering=0) as fh:
            got = bytearray()
            while chunk := fh.read(bufsize):
                got += chunk
        assert got == data
    assert (mnt / "small.txt").read_bytes() == b"hello\n" * 17
    assert (mnt / "empty").read_bytes() == b""

    # concurrent readers of one file, each with its own random reads
    errors = []

    def reader(seed: int) -> None:
        r = random.Random(seed)
        try:
            with open(f, "rb") as fh:
                for _ in range(150):
                    off, n = r.randrange(size), r.randrange(1, 400_000)
                    if os.pread(fh.fileno(), n, off) != data[off:off + n]:
                        errors.append((off, n))
        except OSError as e:
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


# ------------------------------------------------------------------ versions


def test_changed_file_is_read_whole_new_never_mixed(sftp_server, remote_dir, mount, tmp_path):
    rng = random.Random(9)
    a = put(sftp_server, remote_dir / "a.bin", rng.randbytes(2 * 2**20), OLD)
    b = put(sftp_server, remote_dir / "b.bin", rng.randbytes(2 * 2**20 + 5), OLD)
    mnt = mount(opts=("cache_timeout=1", "attr_timeout=1", "entry_timeout=1",
                      f"cache_dir={tmp_path / 'cache'}"))
    assert (mnt / "a.bin").read_bytes() == a.read_bytes()  # all of a cached
    assert pread(mnt / "b.bin", 300_000, 4096) == b.read_bytes()[300_000:304_096]  # b in part
    new_a = rng.randbytes(2 * 2**20)  # same size, other contents, other mtime
    put(sftp_server, a, new_a, OLD + 60)
    new_b = rng.randbytes(1_500_000)  # another size
    put(sftp_server, b, new_b, OLD + 60)
    time.sleep(1.5)
    assert (mnt / "a.bin").read_bytes() == new_a
    assert (mnt / "b.bin").read_bytes() == new_b
    assert pread(mnt / "b.bin", 300_000, 4096) == new_b[300_000:304_096]


def test_partly_cached_file_changed_meanwhile_is_read_whole_new(sftp_server, remote_dir, mount,
                                                                  tmp_path):
    """A read-only open with fresh attributes is answered without the server; a file
    with only some blocks cached is checked on the server before any byte is returned,
    so a change since its listing (within cache_timeout) is never mixed with old blocks."""
    rng = random.Random(11)
    old = rng.randbytes(3 * BLOCK_SIZE)
    f = put(sftp_server, remote_dir / "p.bin", old)
    cache = tmp_path / "cache"
    mnt = mount(opts=(f"cache_dir={cache}",))
    assert pread(mnt / "p.bin", 10, 4096) == old[10:4106]  # the first block cached
    mount.unmount(mnt)
    mnt = mount(opts=(f"cache_dir={cache}",))
    assert (mnt / "p.bin").stat().st_size == len(old)  # fresh attributes of the old version
    new = rng.randbytes(len(old))
    put(sftp_server, f, new, OLD + 60)
    assert (mnt / "p.bin").read_bytes() == new


def test_file_grown_on_the_server_since_listed_is_read_to_its_new_end(sftp_server, remote_dir,
                                                                       mount, tmp_path):
    """The kernel clips reads to the size it was given; an open answered without the
    server learns of the new size at the first read, and must tell the kernel."""
    rng = random.Random(12)
    old = rng.randbytes(4 * BLOCK_SIZE + 5000)  # the first read caches only its start
    f = put(sftp_server, remote_dir / "g.bin", old)
    cache = tmp_path / "cache"
    mnt = mount(opts=(f"cache_dir={cache}",))
    assert pread(mnt / "g.bin", 10, 4096) == old[10:4106]
    mount.unmount(mnt)
    mnt = mount(opts=(f"cache_dir={cache}",))
    assert (mnt / "g.bin").stat().st_size == len(old)  # the kernel holds the old size
    new = rng.randbytes(6 * BLOCK_SIZE + 77)
    put(sftp_server, f, new, OLD + 60)
    assert (mnt / "g.bin").read_bytes() == new


def test_open_without_reading_asks_nothing_of_the_server(sftp_server, remote_dir, mount,
                                                          sftpfs_env):
    """rsync opens each file it replaces (its basis) and, copying whole files, never
    reads it: such an open must not cost a round trip."""
    files = {f"f{i}": os.urandom(5000 + i) for i in range(6)}
    for name, data in files.items():
        put(sftp_server, remote_dir / name, data)
    mnt = mount(opts=("prefetch=0",))  # nothing listed in the background meanwhile
    assert sorted(os.listdir(mnt)) == sorted(files)
    for name in files:
        (mnt / name).stat()
    before = stats(mount, sftpfs_env, mnt)["requests"]
    for name in files:
        os.close(os.open(mnt / name, os.O_RDONLY))
    assert stats(mount, sftpfs_env, mnt)["requests"] == before
    assert (mnt / "f3").read_bytes() == files["f3"]  # the first read goes to the server
    assert stats(mount, sftpfs_env, mnt)["requests"] > before


def test_unreadable_file_fails_at_open_even_with_fresh_attributes(sftp_server, remote_dir, mount):
    """An open answered without the server must not succeed where the server's would
    fail: a file the login may not read is opened on the server (EACCES at open)."""
    require(os.geteuid() == 0, "needs root: the file must belong to someone else")
    put(sftp_server, remote_dir / "open", b"anyone's")
    secret = put(sftp_server, remote_dir / "secret", b"not yours")
    os.chown(secret, 0, 0)  # root's, not the SFTP login's
    secret.chmod(0o600)
    mnt = mount()
    assert sorted(os.listdir(mnt)) == ["open", "secret"]  # fresh attributes of both
    with pytest.raises(PermissionError):
        os.open(mnt / "secret", os.O_RDONLY)
    assert (mnt / "open").read_bytes() == b"anyone's"


@pytest.mark.parametrize("writeback", ["on", "off"])
def test_file_unlinked_or_replaced_while_open_reads_as_opened(sftp_server, remote_dir, mount,
                                                               sftpfs_env, writeback):
    """An open not yet sent to the server is sent before an unlink or a rename over the
    file goes out: the handle keeps reading the file it opened, as on a local disk.
    (Without write-back, the unlink and the rename reach the server at once.)"""
    gone, old = os.urandom(70_000), os.urandom(90_000)
    put(sftp_server, remote_dir / "gone", gone)
    put(sftp_server, remote_dir / "kept", old)
    mnt = mount(opts=(f"writeback={writeback}",))
    (mnt / "gone").stat()
    (mnt / "kept").stat()
    fd1 = os.open(mnt / "gone", os.O_RDONLY)
    fd2 = os.open(mnt / "kept", os.O_RDONLY)
    try:
        os.unlink(mnt / "gone")
        (mnt / "kept.new").write_bytes(b"the replacement")
        os.rename(mnt / "kept.new", mnt / "kept")
        assert os.pread(fd1, 100_000, 0) == gone
        assert os.pread(fd2, 100_000, 0) == old
        assert os.fstat(fd2).st_size == len(old)
    finally:
        os.close(fd1)
        os.close(fd2)
    assert sftpfs(sftpfs_env, "sync", str(mnt)).returncode == 0
    assert not (remote_dir / "gone").exists()
    assert (remote_dir / "kept").read_bytes() == b"the replacement"


def test_rewrite_within_one_second_is_seen(sftp_server, remote_dir, mount):
    """Same size and the same mtime second: only the recent-mtime rule tells them apart."""
    now = int(time.time())
    f = put(sftp_server, remote_dir / "hot.txt", b"first version\n", now)
    mnt = mount(opts=("cache_timeout=1", "attr_timeout=1", "entry_timeout=1"))
    assert (mnt / "hot.txt").read_bytes() == b"first version\n"
    put(sftp_server, f, b"other version\n", now)
    time.sleep(1.5)
    assert (mnt / "hot.txt").read_bytes() == b"other version\n"


def test_written_through_the_mount_is_read_back(sftp_server, remote_dir, mount, tmp_path):
    data = os.urandom(600_000)
    put(sftp_server, remote_dir / "w.bin", data, OLD)
    cache = tmp_path / "cache"
    mnt = mount(opts=(f"cache_dir={cache}",))
    f = mnt / "w.bin"
    assert f.read_bytes() == data  # cached
    reader = open(f, "rb")  # noqa: SIM115 - stays open across the write
    try:
        with open(f, "r+b") as w:
            w.write(b"X" * 10)
            w.flush()
            # while a writer is open, reads go to the server: they see the write
            assert os.pread(reader.fileno(), 20, 0) == b"X" * 10 + data[10:20]
        os.utime(f, (OLD, OLD))  # same size, same mtime as the cached version
    finally:
        reader.close()
    want = b"X" * 10 + data[10:]
    assert f.read_bytes() == want
    mount.unmount(mnt)
    assert (remote_dir / "w.bin").read_bytes() == want
    mnt = mount(opts=(f"cache_dir={cache}",))  # the old blocks stay dead after a remount too
    assert (mnt / "w.bin").read_bytes() == want


def test_old_blocks_stay_dead_after_a_crash(sftp_server, remote_dir, mount, sftpfs_env,
                                            tmp_path):
    """The epoch a write makes is logged at once (epochlog.py): a daemon killed
    after the upload, before it folded its log, must not let the next mount
    serve the blocks of the version it replaced (same size, same mtime)."""
    data = os.urandom(3 * 2**20)
    put(sftp_server, remote_dir / "w.bin", data, OLD)
    cache = tmp_path / "cache"
    mnt = mount(opts=(f"cache_dir={cache}",))
    assert (mnt / "w.bin").read_bytes() == data
    mount.unmount(mnt)  # the blocks are on disk
    assert read_stats(blocks_dir(cache))["misses"] == 3
    mnt = mount(opts=(f"cache_dir={cache}",))
    want = b"Y" * 4096 + data[4096:]
    with open(mnt / "w.bin", "r+b") as w:
        w.write(b"Y" * 4096)
    os.utime(mnt / "w.bin", (OLD, OLD))
    assert sftpfs(sftpfs_env, "sync", str(mnt)).returncode == 0
    assert (remote_dir / "w.bin").read_bytes() == want
    os.kill(daemon_pid(sftpfs_env, mnt), signal.SIGKILL)
    subprocess.run(["fusermount3", "-uz", str(mnt)], check=False)
    assert list(blocks_dir(cache).glob("epochs-*.log")), "the killed mount left its log"
    mnt = mount(opts=(f"cache_dir={cache}",), mnt=mnt)
    assert (mnt / "w.bin").read_bytes() == want
    assert not list(blocks_dir(cache).glob("epochs-*.log"))[1:], "the dead log was folded"


def test_kernel_reads_ahead_a_block_at_a_time(sftp_server, remote_dir, mount):
    """As root, the mount's kernel read-ahead is raised from 128 KiB (an eighth of the
    FUSE requests for a sequential reader); -o kernel_readahead= sets it."""
    data = os.urandom(5 * 2**20 + 77)
    put(sftp_server, remote_dir / "seq.bin", data)

    def readahead_kb(mnt: Path) -> int:
        dev = runtime.mount_device(mnt)
        assert dev is not None
        return int(Path(f"/sys/class/bdi/{dev}/read_ahead_kb").read_text())

    for opt, want in ((None, 1024), ("kernel_readahead=512k", 512)):
        mnt = mount(opts=(opt,) if opt else ())
        assert readahead_kb(mnt) == want
        assert (mnt / "seq.bin").read_bytes() == data
        mount.unmount(mnt)


# ------------------------------------------------------------------ the block cache on disk


def test_reread_after_remount_is_served_from_disk(sftp_server, remote_dir, mount, tmp_path):
    data = os.urandom(2 * 2**20 + 1)
    put(sftp_server, remote_dir / "f.bin", data)
    cache = tmp_path / "cache"
    mnt = mount(opts=(f"cache_dir={cache}",))
    assert (mnt / "f.bin").read_bytes() == data
    mount.unmount(mnt)
    first = read_stats(blocks_dir(cache))
    nblocks = -(-len(data) // BLOCK_SIZE)
    assert first["misses"] == nblocks and first["fetched_bytes"] == len(data)
    mnt = mount(opts=(f"cache_dir={cache}",))
    assert (mnt / "f.bin").read_bytes() == data
    mount.unmount(mnt)
    second = read_stats(blocks_dir(cache))
    assert second["misses"] == first["misses"]  # nothing fetched again
    assert second["hit_bytes"] - first.get("hit_bytes", 0) == len(data)


def test_cache_size_limit_holds(sftp_server, remote_dir, mount, tmp_path):
    rng = random.Random(3)
    files = {f"f{i}.bin": rng.randbytes(2**20) for i in range(10)}
    for name, data in files.items():
        put(sftp_server, remote_dir / name, data)
    cache = tmp_path / "cache"
    mnt = mount(opts=(f"cache_dir={cache}", "cache_size=3M"))
    for name, data in files.items():
        assert (mnt / name).read_bytes() == data
    for name, data in files.items():  # again, partly from disk, partly refetched
        assert pread(mnt / name, 2**19, 1000) == data[2**19:2**19 + 1000]
    mount.unmount(mnt)
    entries, volume = cache_entries(cache)
    assert volume <= 3 * 2**20 + 2 * BLOCK_SIZE, volume
    assert 0 < entries <= 12


def test_large_file_is_cached_sparsely(sftp_server, remote_dir, mount, tmp_path):
    big = remote_dir / "sparse.img"
    with open(big, "wb") as f:
        f.truncate(200 * 2**20)
        for off in (50 * 2**20, 120 * 2**20):
            f.seek(off)
            f.write(b"marker at %d" % off)
    os.utime(big, (OLD, OLD))
    cache = tmp_path / "cache"
    mnt = mount(opts=(f"cache_dir={cache}",))
    offsets = (50 * 2**20, 120 * 2**20, 7 * 2**20 + 123, 190 * 2**20)
    for off in offsets:  # a first random touch reads just those bytes...
        assert pread(mnt / "sparse.img", off, 4096) == pread(big, off, 4096)
    for off in offsets[:2]:  # ...a second one caches the block
        off += 300_000
        assert pread(mnt / "sparse.img", off, 4096) == pread(big, off, 4096)
    mount.unmount(mnt)
    entries, volume = cache_entries(cache)
    assert entries == 2, entries  # of 200
    assert volume < 3 * BLOCK_SIZE


def test_cache_directory_removed_while_mounted(sftp_server, remote_dir, mount, tmp_path):
    rng = random.Random(4)
    files = {f"f{i}.bin": rng.randbytes(700_000) for i in range(4)}
    for name, data in files.items():
        put(sftp_server, remote_dir / name, data)
    cache = tmp_path / "cache"
    # writeback=off: the write-back journal lives there too, and is not what this is about
    mnt = mount(opts=(f"cache_dir={cache}", "cache_timeout=1", "writeback=off"))
    assert (mnt / "f0.bin").read_bytes() == files["f0.bin"]
    time.sleep(0.5)
    shutil.rmtree(cache)
    for _ in range(2):
        for name, data in files.items():
            assert (mnt / name).read_bytes() == data
            assert pread(mnt / name, 300_000, 5000) == data[300_000:305_000]
        time.sleep(1.2)
    log = mount.log_text(mnt)
    assert len(warnings_in(log, "block cache")) == 1, log
    (blocks,) = cache.glob("*/blocks")  # re-created, private again
    assert (blocks / "cache.db").exists()
    assert stat.S_IMODE(blocks.stat().st_mode) == stat.S_IMODE(blocks.parent.stat().st_mode) == 0o700


def test_full_cache_disk_falls_back_to_the_server(sftp_server, remote_dir, mount, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    small = tmp_path / "smallcache"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    try:
        data = os.urandom(6 * 2**20)
        put(sftp_server, remote_dir / "f.bin", data)
        mnt = mount(opts=(f"cache_dir={small}", "cache_size=100M", "writeback=off"))
        for _ in range(2):
            assert (mnt / "f.bin").read_bytes() == data
            assert pread(mnt / "f.bin", 5 * 2**20, 10_000) == data[5 * 2**20:5 * 2**20 + 10_000]
        mount.unmount(mnt)  # blocks are written when reads pause, at the latest now
        log = mount.log_text(mnt)
        assert len(warnings_in(log, "block cache")) == 1, log
        assert "disk is full" in log
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


# ------------------------------------------------------------------ trees of small files


def test_copying_a_tree_fetches_each_file_once(sftp_server, remote_dir, mount, tmp_path):
    rng = random.Random(8)
    src = remote_dir / "tree"
    for d in ("a", "a/sub", "b", "c"):
        for i in range(25):
            put(sftp_server, src / d / f"file{i:02d}.txt", rng.randbytes(rng.randrange(1, 20_000)))
    put(sftp_server, src / "c" / "big.bin", rng.randbytes(3 * 2**20))
    cache = tmp_path / "cache"
    mnt = mount(opts=(f"cache_dir={cache}",))
    dest = tmp_path / "copy"
    subprocess.run(["rsync", "-rlt", f"{mnt}/tree/", f"{dest}/"], check=True, capture_output=True)
    r = subprocess.run(["diff", "-r", str(src), str(dest)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:]
    mount.unmount(mnt)
    st = read_stats(blocks_dir(cache))
    total = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    assert st["fetched_bytes"] == total  # prefetched or read: each byte once


def test_unreadable_files_in_a_prefetch_batch_spoil_only_themselves(sftp_server, remote_dir, mount,
                                                                   sftpfs_env, tmp_path):
    # The prefetcher opens many files with one send and reads them with the next:
    # a refused OPEN must cost only that file.
    rng = random.Random(9)
    src = remote_dir / "tree"
    for i in range(40):
        put(sftp_server, src / f"f{i:02d}", rng.randbytes(rng.randrange(1, 5000)))
    refused = {"f05", "f13", "f14"}
    for name in refused:
        (src / name).chmod(0)
    cache = tmp_path / "cache"
    mnt = mount(opts=(f"cache_dir={cache}",))
    # Two files read in name order start the prefetcher; each further one it predicted
    # doubles its window (8, 16, 32, 64 files: all 40). Pauses let every batch finish
    # before the next read, so that no read below races it.
    for name in ("f00", "f01", "f02", "f03", "f04"):
        (mnt / "tree" / name).read_bytes()
        time.sleep(0.5)
    dest = tmp_path / "copy"
    r = subprocess.run(["rsync", "-rlt", f"{mnt}/tree/", f"{dest}/"], capture_output=True, text=True)
    assert r.returncode == 23, r.stderr  # "some files could not be transferred"
    assert sorted(refused) == sorted(n for n in refused if n in r.stderr)
    readable = sorted(p for p in src.iterdir() if p.name not in refused)
    assert sorted(p.name for p in dest.iterdir()) == [p.name for p in readable]
    for p in readable:
        assert (dest / p.name).read_bytes() == p.read_bytes(), p.name
    # All but the two that started the walk came from the prefetcher.
    assert stats(mount, sftpfs_env, mnt)["files_prefetched"] == len(readable) - 2
    mount.unmount(mnt)
    assert read_stats(blocks_dir(cache))["fetched_bytes"] == sum(p.stat().st_size for p in readable)


# ------------------------------------------------------------------ sftpfs cache


def test_cache_info_and_clear(sftp_server, remote_dir, mount, sftpfs_env, tmp_path):
    data = os.urandom(1_000_000)
    put(sftp_server, remote_dir / "f.bin", data)
    cache = tmp_path / "cache"
    mnt = mount(opts=(f"cache_dir={cache}",))
    assert (mnt / "f.bin").read_bytes() == data
    mount.unmount(mnt)
    mnt = mount(opts=(f"cache_dir={cache}",))
    assert (mnt / "f.bin").read_bytes() == data  # from disk: hits
    r = sftpfs(sftpfs_env, "cache", "info", "-o", f"cache_dir={cache}")
    assert r.returncode == 0, r.stderr
    ident = blocks_dir(cache).parent.name
    assert f"{sftp_server.user}@127.0.0.1:{remote_dir}" in r.stdout
    assert ident in r.stdout and "1 entry" in r.stdout
    assert "hit rate  " in r.stdout and "hit rate  -" not in r.stdout
    # clear while mounted, by user@host:path: the mount just fetches again
    r = sftpfs(sftpfs_env, "cache", "clear", f"{sftp_server.user}@127.0.0.1:{remote_dir}",
               "--cache-dir", str(cache))
    assert r.returncode == 0 and "cleared" in r.stdout, r.stdout + r.stderr
    r = sftpfs(sftpfs_env, "cache", "info", "--cache-dir", str(cache))
    assert "0 entries" in r.stdout and "hit rate  -" in r.stdout, r.stdout
    put(sftp_server, remote_dir / "f.bin", data[::-1], OLD + 1)
    assert (mnt / "f.bin").read_bytes() in (data, data[::-1])  # kernel may keep a minute
    mount.unmount(mnt)
    r = sftpfs(sftpfs_env, "cache", "clear", ident[:8], "--cache-dir", str(cache))
    assert r.returncode == 0, r.stderr
    r = sftpfs(sftpfs_env, "cache", "clear", "nosuchhost:/x", "--cache-dir", str(cache))
    assert r.returncode == 1 and "no cache for" in r.stderr
    r = sftpfs(sftpfs_env, "cache", "info", "--cache-dir", str(tmp_path / "none"))
    assert r.returncode == 0 and "no cached remotes" in r.stdout


def test_closing_a_file_that_was_only_read_does_not_wait(sftp_server, remote_dir, mount, sftpfs_env):
    """Read-only opens are answered with FOPEN_NOFLUSH: close(2) sends no FLUSH.
    A writer's close still does, and still reports what failed."""
    put(sftp_server, remote_dir / "r", b"read me" * 1000)
    mnt = mount()
    before = stats(mount, sftpfs_env, mnt)["flushes"]
    for _ in range(5):
        with open(mnt / "r", "rb") as f:
            assert f.read() == b"read me" * 1000
    assert stats(mount, sftpfs_env, mnt)["flushes"] == before
    with open(mnt / "w", "wb") as f:
        f.write(b"written")
    assert stats(mount, sftpfs_env, mnt)["flushes"] == before + 1
