"""Checks made on every node that will host workers, before any worker or model exists.

The driver may sit on a CPU-only head node, so what a worker needs is checked where the workers will
run: one small Ray task per node, placed in that node's first worker bundle (so it holds the node's
accelerator resource and sees the environment the workers will see, `dist_env` included). It checks:

- CANN's environment (npu): Ray workers inherit it only from the shell that ran `ray start`;
- that torch imports (with torch_npu installed but CANN's libraries not found, `import torch` fails);
- torch_npu importable, its version matching torch's (npu); a CUDA build of torch (cuda);
- the graph-mode environment (`cluster.devices.check_graph_env`, on the worker's environment).

A failure ends the launch with one :class:`PreflightError` line naming the node, what is missing and
the fix. This module imports neither torch nor torch_npu at the top: the task must be able to report
that they do not import.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Callable, Mapping, Sequence
from types import ModuleType
from typing import Any

import ray

# Variables CANN's set_env.sh exports that every Ascend process needs.
CANN_ENV = ("ASCEND_HOME_PATH", "ASCEND_OPP_PATH")
SET_ENV_HINT = "source /usr/local/Ascend/ascend-toolkit/set_env.sh (and nnal/atb/set_env.sh where installed)"
RESTART_HINT = "then `ray stop` and `ray start ...` again from that shell on this node (workers inherit its env)"
INSTALL_NPU_HINT = (
    "install the npu extra in the Python that runs Ray on this node: pip install '.[npu]' "
    "(torch_npu==2.13.0 for torch==2.13.0)"
)

Importer = Callable[[str], ModuleType]


class PreflightError(RuntimeError):
    """A node that would host workers lacks what they need; the message names the node and the fix."""


def release(version: str) -> tuple[int, ...]:
    """The leading major.minor.patch of a version string: '2.13.0+cpu' -> (2, 13, 0); () if none."""
    match = re.match(r"(\d+)\.(\d+)\.(\d+)", version)
    return tuple(int(g) for g in match.groups()) if match else ()


def node_problems(
    device: str,
    exe_mode: str,
    environ: Mapping[str, str],
    dist_env: Mapping[str, str] | None = None,
    importer: Importer = importlib.import_module,
) -> list[str]:
    """What a worker for `device` would lack in this process: one line per problem, each with its fix.

    `environ` is the process environment (a Ray task's, with `dist_env` already applied by the
    runtime env); `importer` imports a module by name (tests pass a stand-in).
    """
    problems = []
    if device == "npu":
        missing = [name for name in CANN_ENV if not environ.get(name)]
        if missing:
            unset = ", ".join(missing)
            problems.append(f"CANN's environment is missing ({unset} unset): {SET_ENV_HINT}, {RESTART_HINT}")
    try:
        torch = importer("torch")
    except Exception as e:  # an ImportError, or an OSError from a shared library torch_npu loads
        fix = f"{SET_ENV_HINT}, {RESTART_HINT}" if device == "npu" else "reinstall torch==2.13.0"
        return problems + [f"import torch fails: {type(e).__name__}: {e}; {fix}"]
    if device == "npu":
        try:
            torch_npu = importer("torch_npu")
        except Exception as e:
            problems.append(f"torch_npu does not import ({type(e).__name__}: {e}): {INSTALL_NPU_HINT}, {RESTART_HINT}")
        else:
            have, want = release(torch.__version__), release(getattr(torch_npu, "__version__", ""))
            if have != want:
                problems.append(
                    f"torch_npu {torch_npu.__version__} needs torch {'.'.join(map(str, want))}.*, this node has "
                    f"torch {torch.__version__}: install matching versions (the npu extra pins torch_npu==2.13.0 "
                    "with torch==2.13.0)"
                )
    elif device == "cuda" and not torch.cuda.is_available():
        problems.append(
            f"torch {torch.__version__} sees no CUDA device on this node: install a CUDA build of torch==2.13.0 "
            "and check the driver (nvidia-smi)"
        )
    from cluster.devices import check_graph_env  # imports torch: only once torch is known to import

    try:
        check_graph_env(device, exe_mode, environ, dist_env)
    except ValueError as e:
        problems.append(f"{e}; unset it in the environment `ray start` ran in, or override it in dist_env")
    return problems


def probe(device: str, exe_mode: str, dist_env: dict[str, str]) -> dict[str, Any]:
    """The Ray task: this node's address and problems (see `node_problems`)."""
    return {
        "node_ip": ray.util.get_node_ip_address(),
        "node_id": ray.get_runtime_context().get_node_id(),
        "problems": node_problems(device, exe_mode, os.environ, dist_env),
    }


def format_failure(device: str, reports: Sequence[Mapping[str, Any]]) -> str | None:
    """One message naming each failing node and its problems; None when every node passed."""
    failing = [r for r in reports if r["problems"]]
    if not failing:
        return None
    nodes = "; ".join(f"node {r['node_ip']} ({str(r['node_id'])[:12]}): {' / '.join(r['problems'])}" for r in failing)
    return f"preflight for device {device} failed on {len(failing)} of {len(reports)} node(s): {nodes}"


def check_nodes(
    device: str,
    exe_mode: str,
    dist_env: Mapping[str, str],
    strategies: Sequence[Any],
    resource_options: Mapping[str, Any],
    timeout_s: float,
) -> list[dict[str, Any]]:
    """Run `probe` once per strategy (one worker bundle on each node that will host workers).

    `resource_options` are the worker's own resource options, so the task fits the bundle exactly.
    Raises PreflightError naming every failing node, or one that did not answer within `timeout_s`.
    """
    options = {**resource_options, "max_retries": 0}
    if dist_env:
        options["runtime_env"] = {"env_vars": dict(dist_env)}
    task = ray.remote(probe)
    refs = [task.options(scheduling_strategy=s, **options).remote(device, exe_mode, dict(dist_env)) for s in strategies]
    ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    for ref in pending:
        ray.cancel(ref, force=True)
    if pending:
        raise PreflightError(
            f"preflight for device {device}: {len(pending)} of {len(refs)} node(s) did not answer within "
            f"{timeout_s:g}s (ray.worker_timeout_s); is Ray's worker process able to start there?"
        )
    reports = []
    for ref in refs:
        try:
            reports.append(ray.get(ref))
        except ray.exceptions.RayError as e:
            reports.append({"node_ip": "?", "node_id": "?", "problems": [f"the preflight task failed: {e}"]})
    message = format_failure(device, reports)
    if message is not None:
        raise PreflightError(message)
    return reports
