"""sftpfs against sshfs and rclone mount, side by side, over emulated latency.

    python -m benchmarks --rtt-ms 40 [--mbit 100] [--systems sftpfs,sshfs,rclone]
                         [--workloads 1,2,7] [--timeout 300] [--small] [--out bench-results]

Starts an SFTP-only sshd (tests/server.py) with the latency proxy in front of it,
generates the data set, runs every workload against every system one after the
other, checks each answer against the server's directory, and writes a markdown
table and JSON (see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pwd
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from . import reference, report
from .dataset import Dataset, Spec, change_some, generate
from .proxy import ProxyProcess, measure_link
from .session import Budget, Failed, Session, Skipped, Timeout
from .systems import ALL, Endpoint, MountError, mounts
from .verify import TreeComparer, files_equal
from .workloads import Result, Workload, select

REPO_ROOT = Path(__file__).resolve().parent.parent
T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--rtt-ms", type=float, default=40.0,
                    help="emulated round-trip time; 0 = no proxy, straight to sshd (presets: "
                         "0, 10, 40, 100)")
    ap.add_argument("--mbit", type=float, default=0.0,
                    help="bandwidth cap per direction in Mbit/s (0 = none)")
    ap.add_argument("--systems", default="sftpfs,sshfs,rclone",
                    help="comma-separated, in run order (default: %(default)s)")
    ap.add_argument("--workloads", default="all",
                    help="ids or names, e.g. 1,2,7 or 1-6 or find-cold,rsync-up (default: all)")
    ap.add_argument("--timeout", type=float, default=300.0,
                    help="seconds per workload, preparation and durability wait included")
    ap.add_argument("--small", action="store_true", help="tiny data set for a smoke run")
    ap.add_argument("--scale", type=float, default=1.0,
                    help="multiply the number of files, directories and the big file's size")
    ap.add_argument("--files", type=int, help="number of small files (overrides --scale)")
    ap.add_argument("--big-mib", type=int, help="size of the big file in MiB")
    ap.add_argument("--seed", type=int, help="data set seed")
    ap.add_argument("--out", type=Path, default=Path("bench-results"),
                    help="directory for the results (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run everything this many times, the systems' order alternating, and "
                         "report each time's median (at low RTT one run varies by 10-20%%)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    a = ap.parse_args(argv)
    if a.rtt_ms < 0 or a.mbit < 0 or a.timeout <= 0 or a.rounds < 1:
        ap.error("--rtt-ms and --mbit must be >= 0, --timeout > 0, --rounds >= 1")
    try:
        a.workload_list = select(a.workloads)
    except ValueError as e:
        ap.error(str(e))
    a.system_list = [s.strip() for s in a.systems.split(",") if s.strip()]
    unknown = [s for s in a.system_list if s not in ALL]
    if unknown:
        ap.error(f"unknown systems {unknown} (known: {', '.join(ALL)})")
    return a


def dataset_spec(a: argparse.Namespace) -> Spec:
    spec = Spec.small() if a.small else Spec.default().scaled(a.scale) if a.scale != 1 else Spec()
    if a.files:
        spec.files = a.files
        spec.dirs = max(1, a.files // 25)
    if a.big_mib:
        spec.big_size = a.big_mib << 20
    if a.seed is not None:
        spec.seed = a.seed
    return spec


def chown_to(server):
    """A recursive chown to the server's SFTP user (the server runs unprivileged)."""
    if hasattr(server, "chown"):
        return server.chown
    pw = pwd.getpwnam(server.user)

    def chown(p: Path) -> None:
        for dirpath, _, files in os.walk(p):
            os.lchown(dirpath, pw.pw_uid, pw.pw_gid)
            for f in files:
                os.lchown(os.path.join(dirpath, f), pw.pw_uid, pw.pw_gid)
    return chown


def publish_read_set(ds: Dataset, ro: Path, chown) -> None:
    """The read workloads' data on the server: ro/tree and ro/big.bin, owned by the user."""
    if ro.exists():
        shutil.rmtree(ro)
    ro.mkdir()
    shutil.copytree(ds.tree, ro / "tree", copy_function=shutil.copy2)
    shutil.copy2(ds.big, ro / "big.bin")
    chown(ro)


