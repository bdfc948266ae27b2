"""Smoke test of the benchmark harness: one tiny workload through the latency proxy.

Checks that ``python -m benchmarks`` runs end to end and writes its JSON with a
correct (verified, not FAILED) result; timings never gate.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _missing() -> str | None:
    if not (os.access("/usr/sbin/sshd", os.X_OK) or shutil.which("sshd")):
        return "sshd not installed"
    if not os.path.exists("/dev/fuse") or not shutil.which("fusermount3"):
        return "FUSE not available"
    return None


def _bench_mounts() -> set[str]:
    """Mounts under the harness's scratch directories (others' tests may mount meanwhile)."""
    with open("/proc/self/mountinfo") as f:
        return {m for m in (line.split()[4] for line in f) if "/sftpfs-bench-" in m}


@pytest.mark.timeout(240)
def test_bench_smoke(tmp_path: Path) -> None:
    why = _missing()
    if why and os.environ.get("CI") != "true":
        pytest.skip(why)
    systems = ["sftpfs"] + (["sshfs"] if shutil.which("sshfs") else [])
    out = tmp_path / "results"
    before = _bench_mounts()
    r = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--small", "--rtt-ms", "10", "--workloads", "1",
         "--systems", ",".join(systems), "--timeout", "60", "--out", str(out), "--rounds", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=200,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert _bench_mounts() <= before, "the harness left a mount behind"

    doc = json.loads((out / "latest.json").read_text())
    assert (out / "latest.md").read_text().startswith("# sftpfs benchmark")
    assert doc["meta"]["rtt_ms"] == 10
    assert doc["meta"]["link"]["rtt_ms_median"] >= 9  # the proxy really delays
    for name in systems:
        res = doc["results"][name]["find-cold"]
        assert res["status"] == "ok", f"{name}: {res['status']}: {res['detail']}\n{r.stderr[-2000:]}"
        assert res["seconds"]["time"] > 0
        rounds = [r["seconds"]["time"] for r in doc["rounds"][name]["find-cold"]]
        assert len(rounds) == 2 and res["seconds"]["time"] == pytest.approx(sum(rounds) / 2)
    assert "median of 2 rounds" in (out / "latest.md").read_text()


def test_rounds_combine_to_medians_and_keep_failures() -> None:
    from benchmarks.report import combine

    def run(status: str, t: float | None, d: float | None) -> dict:
        return {"status": status, "seconds": {"returns": t, "durable": d}, "detail": status,
                "extra": {}}

    got = combine([run("ok", 3.0, 5.0), run("ok", 1.0, 9.0), run("ok", 2.0, 7.0)])
    assert got["status"] == "ok" and got["seconds"] == {"returns": 2.0, "durable": 7.0}
    assert len(got["rounds"]) == 3
    got = combine([run("ok", 1.0, 2.0), run("timeout", 4.0, None)])
    assert got["status"] == "timeout" and got["detail"] == "timeout"
    assert got["seconds"] == {"returns": 2.5, "durable": 2.0}
