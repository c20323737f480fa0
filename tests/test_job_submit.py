"""`ray job submit --working-dir . -- python -m cluster.launch conf/tiny_cpu.yaml` on a private loopback cluster.

The cluster is started with `ray start --head --block` from the venv (so a job's `python` is the venv's)
with HOME pointing at a temporary home that holds the tiny checkpoint at the path conf/tiny_cpu.yaml
names (~/.cache/...). It is stopped by ending the processes this test started, not by `ray stop`, which
would stop every Ray instance on the machine (other test sessions' included).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.ray_helpers import CONTRACT_FIELDS, REPO, free_port, tiny_model, wait_for

VENV_BIN = Path(sys.executable).parent
AGENT_WAIT_S = 120  # the job agent can start well after the dashboard answers on a loaded machine


def _ours(marker: str) -> list[int]:
    """Pids of processes whose command line names `marker` (this test's private temp dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


@pytest.fixture(scope="module")
def job_cluster(tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("home")
    shutil.copytree(tiny_model(), home / ".cache" / "qwen2_5_vl_ray" / "tiny-qwen2.5-vl")
    temp_dir = tempfile.mkdtemp(prefix="rayjob-", dir="/tmp")  # short: Ray's socket paths must fit
    dashboard = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="disabled", HOME=str(home), PATH=f"{VENV_BIN}:{env.get('PATH', '')}")
    head = subprocess.Popen(
        [
            str(VENV_BIN / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={free_port()}",
            "--num-cpus=4",
            "--node-ip-address=127.0.0.1",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--ray-client-server-port={free_port()}",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
        ],
        env=env,
        cwd=home,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"

    def up() -> bool:
        try:
            with urllib.request.urlopen(f"{address}/api/version", timeout=2):
                return True
        except OSError:
            return head.poll() is not None  # stop waiting if it died

    try:
        assert wait_for(up, timeout_s=120, interval_s=0.5) and head.poll() is None, "ray start --head failed"
        yield {"address": address, "env": env, "temp_dir": Path(temp_dir), "home": home}
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        for pid in _ours(temp_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(cluster: dict, *entrypoint: str) -> subprocess.CompletedProcess:
    """`ray job submit`, retried (bounded) while the head's job agent is still starting."""
    cmd = [
        str(VENV_BIN / "ray"),
        "job",
        "submit",
        "--address",
        cluster["address"],
        "--working-dir",
        str(REPO),
        "--",
        *entrypoint,
    ]
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        proc = subprocess.run(cmd, env=cluster["env"], cwd=REPO, capture_output=True, text=True, timeout=420)
        if "No available agent" not in proc.stderr + proc.stdout or time.monotonic() > deadline:
            return proc
        time.sleep(2)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_working_dir_leaves_out_ignored_paths_and_uses_the_venv(job_cluster):
    probe = (
        "import os, sys; print('PROBE', os.path.exists('.venv'), os.path.exists('outputs'), "
        "os.path.exists('cluster/launch.py'), sys.prefix)"
    )
    proc = _submit(job_cluster, "python", "-c", probe)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("PROBE"))
    assert line.split()[1:4] == ["False", "False", "True"], line
    assert Path(line.split()[4]).resolve() == Path(sys.prefix).resolve(), line


def test_job_with_overrides(job_cluster, tmp_path):
    output = tmp_path / "results.jsonl"
    proc = _submit(
        job_cluster,
        "python",
        "-m",
        "cluster.launch",
        "conf/tiny_cpu.yaml",
        f"output_path={output}",
        "data_config.max_new_tokens=4",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = _records(output)
    assert records and all(set(CONTRACT_FIELDS) <= set(r) and r["error"] is None for r in records)
    assert all(len(r["output_token_ids"]) == 4 or r["output_token_ids"][-1:] for r in records)
    assert "Successful requests" in proc.stdout


def test_unchanged_command(job_cluster):
    started = time.time()
    proc = _submit(job_cluster, "python", "-m", "cluster.launch", "conf/tiny_cpu.yaml")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # The job ran in its unpacked working dir under the cluster's temp dir; its relative output_path is there.
    found = [p for p in job_cluster["temp_dir"].rglob("outputs/tiny_cpu/results.jsonl") if p.stat().st_mtime >= started]
    assert len(found) == 1, found
    records = _records(found[0])
    assert records and all(r["error"] is None and r["output_token_ids"] for r in records)