def read_set_intact(ds: Dataset, ro: Path) -> list[str]:
    problems = TreeComparer(ds.tree, ro / "tree").problems()
    if not files_equal(ds.big, ro / "big.bin"):
        problems.append("big.bin changed")
    return problems


def run_workload(s: Session, w: Workload, timeout: float) -> Result:
    r = Result()
    budget = Budget(timeout)
    try:
        w.run(s, budget, r)
    except Timeout as e:
        r.status, r.detail = "timeout", str(e)
        s.reset()
    except Failed as e:
        r.status, r.detail = "FAILED", str(e)
    except Skipped as e:
        r.status, r.detail = "skipped", str(e)
    except MountError as e:
        r.status, r.detail = "error", f"mount: {e}"
        s.reset()
    except Exception as e:  # a harness bug must not stop the other systems
        r.status, r.detail = "error", f"{type(e).__name__}: {e}"
        traceback.print_exc()
        s.reset()
    for phase in w.phases:
        r.seconds.setdefault(phase, None)
    s.history.append((w.id, r.status))
    return r


def _progress_line(system: str, w: Workload, r: Result) -> str:
    times = ", ".join(f"{p} {v:.2f} s" if v is not None else f"{p} -"
                      for p, v in r.seconds.items())
    line = f"  [{system}] {w.id:>2} {w.key:<20} {r.status:<8} {times}"
    return line + (f"  ({r.detail[:300]})" if r.detail else "")


def run_system(name: str, a, ds: Dataset, changed: Path, server, endpoint: Endpoint,
               work: Path, log: Path, doc: dict, round_: int = 0) -> None:
    system = ALL[name]
    if round_ == 0:
        doc["systems"][name] = {"version": "", "missing": None}
    info = doc["systems"][name]
    if info["missing"]:
        return
    missing = system.missing()
    if missing:
        info["missing"] = missing
        say(f"{name}: not run ({missing})")
        return
    info["version"] = system.version()
    say(f"{name}: {info['version']}" + (f" (round {round_ + 1} of {a.rounds})" if a.rounds > 1 else ""))
    (work / f"{name}-{round_}").mkdir()
    s = Session(system=system, endpoint=endpoint, server_root=server.root, data=ds,
                work=work / f"{name}-{round_}", log=log, chown=chown_to(server), changed=changed)
    runs = doc.setdefault("rounds", {}).setdefault(name, {})
    try:
        for w in a.workload_list:
            say(f"{name}: {w.id}. {w.describe(ds)} ...")
            r = run_workload(s, w, a.timeout)
            runs.setdefault(w.key, []).append(r.to_json())
            doc["results"].setdefault(name, {})[w.key] = report.combine(runs[w.key])
            say(_progress_line(name, w, r))
    finally:
        s.drop_mount()
        info.setdefault("mount_seconds", []).extend(round(t, 3) for t in s.mount_times)
        problems = read_set_intact(ds, s.server_dir("ro"))
        if problems:
            info["modified_read_set"] = problems
            say(f"{name}: WARNING the read-only data set on the server changed: {problems}")
            publish_read_set(ds, s.server_dir("ro"), chown_to(server))


