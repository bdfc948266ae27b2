"""Reference points measured in the same run: what the criteria compare against.

* ``find`` over the same tree on local disk, warm: the floor a warm find
  through any FUSE mount is measured against.
* OpenSSH's own ``sftp get`` of the big file over the same link: the rate a
  cold sequential read through a mount is measured against.

Both are taken the way the workloads take theirs (a fresh process, wall clock
from start to exit), as the median of a few runs.
"""

from __future__ import annotations

import statistics
import subprocess
import time
from pathlib import Path

from .dataset import Dataset
from .systems import Endpoint, clean_env
from .verify import FIND_FORMAT

RUNS = 5
GET_RUNS = 3


def _timed(args: list[str], timeout: float, data: bytes | None = None) -> float:
    t0 = time.monotonic()
    subprocess.run(args, input=data, stdin=subprocess.DEVNULL if data is None else None,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=True, timeout=timeout,
                   env=clean_env(LC_ALL="C"))
    return time.monotonic() - t0


def local_find(ds: Dataset, timeout: float = 60) -> float:
    """Median seconds of a warm ``find -printf`` over the local copy of the tree."""
    args = ["find", str(ds.root / "tree"), "-printf", FIND_FORMAT]
    _timed(args, timeout)  # warm the local caches, as workload 2 is warm
    return statistics.median(_timed(args, timeout) for _ in range(RUNS))


def sftp_get(ep: Endpoint, remote: Path, dest: Path, timeout: float = 300) -> float:
    """Median seconds of OpenSSH ``sftp`` fetching `remote` over the endpoint (the proxy)."""
    args = ["sftp", "-q", "-b", "-", "-P", str(ep.port), "-i", str(ep.key),
            "-o", f"UserKnownHostsFile={ep.known_hosts}", "-o", "StrictHostKeyChecking=yes",
            "-o", "BatchMode=yes", f"{ep.user}@{ep.host}"]
    batch = f'get "{remote}" "{dest}"\n'.encode()
    times = []
    for _ in range(GET_RUNS):
        dest.unlink(missing_ok=True)
        # the connection set-up is not part of a transfer: time it alone and subtract
        setup = _timed(args, timeout, b"pwd\n")
        whole = _timed(args, timeout, batch)
        times.append(max(whole - setup, 1e-3))
    if dest.stat().st_size != remote.stat().st_size:  # the server's files are local here
        raise RuntimeError(f"sftp get of {remote}: wrong size")
    dest.unlink()
    return statistics.median(times)
