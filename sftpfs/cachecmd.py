"""`sftpfs cache info` and `sftpfs cache clear [REMOTE]`: the block caches on disk.

Each remote tree has a private directory under the cache home (named by a
hash; `remote.txt` inside says which remote). Its `blocks/` subdirectory is
the block cache (blocks.py). Both commands work while the remote is mounted:
diskcache is safe across processes, and a mount whose blocks are cleared just
misses and fetches again. Only cached file contents are cleared, never the
write-back journal or anything else the mount needs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from . import runtime
from .options import OptionError, parse_source
from .vfs import epochlog
from .vfs.blocks import STATS_FILE, format_size, read_stats


@dataclass
class CacheDir:
    path: Path
    user: str
    host: str
    port: str
    root: str

    @property
    def ident(self) -> str:
        return self.path.name

    @property
    def remote(self) -> str:
        port = "" if self.port in ("", "22") else f" (port {self.port})"
        return f"{self.user}@{self.host}:{self.root}{port}"


def cache_dirs(base: Path) -> list[CacheDir]:
    out = []
    try:
        entries = sorted(base.iterdir())
    except OSError:
        return []
    for d in entries:
        try:
            label = (d / "remote.txt").read_bytes().rstrip(b"\n").decode("utf-8", "replace")
        except OSError:
            continue
        # user@host:port:/root (the root is absolute; a v6 host has colons too)
        i = label.find(":/")
        if i < 0:
            continue
        userhost, _, port = label[:i].rpartition(":")
        root = label[i + 1:]
        user, _, host = userhost.rpartition("@")
        out.append(CacheDir(d, user, host, port, root))
    return out


def _parser() -> argparse.ArgumentParser:
    class P(argparse.ArgumentParser):
        def error(self, message: str):  # type: ignore[override]
            raise OptionError(f"{message} (see sftpfs cache --help)")

    ap = P(prog="sftpfs cache", description="Show or clear cached file contents.")
    ap.add_argument("action", choices=("info", "clear"))
    ap.add_argument("remote", nargs="?", metavar="REMOTE",
                    help="user@host:path or the cache id shown by `sftpfs cache info`")
    ap.add_argument("--cache-dir", metavar="DIR", help="cache directory, as -o cache_dir=DIR")
    ap.add_argument("-o", dest="options", action="append", default=[], metavar="cache_dir=DIR")
    return ap


def _base(args: argparse.Namespace) -> Path:
    base = args.cache_dir
    for opt in ",".join(args.options).split(","):
        key, _, value = opt.partition("=")
        if key == "cache_dir" and value:
            base = value
        elif opt:
            raise OptionError(f"sftpfs cache takes only -o cache_dir=DIR, not '{opt}'")
    return Path(os.path.expanduser(base)) if base else runtime.cache_home()


def select(dirs: list[CacheDir], spec: str) -> list[CacheDir]:
    """The cache directories REMOTE names: an id (or a unique prefix of one), or user@host:path."""
    by_id = [d for d in dirs if d.ident.startswith(spec)] if len(spec) >= 4 else []
    if by_id:
        return by_id
    try:
        user, host, path = parse_source(spec)
    except OptionError:
        raise OptionError(f"'{spec}' is neither a cache id nor [user@]host:path") from None
    path = path.rstrip("/") or ("/" if path.startswith("/") else "")
    out = []
    for d in dirs:
        if d.host != host or (user is not None and d.user != user):
            continue
        root = d.root.rstrip("/") or "/"
        # A relative path is relative to the login directory, which only the server knows.
        if path.startswith("/") and root == path or not path.startswith("/") and (
                not path or root.endswith("/" + path)):
            out.append(d)
    return out


def _blocks_info(d: Path) -> tuple[int, int, int | None]:
    """(bytes, entries, size limit) of a block cache directory."""
    import diskcache

    if not (d / "cache.db").exists():
        return 0, 0, None
    with diskcache.Cache(str(d), timeout=5) as c:
        return c.volume(), len(c), int(c.size_limit)


def cmd_info(base: Path, dirs: list[CacheDir]) -> int:
    if not dirs:
        print(f"no cached remotes in {base}")
        return 0
    print(f"cache directory: {base}")
    for cd in dirs:
        blocks = cd.path / "blocks"
        try:
            size, entries, limit = _blocks_info(blocks)
        except Exception as e:  # noqa: BLE001 - a damaged cache is reported, not fatal
            print(f"\n{cd.remote}\n  id        {cd.ident}\n  blocks    unreadable ({e})")
            continue
        st = read_stats(blocks)
        hit, fetched = st.get("hit_bytes", 0), st.get("fetched_bytes", 0)
        rate = f"{100 * hit / (hit + fetched):.1f}%" if hit + fetched else "-"
        total = _du(cd.path)
        print(f"\n{cd.remote}")
        print(f"  id        {cd.ident}")
        print(f"  blocks    {format_size(size)} in {entries} {'entry' if entries == 1 else 'entries'}"
              + (f" (limit {format_size(limit)})" if limit else ""))
        print(f"  hit rate  {rate}  (read from cache {format_size(hit)}, "
              f"from the server {format_size(fetched)}; {st.get('hits', 0)} hits, "
              f"{st.get('misses', 0)} misses)")
        print(f"  on disk   {format_size(total)} (blocks, listings and journal)")
    return 0


def _du(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_blocks * 512
            except OSError:
                pass
    return total


def clear_blocks(blocks: Path) -> int:
    """Empty a block cache (also while mounted); returns the bytes freed."""
    import diskcache

    freed = 0
    if (blocks / "cache.db").exists():
        with diskcache.Cache(str(blocks), timeout=10) as c:
            freed = c.volume()
            c.clear(retry=True)
    if (blocks / "epochs").exists():
        # Epochs only matter while blocks of older versions exist: none do now.
        idx = diskcache.Index(str(blocks / "epochs"))
        idx.clear()
        idx.cache.close()
    _records, dead_logs = epochlog.recover(blocks)  # a crashed mount's epochs: no longer needed
    epochlog.release(dead_logs, done=True)
    (blocks / STATS_FILE).unlink(missing_ok=True)
    return freed


def cmd_clear(base: Path, dirs: list[CacheDir], spec: str | None) -> int:
    chosen = dirs if spec is None else select(dirs, spec)
    if spec is not None and not chosen:
        print(f"sftpfs: no cache for '{spec}' in {base} (see: sftpfs cache info)", file=sys.stderr)
        return 1
    if spec is not None and len(chosen) > 1:
        print(f"sftpfs: '{spec}' matches several cached remotes; name one by its id:",
              file=sys.stderr)
        for cd in chosen:
            print(f"  {cd.ident}  {cd.remote}", file=sys.stderr)
        return 1
    for cd in chosen:
        try:
            freed = clear_blocks(cd.path / "blocks")
        except Exception as e:  # noqa: BLE001 - unreadable: remove the directory instead
            shutil.rmtree(cd.path / "blocks", ignore_errors=True)
            print(f"{cd.remote}: block cache was unreadable ({e}); removed")
            continue
        print(f"{cd.remote}: cleared {format_size(freed)} of cached file contents")
    if not chosen:
        print(f"no cached remotes in {base}")
    return 0


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    base = _base(args)
    dirs = cache_dirs(base)
    if args.action == "info":
        if args.remote is not None:
            dirs = select(dirs, args.remote)
        return cmd_info(base, dirs)
    return cmd_clear(base, dirs, args.remote)