def measure_references(a, ds: Dataset, ro: Path, endpoint: Endpoint, work: Path) -> dict:
    """Local-disk find and `sftp get`, for the workloads that are judged against them."""
    keys = {w.key for w in a.workload_list}
    refs: dict = {}
    try:
        if "find-warm" in keys:
            refs["local_find_s"] = round(reference.local_find(ds), 4)
            say(f"reference: find on local disk, warm: {refs['local_find_s']} s")
        if "read-cold" in keys:
            secs = reference.sftp_get(endpoint, ro / "big.bin", work / "sftp-get.bin",
                                      timeout=a.timeout)
            refs["sftp_get_s"] = round(secs, 3)
            refs["sftp_get_MB_per_s"] = round(ds.spec.big_size / 1e6 / secs, 1)
            say(f"reference: sftp get of the big file: {secs:.2f} s "
                f"({refs['sftp_get_MB_per_s']} MB/s)")
    except (OSError, subprocess.SubprocessError, RuntimeError) as e:
        refs["error"] = str(e)[-300:]
        say(f"reference measurement failed: {e}")
    return refs


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from tests.server import SftpServer  # the same sshd the tests use

    signal.signal(signal.SIGTERM, _interrupt)
    started = time.time()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(started))
    spec = dataset_spec(a)
    doc: dict = {
        "meta": {"started": time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(started)),
                 "started_epoch": started, "command": "python -m benchmarks "
                 + " ".join(shlex.quote(x) for x in (sys.argv[1:] if argv is None else argv)),
                 "rtt_ms": a.rtt_ms, "mbit": a.mbit, "timeout": a.timeout,
                 "machine": report.machine_info(), "link": {}, "dataset": {}},
        "workloads": [],
        "systems": {}, "results": {},
    }
    work = Path(tempfile.mkdtemp(prefix="sftpfs-bench-"))
    logs = a.out / "logs" / stamp
    logs.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        stack.callback(_remove_scratch, work, a.keep)
        try:
            say(f"scratch {work}; generating data set ({spec.files} files, "
                f"{spec.big_size >> 20} MiB big file)")
            ds = generate(work / "data", spec)
            doc["meta"]["dataset"] = ds.summary()
            doc["workloads"] = [{"id": w.id, "key": w.key, "title": w.describe(ds),
                                 "phases": list(w.phases)} for w in a.workload_list]
            changed = work / "changed"
            change_some(ds, changed)
            server = stack.enter_context(SftpServer(work / "client").start())
            say(f"sshd on 127.0.0.1:{server.port}, user {server.user}, root {server.root}")
            publish_read_set(ds, server.root / "ro", chown_to(server))
            port = server.port
            if a.rtt_ms or a.mbit:
                doc["meta"]["link"] = link = measure_link(a.rtt_ms, a.mbit)
                say(f"proxy check: {link}")
                port = stack.enter_context(ProxyProcess(server.port, a.rtt_ms, a.mbit)).port
                say(f"latency proxy on 127.0.0.1:{port} (RTT {a.rtt_ms:g} ms"
                    + (f", {a.mbit:g} Mbit/s)" if a.mbit else ")"))
            known_hosts = work / "known_hosts"
            known_hosts.write_text(server.known_hosts_line(port))
            endpoint = Endpoint(host="127.0.0.1", port=port, user=server.user,
                                key=Path(server.client_key), known_hosts=known_hosts)
            doc["references"] = measure_references(a, ds, server.root / "ro", endpoint, work)
            doc["meta"]["rounds"] = a.rounds
            for round_ in range(a.rounds):
                order = a.system_list if round_ % 2 == 0 else a.system_list[::-1]
                for name in order:
                    run_system(name, a, ds, changed, server, endpoint, work, logs / f"{name}.log",
                               doc, round_)
                    report.write(doc, a.out)
        except KeyboardInterrupt:
            say("interrupted: cleaning up, writing what was measured")
            doc["meta"]["interrupted"] = True
    doc["meta"]["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %z")
    json_path, md_path = report.write(doc, a.out)
    print(report.render_markdown(doc))
    say(f"wrote {json_path}, {md_path} (and latest.json / latest.md); logs in {logs}")
    return 130 if doc["meta"].get("interrupted") else 0


def _interrupt(*_) -> None:
    raise KeyboardInterrupt  # so that every mount, the proxy and sshd are cleaned up


def _remove_scratch(work: Path, keep: bool) -> None:
    """Remove the scratch directory, but never recurse into a mount left behind."""
    left = [m for m in mounts() if m.startswith(str(work) + "/")]
    if left:
        say(f"WARNING: still mounted, scratch left in place: {left}")
        return
    if keep:
        say(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
