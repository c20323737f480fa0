"""`ray job submit --working-dir . -- python -m cluster.launch conf/tiny_cpu.yaml` on a private loopback cluster.

The cluster is started with `ray start --head --block` from the venv (so a job's `python` is the venv's)
with HOME pointing at a temporary home that holds the tiny checkpoint at the path conf/tiny_cpu.yaml
names (~/.cache/...). It is stopped by ending the processes this test started, not by `ray stop`, which
would stop every Ray instance on the machine (other test sessions' included).

Jobs are submitted only once the head's job agent answers: the dashboard answers first, and a submit
before the agent is up fails with "No available agent to submit job". The agent listens on a port of its
own, not Ray's default 52365, which another Ray instance on the machine may hold (the agent then never
serves HTTP, and every submit fails).
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

from model.processor import PromptBuilder
from tests.ray_helpers import CONTRACT_FIELDS, REPO, free_port, tiny_model, wait_for

VENV_BIN = Path(sys.executable).parent
AGENT_WAIT_S = 300  # the job agent can start minutes after the dashboard answers on a loaded machine


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
    dashboard, agent = free_port(), free_port()
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
            f"--dashboard-agent-listen-port={agent}",
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

    def answers(url: str) -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return True
        except OSError:
            return head.poll() is not None  # stop waiting if it died

    try:
        assert wait_for(lambda: answers(f"{address}/api/version"), timeout_s=120, interval_s=0.5), "no dashboard"
        # The job agent registers itself with the head as soon as its HTTP server is up.
        agent_up = wait_for(lambda: answers(f"http://127.0.0.1:{agent}/api/healthz"), AGENT_WAIT_S, interval_s=0.5)
        assert head.poll() is None, "ray start --head exited"
        assert agent_up, f"no job agent after {AGENT_WAIT_S}s:\n{_agent_log(Path(temp_dir))}"
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


def _agent_log(temp_dir: Path) -> str:
    """The end of the head's dashboard_agent.log (why its agent is not up), or a note that there is none."""
    logs = sorted(temp_dir.glob("session_*/logs/dashboard_agent.log"))
    return logs[-1].read_text(errors="replace")[-3000:] if logs else f"no dashboard_agent.log under {temp_dir}"


def _submit(cluster: dict, *entrypoint: str) -> subprocess.CompletedProcess:
    """`ray job submit` to the cluster (whose job agent is up), waiting for the job to end."""
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
    return subprocess.run(cmd, env=cluster["env"], cwd=REPO, capture_output=True, text=True, timeout=420)


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
    # The override reached the job: 4 tokens, or fewer ending at EOS.
    eos = set(PromptBuilder.from_pretrained(tiny_model()).eos_token_ids)
    for r in records:
        tokens, reason = r["output_token_ids"], r["finish_reason"]
        at_eos = reason == "stop" and 0 < len(tokens) < 4 and tokens[-1] in eos
        assert (reason == "length" and len(tokens) == 4) or at_eos, (r["id"], tokens, reason)
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
