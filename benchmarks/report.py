"""The results as a markdown table (seconds per system, ratios peer/sftpfs) and JSON,
with what is needed to judge them: versions, kernel, CPU, python, RTT, bandwidth."""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

BASELINE = "sftpfs"
NOT_RUN = "n/a"


def machine_info() -> dict:
    cpu, cores = "unknown", os.cpu_count()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"kernel": platform.release(), "cpu": cpu, "cores": cores,
            "python": sys.version.split()[0], "os": _os_name(),
            "tools": {t: _tool_version(t) for t in ("rsync", "file", "find", "fusermount3")}}


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.platform()


def _tool_version(tool: str) -> str:
    if not shutil.which(tool):
        return "missing"
    try:
        r = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    lines = (r.stdout or r.stderr).strip().splitlines()
    return lines[0] if lines else "unknown"


def combine(runs: list[dict]) -> dict:
    """One workload's rounds as one result: each phase's median; not ok if any round was not
    (its status and detail); every round's seconds kept under "rounds"."""
    bad = next((r for r in runs if r["status"] != "ok"), None)
    first = bad or runs[0]
    seconds = {}
    for phase in runs[0]["seconds"]:
        values = sorted(v for r in runs if (v := r["seconds"].get(phase)) is not None)
        seconds[phase] = statistics.median(values) if values else None
    out = {"status": first["status"], "seconds": seconds, "detail": first["detail"],
           "extra": first["extra"]}
    if len(runs) > 1:
        out["rounds"] = [r["seconds"] for r in runs]
    return out


def _fmt_seconds(s: float) -> str:
    return f"{s:.3f}" if s < 1 else f"{s:.2f}" if s < 10 else f"{s:.1f}"


def _cell(res: dict | None, phase: str) -> str:
    if res is None:
        return NOT_RUN
    secs = res["seconds"].get(phase)
    if res["status"] == "ok":
        return _fmt_seconds(secs) if secs is not None else "?"
    if res["status"] == "timeout" and secs is not None:
        return _fmt_seconds(secs)  # this phase finished; a later one ran out of time
    if res["status"] == "FAILED" and secs is not None:
        return f"FAILED ({_fmt_seconds(secs)})"  # a wrong answer's time, for the record
    return res["status"]


def _ratio(peer: dict | None, base: dict | None, phase: str, timeout: float) -> str:
    if not peer or not base or base["status"] != "ok":
        return ""
    b = base["seconds"].get(phase)
    p = peer["seconds"].get(phase)
    if not b:
        return ""
    if peer["status"] == "ok" and p is not None:
        return _fmt_ratio(p / b)
    if peer["status"] == "timeout" and p is None:
        return f"> {_fmt_ratio(timeout / b)}"
    return ""


def _fmt_ratio(x: float) -> str:
    return f"{x:.0f}×" if x >= 100 else f"{x:.1f}×" if x >= 0.1 else f"{x:.2g}×"


