"""Tensor-parallel layers that take their process group explicitly and load their own shard.

Every parameter carries a `weight_loader(param, source, shard_id)` where `source` is a lazily
sliceable checkpoint tensor (a safetensors slice, or a plain tensor in tests): the loader reads
only the rows or columns this rank keeps, so a rank never holds the whole model.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from model.cpu_linear import linear


class TensorSource(Protocol):
    """What a weight loader reads from: `get_shape()` and numpy-style slicing."""

    def get_shape(self) -> list[int]: ...

    def __getitem__(self, index: Any) -> torch.Tensor: ...


@dataclass
class ParallelContext:
    """One tensor-parallel group: this rank's index and the group size (group None means tp = 1)."""

    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate equally shaped tensors from every rank along `dim`, in rank order.

        One collective into one preallocated buffer (all_gather_into_tensor), which graph capture
        takes as a single op, rather than a list of outputs and a cat.
        """
        if self.size == 1:
            return x
        dim = dim % x.dim()
        out = x.new_empty((self.size * x.shape[0], *x.shape[1:]))  # rank-major along dim 0
        _all_gather_into_tensor(out, x.contiguous(), group=self.group)
        if dim == 0:
            return out
        return out.view(self.size, *x.shape).movedim(0, dim).flatten(dim, dim + 1)


SINGLE = ParallelContext()


def free_port() -> int:
    """A TCP port free on this host now (for a process group's rendezvous address)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


# torch 2.13 renames all_gather_into_tensor to all_gather_single (the old name warns); same collective.
_all_gather_into_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _copy(param: torch.Tensor, loaded: torch.Tensor, name: str = "") -> None:
    if tuple(loaded.shape) != tuple(param.shape):
        raise ValueError(
            f"shape mismatch loading {name or 'weight'}: checkpoint slice {tuple(loaded.shape)} "
            f"vs parameter {tuple(param.shape)}"
        )
    if loaded.dtype.is_floating_point != param.dtype.is_floating_point:
        raise ValueError(
            f"dtype mismatch loading {name or 'weight'}: checkpoint holds {loaded.dtype}, parameter is {param.dtype} "
            "(int8 where float belongs or the reverse: see the checkpoint's quant_model_description.json)"
        )
    param.data.copy_(loaded.to(param.dtype))


def _split(total: int, parts: int, what: str) -> int:
    if total % parts:
        raise ValueError(f"{what}={total} is not divisible by tp_size={parts}")
    return total // parts


def default_weight_loader(param: torch.Tensor, source: TensorSource, shard_id: Any = None) -> None:
    """Load a replicated parameter whole."""
    _copy(param, source[:])


def set_loader(param: nn.Parameter, loader: Callable[..., None]) -> nn.Parameter:
    param.weight_loader = loader  # type: ignore[attr-defined]
    return param


class ReplicatedLinear(nn.Linear):
    """A linear layer every rank holds whole."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        for p in self.parameters():
            set_loader(p, default_weight_loader)


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W split by output rows; the output stays sharded.

    `quant` (model/quant.py) set: the layer holds int8 weights and scales and runs their kernel.
    """

    quant: Any = None

    def __init__(self, in_features: int, out_features: int, bias: bool, ctx: ParallelContext) -> None:
        super().__init__()
        self.ctx = ctx
        self.out_per_rank = _split(out_features, ctx.size, "output size")
        self.weight = set_loader(nn.Parameter(torch.empty(self.out_per_rank, in_features)), self._load_rows)
        self.bias = set_loader(nn.Parameter(torch.empty(self.out_per_rank)), self._load_rows) if bias else None

    def _load_rows(self, param: nn.Parameter, source: TensorSource, shard_id: Any = None) -> None:
        start = self.ctx.rank * self.out_per_rank
        _copy(param, source[start : start + self.out_per_rank])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant is not None:
            return self.quant.apply(self, x)
        return linear(x, self.weight, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections stored as one matrix (e.g. gate and up).

    The output on each rank is [part0 shard | part1 shard | ...]. Checkpoints hold the parts either
    separately (`shard_id` = part index) or already fused (`shard_id` None, parts stacked in order).
    """

    def __init__(self, in_features: int, part_sizes: Sequence[int], bias: bool, ctx: ParallelContext) -> None:
        self.part_sizes = [_split(s, ctx.size, "output size") for s in part_sizes]
        super().__init__(in_features, sum(part_sizes), bias, ctx)
        self.weight.weight_loader = self._load_part
        if self.bias is not None:
            self.bias.weight_loader = self._load_part

    def _load_part(self, param: nn.Parameter, source: TensorSource, shard_id: int | None = None) -> None:
        parts = range(len(self.part_sizes)) if shard_id is None else [shard_id]
        for part in parts:
            size = self.part_sizes[part]
            src_offset = sum(self.part_sizes[:part]) * self.ctx.size if shard_id is None else 0
            start = src_offset + self.ctx.rank * size
            dst = sum(self.part_sizes[:part])
            _copy(param.data[dst : dst + size], source[start : start + size])


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v projection split by heads; KV heads are replicated when tp > num_kv_heads."""

    def __init__(
        self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool, ctx: ParallelContext
    ) -> None:
        self.head_dim = head_dim
        self.num_heads = _split(num_heads, ctx.size, "num_attention_heads")
        if ctx.size >= num_kv_heads:
            if ctx.size % num_kv_heads:
                raise ValueError(f"tp_size={ctx.size} must be a multiple of num_key_value_heads={num_kv_heads}")
            self.num_kv_heads = 1
            self.kv_head_start = ctx.rank // (ctx.size // num_kv_heads)
        else:
            self.num_kv_heads = _split(num_kv_heads, ctx.size, "num_key_value_heads")
            self.kv_head_start = ctx.rank * self.num_kv_heads
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim
        super().__init__(hidden, out * ctx.size, bias, ctx)
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        self.weight.weight_loader = self._load_qkv
        if self.bias is not None:
            self.bias.weight_loader = self._load_qkv

    def _load_qkv(self, param: nn.Parameter, source: TensorSource, shard_id: str) -> None:
        if shard_id == "q":
            src_start, dst_start, size = self.ctx.rank * self.q_size, 0, self.q_size
        else:
            src_start = self.kv_head_start * self.head_dim
            dst_start = self.q_size + (0 if shard_id == "k" else self.kv_size)
            size = self.kv_size
        _copy(param.data[dst_start : dst_start + size], source[src_start : src_start + size])


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_shard W_shard^T) + b with W split by input columns; x arrives sharded.

    `quant` (model/quant.py) set: the partial sum comes from the int8 kernel.
    """

    quant: Any = None

    def __init__(self, in_features: int, out_features: int, bias: bool, ctx: ParallelContext) -> None:
        super().__init__()
        self.ctx = ctx
        self.in_per_rank = _split(in_features, ctx.size, "input size")
        self.weight = set_loader(nn.Parameter(torch.empty(out_features, self.in_per_rank)), self._load_cols)
        self.bias = set_loader(nn.Parameter(torch.empty(out_features)), default_weight_loader) if bias else None

    def _load_cols(self, param: nn.Parameter, source: TensorSource, shard_id: Any = None) -> None:
        start = self.ctx.rank * self.in_per_rank
        _copy(param, source[:, start : start + self.in_per_rank])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ctx.all_reduce(self.quant.apply(self, x) if self.quant is not None else linear(x, self.weight))
        # The bias is added once, after the reduction, so every rank agrees with tp = 1.
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """Embedding split by vocabulary rows; ids outside this rank's range look up zeros, then all_reduce."""

    def __init__(self, vocab_size: int, hidden: int, ctx: ParallelContext) -> None:
        super().__init__()
        self.ctx = ctx
        self.vocab_size = vocab_size
        self.per_rank = -(-vocab_size // ctx.size)  # padded so every rank holds the same number of rows
        self.start = ctx.rank * self.per_rank
        self.weight = set_loader(nn.Parameter(torch.empty(self.per_rank, hidden)), self._load_rows)

    def _load_rows(self, param: nn.Parameter, source: TensorSource, shard_id: Any = None) -> None:
        end = min(self.start + self.per_rank, self.vocab_size)
        param.data.zero_()
        if end > self.start:
            _copy(param.data[: end - self.start], source[self.start : end])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.ctx.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return self.ctx.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection split by vocabulary rows; logits are gathered and the padding cut off."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = linear(hidden, self.weight)
        return self.ctx.all_gather(logits, dim=-1)[..., : self.vocab_size]
