"""Weight loading: errors that name what is wrong, per-rank slices, and the memory a tp rank needs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cluster.tools.tiny_checkpoint import build_tiny_checkpoint, preset
from model.loader import CheckpointError
from model.parallel import ParallelContext
from model.runner import ModelRunner

REPO = Path(__file__).resolve().parents[1]


def edited_copy(source: Path, dest: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """A copy of a one-file checkpoint whose tensors went through `edit` (in place)."""
    shutil.copytree(source, dest)
    tensors = load_file(dest / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


def test_missing_weight_is_named(tiny_checkpoint: Path, tmp_path: Path) -> None:
    path = edited_copy(tiny_checkpoint, tmp_path / "ckpt", lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(CheckpointError, match=r"lacks 1 weight\(s\): model\.layers\.1\.mlp\.down_proj\.weight"):
        ModelRunner(path)


def test_missing_part_of_a_packed_projection_is_named(tiny_checkpoint: Path, tmp_path: Path) -> None:
    path = edited_copy(tiny_checkpoint, tmp_path / "ckpt", lambda t: t.pop("model.layers.0.self_attn.k_proj.bias"))
    with pytest.raises(CheckpointError, match=r"lacks 1 weight\(s\): model\.layers\.0\.self_attn\.k_proj\.bias$"):
        ModelRunner(path)


def test_unexpected_tensor_is_an_error(tiny_checkpoint: Path, tmp_path: Path) -> None:
    def add(tensors: dict[str, torch.Tensor]) -> None:
        tensors["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(4, 4)

    path = edited_copy(tiny_checkpoint, tmp_path / "ckpt", add)
    with pytest.raises(CheckpointError, match=r"does not use: model\.layers\.0\.mlp\.extra_proj\.weight"):
        ModelRunner(path)


def test_wrong_shape_names_the_tensor(tiny_checkpoint: Path, tmp_path: Path) -> None:
    def shrink(tensors: dict[str, torch.Tensor]) -> None:
        key = "model.layers.0.mlp.down_proj.weight"
        tensors[key] = tensors[key][:, :-2].contiguous()

    path = edited_copy(tiny_checkpoint, tmp_path / "ckpt", shrink)
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.mlp\.down_proj\.weight'.*shape mismatch"):
        ModelRunner(path)


def test_missing_shard_is_named(checkpoint: Callable[[str], Path], tmp_path: Path) -> None:
    path = shutil.copytree(checkpoint("sharded"), tmp_path / "ckpt")
    (path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"shard\(s\) that do not exist: model-00002-of-00003\.safetensors"):
        ModelRunner(path)


@pytest.mark.parametrize("name", ["default", "sharded", "transformers5"])
def test_every_parameter_loaded_once(checkpoint: Callable[[str], Path], name: str) -> None:
    runner = ModelRunner(checkpoint(name), max_batch_size=1, max_seq_len=16)
    assert runner.loaded == {n for n, _ in runner.model.named_parameters()}


@pytest.mark.parametrize("rank", [0, 1])
def test_tp2_rank_holds_its_slices(checkpoint: Callable[[str], Path], rank: int) -> None:
    """Loading alone needs no process group: check what rank `rank` of tp 2 keeps from the checkpoint."""
    path = checkpoint("tp_odd")  # 4 heads of 32, one KV head, vocab 1001, intermediate 192
    runner = ModelRunner(path, ParallelContext(rank=rank, size=2, group=None), max_batch_size=1, max_seq_len=16)
    assert runner.loaded == {n for n, _ in runner.model.named_parameters()}
    params = dict(runner.model.named_parameters())
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        ckpt = {k: f.get_tensor(k) for k in f.keys()}
    layer = "model.layers.0"
    q, k, v = (ckpt[f"{layer}.self_attn.{p}_proj.weight"] for p in "qkv")
    # qkv rows: this rank's 2 query heads, then the single KV head, replicated.
    expected_qkv = torch.cat([q[rank * 64 : (rank + 1) * 64], k, v])
    assert torch.equal(params[f"{layer}.self_attn.qkv_proj.weight"], expected_qkv)
    o = ckpt[f"{layer}.self_attn.o_proj.weight"]
    assert torch.equal(params[f"{layer}.self_attn.o_proj.weight"], o[:, rank * 64 : (rank + 1) * 64])
    gate, up = ckpt[f"{layer}.mlp.gate_proj.weight"], ckpt[f"{layer}.mlp.up_proj.weight"]
    rows = slice(rank * 96, (rank + 1) * 96)
    assert torch.equal(params[f"{layer}.mlp.gate_up_proj.weight"], torch.cat([gate[rows], up[rows]]))
    # Vocabulary 1001 pads to 2 x 501 rows: rank 1 holds 500 real rows and one zero row.
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        mine = params[name]
        assert mine.shape == (501, 128)
        real = ckpt[name][rank * 501 : (rank + 1) * 501]
        assert torch.equal(mine[: len(real)], real)
        assert not mine[len(real) :].any()


# ------------------------------------------------------------------------------------------------ peak RSS

# Peak RSS is VmHWM, the high-water mark of this process image. ru_maxrss would be the same number
# were it not inherited: Linux keeps the forking parent's peak (pytest's, hundreds of MiB) across exec.
RSS_SCRIPT = """
import json, sys
import torch
from model.parallel import ParallelContext
from model.runner import ModelRunner

torch.set_num_threads(1)
path, mode = sys.argv[1], sys.argv[2]
if mode != "imports":
    ctx = ParallelContext() if mode == "tp1" else ParallelContext(rank=0, size=2, group=None)
    runner = ModelRunner(path, ctx, max_batch_size=1, max_seq_len=8)
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps({"peak_kib": int(status["VmHWM"].split()[0]), "anon_kib": int(status["RssAnon"].split()[0])}))
"""

BIG_SPEC = preset("wide")  # about 210 MB of fp32 weights, 95% of them in the two decoder layers


def _memory_kib(path: Path, mode: str) -> dict[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, str(path), mode], cwd=REPO, check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_tp2_rank_loads_about_half_the_memory(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Peak RSS of construct + load at tp 1 vs rank 0 of tp 2, above a process that only imports.

    The peak includes the pages of the mmap-ed safetensors file each process touches while reading
    (page-fault-around maps whole 64 KiB runs of it), so it is more than the weights kept; the
    anonymous memory still held after loading is the weights themselves.
    """
    path = build_tiny_checkpoint(tmp_path_factory.mktemp("big") / "ckpt", BIG_SPEC)
    size_mib = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20
    base, tp1, tp2 = (_memory_kib(path, mode) for mode in ("imports", "tp1", "tp2"))
    peak1, peak2 = tp1["peak_kib"] - base["peak_kib"], tp2["peak_kib"] - base["peak_kib"]
    held1, held2 = tp1["anon_kib"] - base["anon_kib"], tp2["anon_kib"] - base["anon_kib"]
    print(
        f"\ncheckpoint {size_mib:.0f} MiB; imports-only peak RSS {base['peak_kib'] / 1024:.0f} MiB; "
        f"load peak RSS delta: tp1 {peak1 / 1024:.0f} MiB, tp2 rank 0 {peak2 / 1024:.0f} MiB "
        f"(ratio {peak2 / peak1:.2f}); anonymous memory held after load: tp1 {held1 / 1024:.0f} MiB, "
        f"tp2 rank 0 {held2 / 1024:.0f} MiB (ratio {held2 / held1:.2f})"
    )
    assert peak2 <= 0.65 * peak1
    assert held2 <= 0.6 * held1
