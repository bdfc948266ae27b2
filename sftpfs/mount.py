"""Mount lifecycle: connect, mount, serve until unmounted.

Every failure before the mount is up is a MountError (see preflight.py) whose
text is the one line the user sees. `ready` is called once the kernel mount
exists, so the command line can detach only when the mount is usable.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import pyfuse3
import trio

from . import openreply, runtime
from .control import control_path
from .controlserver import ControlHandler, LabelledHandler, ReadOnlyHandler, serve_control
from .fs import Operations, Presentation
from .options import MountConfig
from .preflight import MountError
from .remote.client import Remote
from .remote.handshake import Handshake
from .remote.protocol import Attrs
from .remote.sftp import SftpSession
from .remote.ssh import SshError, Target, connect
from .vfs.readahead import ReadOptions
from .vfs.vfs import Vfs

log = logging.getLogger(__name__)

async def open_remote(cfg: MountConfig, handshake: Handshake | None = None
                      ) -> tuple[Remote, bytes, Attrs, Target]:
    """Connect (or finish `handshake`, begun with cfg.ssh) and resolve the remote
    root; errors become MountError."""
    ssh_opts = cfg.ssh
    targets: list[Target] = []

    async def new_session() -> SftpSession:
        nonlocal handshake
        channel = None
        if handshake is not None:
            first, handshake = handshake, None
            transport, target, channel = await trio.to_thread.run_sync(first.result)
        else:
            transport, target = await trio.to_thread.run_sync(connect, ssh_opts)
        targets.append(target)
        return await SftpSession.start(transport, request_timeout=cfg.timeout, channel=channel)

    try:
        session = await new_session()
    except SshError as e:
        raise MountError(str(e)) from None
    except OSError as e:
        raise MountError(f"cannot start SFTP on {cfg.host}: {e.strerror or e}") from None
    # Reconnects happen unattended: never prompt for a password or passphrase again.
    ssh_opts.batch_mode = True
    remote = Remote(new_session, session)
    want = cfg.remote_path or "."
    try:
        root, a = await remote.realpath_and_stat(os.fsencode(want))
    except OSError as e:
        if e.errno == errno.ENOENT:
            raise MountError(f"remote path '{want}' does not exist on {cfg.host}") from None
        raise MountError(f"remote path '{want}' on {cfg.host}: {e.strerror}") from None
    if not a.is_dir:
        raise MountError(f"remote path '{want}' on {cfg.host} is not a directory")
    return remote, root, a, targets[0]


def cache_dir_for(cfg: MountConfig, target: Target, root: bytes) -> Path:
    base = cfg.cache_dir or runtime.cache_home()
    try:
        return runtime.remote_cache_dir(runtime.private_dir(base), target.user,
                                        target.hostname, target.port, root)
    except OSError as e:
        raise MountError(f"cache directory {base}: {e.strerror or e}") from None


async def serve(cfg: MountConfig, ready: Callable[[], None],
                handshake: Handshake | None = None) -> None:
    remote, root, root_attrs, target = await open_remote(cfg, handshake)
    cache_dir = cache_dir_for(cfg, target, root)
    vfs = Vfs(remote, root, meta_ttl=cfg.cache_timeout, readonly=cfg.readonly, cache_dir=cache_dir,
              max_stale=cfg.cache_max_stale, prefetch=cfg.prefetch,
              reads=ReadOptions(cache_size=cfg.cache_size, readahead_max=cfg.readahead_max,
                                small_file=cfg.small_file))
    vfs.meta.put_attrs(b"", root_attrs)  # the first stat of the mount costs no round trip
    if cfg.writeback and not cfg.readonly:
        await _enable_writeback(cfg, vfs, cache_dir)
    show = Presentation(attr_timeout=cfg.attr_timeout, entry_timeout=cfg.entry_timeout,
                        negative_timeout=cfg.negative_timeout, uid=cfg.uid, gid=cfg.gid,
                        umask=cfg.umask, kernel_dircache=cfg.kernel_dircache)
    openreply.install()
    ops = Operations(vfs, show)
    ops.after_init = lambda: _set_kernel_readahead(cfg)
    try:
        pyfuse3.init(ops, str(cfg.mountpoint), cfg.fuse_options())
    except RuntimeError as e:
        remote.close()
        raise MountError(f"cannot mount on {cfg.mountpoint}: {e}") from None
    log.info("mounted %s on %s", cfg.source, cfg.mountpoint)
    unmounted = False
    try:
        async with trio.open_nursery() as n:
            await n.start(vfs.run)
            n.start_soon(_stop_on_signal)
            n.start_soon(_stats_on_signal, ops)
            await _start_control(n, cfg, control_handler(cfg, vfs, ops))
            ready()
            await pyfuse3.main(min_tasks=8, max_tasks=64)
            unmounted = True
            await _flush_at_exit(cfg, vfs)
            n.cancel_scope.cancel()
    finally:
        remote.close()
        if vfs.lister.store is not None:
            vfs.lister.store.close()
        if vfs.deferred is not None:
            vfs.deferred.wb.close()
        pyfuse3.close(unmount=not unmounted)
        log.info("unmounted %s", cfg.mountpoint)


def _set_kernel_readahead(cfg: MountConfig) -> None:
    """Let the kernel read ahead a block at a time instead of 128 KiB: a sequential
    reader then costs an eighth of the FUSE requests (cold 64 MiB read at 0 ms, 10
    alternated runs: median 0.313 -> 0.267 s). The setting is per mount, in sysfs,
    and only root may write it; for anyone else the kernel's default stays."""
    if not cfg.kernel_readahead:
        return
    dev = runtime.mount_device(cfg.mountpoint)
    if dev is None:
        return
    path = f"/sys/class/bdi/{dev}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(f"{max(1, cfg.kernel_readahead // 1024)}\n")
    except OSError as e:
        log.debug("kernel read-ahead stays at its default (%s: %s)", path, e.strerror or e)


async def _enable_writeback(cfg: MountConfig, vfs: Vfs, cache_dir: Path) -> None:
    limit = cfg.dirty_limit
    if limit is None:
        free = shutil.disk_usage(cache_dir).free
        limit = max(64 << 20, min(4 << 30, free // 4))
    try:
        vfs.enable_writeback(delay=cfg.writeback_delay, dirty_limit=limit,
                             stall_timeout=cfg.timeout)
    except OSError as e:
        raise MountError(f"write-back journal in {cache_dir}: {e.strerror or e}") from None


async def _flush_at_exit(cfg: MountConfig, vfs: Vfs) -> None:
    """After the kernel unmount: upload what is still pending, for a while."""
    if vfs.deferred is None:
        return
    wb = vfs.deferred.wb
    if not wb.status()["pending_ops"]:
        return
    log.warning("unmounted with %d changes pending: uploading them", wb.status()["pending_ops"])
    with trio.move_on_after(cfg.flush_timeout) as scope:
        await wb.sync_all()
    if scope.cancelled_caught:
        log.warning("%d changes are still pending after %.0f s; they stay in the journal and "
                    "are uploaded at the next mount", wb.status()["pending_ops"], cfg.flush_timeout)


def control_handler(cfg: MountConfig, vfs: Vfs, ops: Operations) -> ControlHandler:
    """What `sftpfs sync/status` talk to: the write-back layer's handler, or without
    write-back (-o writeback=off, ro) a read-only one (nothing pending, sync returns
    at once)."""
    inner = vfs.control_handler() or ReadOnlyHandler(
        connected=lambda: vfs.remote.connected, stats=ops.stats)
    return LabelledHandler(inner, remote=cfg.source, mountpoint=str(cfg.mountpoint),
                           stats=ops.stats)


async def _start_control(n: trio.Nursery, cfg: MountConfig, handler: ControlHandler) -> None:
    """Serve the control socket (removed when the nursery ends). A socket that cannot
    be made costs `sftpfs sync/status`, not the mount."""
    path = control_path(cfg.mountpoint)
    try:
        await n.start(serve_control, path, handler)
    except OSError as e:
        log.warning("cannot serve control socket %s (%s): sftpfs sync and status will "
                    "not work for this mount", path, e.strerror or e)


async def _stats_on_signal(ops: Operations) -> None:
    """SIGUSR1 logs one line of counters: what the daemon holds and has done."""
    with trio.open_signal_receiver(signal.SIGUSR1) as signals:
        async for _ in signals:
            log.warning("stats: %s", " ".join(f"{k}={v}" for k, v in ops.stats().items()))


async def _stop_on_signal() -> None:
    """SIGTERM/SIGINT end the session cleanly (the kernel mount is removed)."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for sig in signals:
            log.info("received signal %d, unmounting", sig)
            pyfuse3.terminate()
            return