def _mount_row(doc: dict, systems: list[str], peers: list[str]) -> str:
    """Median time to mount (until the first stat of the root answers), all mounts."""
    med = {}
    for s in systems:
        times = sorted(doc["systems"][s].get("mount_seconds") or [])
        if times:
            med[s] = times[len(times) // 2]
    row = ["mount (median of all mounts)"] + [_fmt_seconds(med[s]) if s in med else NOT_RUN
                                              for s in systems]
    row += [_fmt_ratio(med[p] / med[BASELINE]) if p in med and med.get(BASELINE) else ""
            for p in peers]
    return "| " + " | ".join(row) + " |"


def _reference_lines(doc: dict, systems: list[str]) -> list[str]:
    """The same run's local-disk find and `sftp get`, and each system measured against them."""
    refs = doc.get("references") or {}
    out: list[str] = []

    def seconds(system: str, key: str) -> float | None:
        res = doc["results"].get(system, {}).get(key)
        return res["seconds"].get("time") if res and res["status"] == "ok" else None

    if refs.get("local_find_s"):
        local = refs["local_find_s"]
        vs = [f"{s} {t / local:.1f}×" for s in systems if (t := seconds(s, "find-warm"))]
        out.append(f"- `find -printf` over the same tree on local disk, warm: {_fmt_seconds(local)} s"
                   + (f" — workload 2 takes {', '.join(vs)} as long" if vs else ""))
    if refs.get("sftp_get_s"):
        get = refs["sftp_get_s"]
        vs = [f"{s} {100 * get / t:.0f} %" for s in systems if (t := seconds(s, "read-cold"))]
        out.append(f"- OpenSSH `sftp get` of the big file over the same link: {_fmt_seconds(get)} s "
                   f"({refs['sftp_get_MB_per_s']} MB/s)"
                   + (f" — workload 3 reads at {', '.join(vs)} of its rate" if vs else ""))
    if refs.get("error"):
        out.append(f"- reference measurement failed: {refs['error']}")
    return ["", "Reference points, same run:", "", *out] if out else []


def render_markdown(doc: dict) -> str:
    meta, systems = doc["meta"], list(doc["systems"])
    peers = [s for s in systems if s != BASELINE] if BASELINE in systems else []
    rtt = meta["rtt_ms"]
    link = meta.get("link") or {}
    measured = f" (measured ping-pong {link['rtt_ms_median']} ms)" if "rtt_ms_median" in link else ""
    lines = [
        f"# sftpfs benchmark — RTT {rtt:g} ms{', ' + str(meta['mbit']) + ' Mbit/s' if meta['mbit'] else ''}",
        "",
        f"{meta['started']}; `{meta['command']}`",
        "",
        f"- link: RTT {rtt:g} ms{measured}, "
        f"bandwidth {str(meta['mbit']) + ' Mbit/s per direction' if meta['mbit'] else 'uncapped'}"
        + ("" if rtt else " (no proxy: direct to sshd)"),
        f"- data: {meta['dataset']['files']} files in {meta['dataset']['dirs']} directories, "
        f"{meta['dataset']['tree_bytes'] / 1e6:.1f} MB; big file {meta['dataset']['big_bytes'] >> 20} MiB",
        f"- time-out per workload: {meta['timeout']:g} s",
        f"- machine: {meta['machine']['cpu']} × {meta['machine']['cores']}, kernel "
        f"{meta['machine']['kernel']}, {meta['machine']['os']}, Python {meta['machine']['python']}",
    ]
    for name, info in doc["systems"].items():
        lines.append(f"- {name}: {info.get('version') or ''}"
                     + (f" — not run: {info['missing']}" if info.get("missing") else ""))
    rounds = meta.get("rounds", 1)
    lines += ["", "Seconds (lower is better); ratio = peer time / sftpfs time "
              "(above 1× means sftpfs is faster)."
              + (f" Each time is the median of {rounds} rounds, the systems taking turns to go "
                 "first." if rounds > 1 else ""), ""]
    header = ["workload", *systems, *[f"{p}/{BASELINE}" for p in peers]]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    notes: list[str] = []
    for w in doc["workloads"]:
        for phase in w["phases"]:
            label = f"{w['id']}. {w['title']}" + (f" — {phase}" if phase != "time" else "")
            row = [label]
            for s in systems:
                res = doc["results"].get(s, {}).get(w["key"])
                cell = _cell(res, phase)
                if res and res["status"] not in ("ok",) and res.get("detail") and phase == w["phases"][0]:
                    notes.append(f"{s}, workload {w['id']} ({res['status']}): {res['detail']}")
                    cell += f" [{len(notes)}]"
                elif res and res["status"] == "ok" and res.get("detail") and phase == w["phases"][0]:
                    notes.append(f"{s}, workload {w['id']}: {res['detail']}")
                    cell += f" [{len(notes)}]"
                row.append(cell)
            base = doc["results"].get(BASELINE, {}).get(w["key"])
            for p in peers:
                row.append(_ratio(doc["results"].get(p, {}).get(w["key"]), base, phase,
                                  meta["timeout"]))
            lines.append("| " + " | ".join(row) + " |")
    lines.append(_mount_row(doc, systems, peers))
    lines += _reference_lines(doc, systems)
    if notes:
        lines += ["", "Notes:", ""]
        lines += [f"{i}. {n}" for i, n in enumerate(notes, 1)]
    return "\n".join(lines) + "\n"


def write(doc: dict, out_dir: Path) -> tuple[Path, Path]:
    """Write timestamped JSON and markdown, latest.json / latest.md, and
    latest-rtt<ms>.json / .md (so runs at different RTTs do not replace each
    other's latest); returns the timestamped pair."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(doc["meta"]["started_epoch"]))
    base = f"bench-{stamp}-rtt{doc['meta']['rtt_ms']:g}"
    json_path, md_path = out_dir / f"{base}.json", out_dir / f"{base}.md"
    text = json.dumps(doc, indent=2, sort_keys=False) + "\n"
    md = render_markdown(doc)
    rtt = f"latest-rtt{doc['meta']['rtt_ms']:g}"
    for path, content in ((json_path, text), (md_path, md),
                          (out_dir / "latest.json", text), (out_dir / "latest.md", md),
                          (out_dir / f"{rtt}.json", text), (out_dir / f"{rtt}.md", md)):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(content)
        os.replace(tmp, path)
    return json_path, md_path
