"""torch_npu as its documentation defines it, for cpu tests of the npu paths (and the first-run script).

Kernels (`FakeTorchNpu`, `FakeQuantNpu`), each computing the documented result and asserting the documented
layouts, dtypes and limits: op-plugin's API docs for npu_rms_norm, npu_add_rms_norm, npu_rotary_mul,
npu_swiglu, npu_fused_infer_attention_score (dense BSND and paged TND), npu_fusion_attention (TND varlen),
npu_quantize, npu_dynamic_quant, npu_quant_matmul and npu_trans_quant_param.

Graphs (`GraphRecordingNpu`, `FakeNpuGraph`, `FakeNpuBackend`): torch.npu's graph surface as torch_npu 2.13's
torch_npu/npu/graphs.py behaves. Under `auto_dispatch_capture=True` every FIA call is recorded
(`_GraphDispatchMode`) behind an ExternalEvent wait that only `NPUGraph.update` records, and the captured
call keeps the host lists it was recorded with until `update` rewrites them; a replay whose event no update
recorded raises here (on a device it waits forever). Replays run asynchronously until the stream is
synchronized; an update while a replay of its graph may still run raises here (on a device it rewrites a
call the replay may be executing).

npu_quantize(x, scales, zero_points, dtype, axis, div_mode=False) = round(x * scales + zero_points)
as int8, scales and zero_points one value per element of x's last dim (axis -1), in x's dtype;
npu_dynamic_quant(x) -> (round(x / s) as int8, s = max|row| / 127 float32, one per row);
npu_quant_matmul(x1 int8 (M, K), x2 int8 (K, N), scale (N,), *, pertoken_scale (M,), bias,
output_dtype) = (x1 @ x2 + int32 bias) * scale [* pertoken_scale] [+ float bias], computed exactly here;
npu_trans_quant_param(scale) = its float32 bits & 0xFFFFE000 with bit 46 set, as int64.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _disable_current_modes


# ------------------------------------------------------------------------- kernels
def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rms(x: torch.Tensor, gamma: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    assert gamma.shape == x.shape[-1:], f"gamma {tuple(gamma.shape)} must match x's last dim {x.shape[-1]}"
    rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + epsilon)
    return (x.float() * rstd * gamma.float()).to(x.dtype), rstd


class FakeTorchNpu(SimpleNamespace):
    """torch_npu's decode kernels as their documentation defines them, asserting the documented layouts.

    npu_rms_norm(x, gamma, epsilon) -> (y, rstd); npu_add_rms_norm(x1, x2, gamma, epsilon) ->
    (y, rstd, x1 + x2); npu_rotary_mul(x, r1, r2) = x * r1 + rotate_half(x) * r2 on x (1, T, N, D), r1/r2 (1, T, 1, D);
    npu_swiglu(x, dim) = silu(first half) * second half (vllm-ascend's SiluAndMul);
    npu_fused_infer_attention_score(q, k, v, atten_mask=True-masks, num_heads, num_key_value_heads,
    scale, input_layout) -> (out, lse), with BSND = (batch, seq, heads, head_dim), contiguous inputs;
    with block_table, its paged mode (`_paged_fia`); npu_fusion_attention in TND (varlen) layout, at most
    1,024 sequences a call.
    """

    def __init__(self) -> None:
        super().__init__(calls={}, rotary_shapes=[], kv_lens_seen=[], sparse_modes=[])

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    def npu_rms_norm(self, x: torch.Tensor, gamma: torch.Tensor, epsilon: float = 1e-6):
        self._count("npu_rms_norm")
        return _rms(x, gamma, epsilon)

    def npu_add_rms_norm(self, x1: torch.Tensor, x2: torch.Tensor, gamma: torch.Tensor, epsilon: float = 1e-6):
        self._count("npu_add_rms_norm")
        assert x1.shape == x2.shape and x1.dtype == x2.dtype
        total = x1 + x2
        return (*_rms(total, gamma, epsilon), total)

    def npu_rotary_mul(self, x: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
        self._count("npu_rotary_mul")
        assert x.dim() == 4 and r1.dim() == 4 and r1.shape == r2.shape, "x, r1, r2 must be 4-D"
        # The op's doc promises nothing for strided views; vllm-ascend hands it contiguous tensors.
        assert x.is_contiguous() and r1.is_contiguous() and r2.is_contiguous(), "npu_rotary_mul takes contiguous inputs"
        # vllm-ascend's unambiguous form: the tokens as one sequence, x (1, T, N, D), r1/r2 (1, T, 1, D).
        tokens, dim = x.shape[1], x.shape[3]
        assert x.shape[0] == 1 and r1.shape == (1, tokens, 1, dim), f"x {tuple(x.shape)}, r1 {tuple(r1.shape)}"
        self.rotary_shapes.append((tuple(x.shape), tuple(r1.shape)))
        return x * r1 + _rotate_half(x) * r2

    def npu_swiglu(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        self._count("npu_swiglu")
        a, b = x.chunk(2, dim=dim)
        return F.silu(a) * b

    def npu_fused_infer_attention_score(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        *,
        atten_mask: torch.Tensor | None = None,
        num_heads: int = 1,
        scale: float = 1.0,
        input_layout: str = "BSH",
        num_key_value_heads: int = 0,
        block_table: torch.Tensor | None = None,
        **paged: Any,
    ):
        self._count("npu_fused_infer_attention_score")
        if block_table is not None:
            return self._paged_fia(
                query, key, value, block_table, num_heads, num_key_value_heads, scale, input_layout, atten_mask, **paged
            )
        assert not paged, f"unexpected arguments {sorted(paged)}"
        assert input_layout == "BSND" and query.dim() == key.dim() == 4 and key.shape == value.shape
        assert query.is_contiguous() and key.is_contiguous() and value.is_contiguous()
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # BNSD
        batch, heads, q_len, dim = query.shape
        kv_heads, kv_len = key.shape[1], key.shape[2]
        assert (heads, kv_heads) == (num_heads, num_key_value_heads) and heads % kv_heads == 0
        assert key.shape[0] == batch and key.shape[3] == dim and q_len == 1
        assert atten_mask is not None and atten_mask.dtype == torch.bool
        assert atten_mask.shape == (batch, 1, 1, kv_len)
        k = key.repeat_interleave(heads // kv_heads, dim=1)
        v = value.repeat_interleave(heads // kv_heads, dim=1)
        scores = (query.float() @ k.float().transpose(-1, -2)) * scale  # (B, N, 1, S)
        scores = scores.masked_fill(atten_mask, float("-inf"))
        lse = scores.logsumexp(-1, keepdim=True)
        out = ((scores - lse).exp() @ v.float()).to(query.dtype)  # (B, N, 1, D)
        return out.transpose(1, 2).contiguous(), lse

    def _paged_fia(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        block_table: torch.Tensor,
        num_heads: int,
        num_key_value_heads: int,
        scale: float,
        input_layout: str,
        atten_mask: torch.Tensor | None,
        *,
        block_size: int,
        actual_seq_lengths: list[int],
        actual_seq_lengths_kv: list[int],
        sparse_mode: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """FIA's page-attention mode in TND layout, as op-plugin documents it and vllm-ascend calls it.

        query (T, N, D) contiguous; key/value (num_blocks, block_size, KV_N * D) (the cache, BSH per block);
        block_table (B, max_blocks) int32; actual_seq_lengths: host list of cumulative query ends (last = T);
        actual_seq_lengths_kv: host list of each request's KV length, len B (= block_table rows), each
        covered by its table row. Request b's KV position i is block block_table[b, i // block_size] at
        offset i % block_size. sparse_mode 0 without a mask: every query of a request sees its whole KV;
        sparse_mode 3 with the compressed 2048 x 2048 mask (bool, int8 or uint8, 1 above the diagonal):
        causal, bottom-right aligned (query j of Lq sees keys up to Lk - Lq + j).
        """
        assert input_layout == "TND" and query.dim() == 3 and query.is_contiguous()
        tokens, heads, dim = query.shape
        num_blocks, size, hidden = key.shape
        assert key.shape == value.shape and key.dtype == value.dtype == query.dtype
        assert block_size == size and block_size % 16 == 0 and 16 <= block_size <= 512, f"block_size={block_size}"
        assert heads == num_heads and hidden == num_key_value_heads * dim and heads % num_key_value_heads == 0
        assert block_table.dtype == torch.int32 and block_table.dim() == 2, f"block_table {block_table.dtype}"
        if sparse_mode == 3:
            assert atten_mask is not None and atten_mask.dtype in (torch.bool, torch.int8, torch.uint8)
            with _disable_current_modes():  # the stand-in's own host read, not one the decode step makes
                assert torch.equal(atten_mask.bool(), torch.ones(2048, 2048, dtype=torch.bool).triu(1))
        else:
            assert sparse_mode == 0 and atten_mask is None, "sparse_mode 0 runs without a mask here"
        for name, lens in (
            ("actual_seq_lengths", actual_seq_lengths),
            ("actual_seq_lengths_kv", actual_seq_lengths_kv),
        ):
            assert isinstance(lens, list) and all(type(n) is int for n in lens), f"{name} must be a host int list"
        batch = len(actual_seq_lengths)
        assert actual_seq_lengths[-1] == tokens and len(actual_seq_lengths_kv) == batch == block_table.shape[0]
        assert all(1 <= n <= block_table.shape[1] * size for n in actual_seq_lengths_kv)
        self.kv_lens_seen.append(list(actual_seq_lengths_kv))
        self.sparse_modes.append(sparse_mode)
        groups = heads // num_key_value_heads
        out, lse = torch.zeros_like(query), torch.zeros(tokens, heads, 1)
        for b, (qs, qe, kv_len) in enumerate(zip([0] + actual_seq_lengths, actual_seq_lengths, actual_seq_lengths_kv)):
            blocks = block_table[b, : -(-kv_len // size)].long()
            k = key.index_select(0, blocks).reshape(-1, num_key_value_heads, dim)[:kv_len]  # (L, KV_N, D)
            v = value.index_select(0, blocks).reshape(-1, num_key_value_heads, dim)[:kv_len]
            k = k.float().transpose(0, 1).repeat_interleave(groups, dim=0)  # (N, L, D)
            v = v.float().transpose(0, 1).repeat_interleave(groups, dim=0)
            scores = (query[qs:qe].float().transpose(0, 1) @ k.transpose(-1, -2)) * scale  # (N, Lq, L)
            if sparse_mode == 3:
                lq = qe - qs
                hidden = torch.arange(kv_len)[None, :] > torch.arange(lq)[:, None] + (kv_len - lq)  # (Lq, L)
                scores = scores.masked_fill(hidden, float("-inf"))
            row_lse = scores.logsumexp(-1, keepdim=True)
            out[qs:qe] = ((scores - row_lse).exp() @ v).transpose(0, 1).to(query.dtype)
            lse[qs:qe] = row_lse.transpose(0, 1)
        return out, lse

    def npu_fusion_attention(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        head_num: int,
        input_layout: str,
        *,
        atten_mask: torch.Tensor | None = None,
        scale: float = 1.0,
        actual_seq_qlen: list[int] | None = None,
        actual_seq_kvlen: list[int] | None = None,
        sparse_mode: int = 0,
        **unused: object,
    ):
        """TND: query (T1, N1, D), key/value (T2, N2, D), sequences ending at actual_seq_qlen / actual_seq_kvlen
        (host lists of cumulative ends). sparse_mode 0 without a mask: full attention in each sequence;
        sparse_mode 3 with the 2048 x 2048 upper-triangular mask (True = masked): causal, bottom-right aligned.
        Returns (attention_out, softmax_max, softmax_sum, softmax_out, seed, offset, mask numel)."""
        self._count("npu_fusion_attention")
        assert not unused, f"unexpected arguments {sorted(unused)}"
        assert input_layout == "TND" and query.dim() == key.dim() == 3 and key.shape == value.shape
        assert query.is_contiguous() and key.is_contiguous() and value.is_contiguous()
        assert head_num == query.shape[1] and head_num % key.shape[1] == 0 and query.shape[2] == key.shape[2]
        assert isinstance(actual_seq_qlen, list) and isinstance(actual_seq_kvlen, list)
        assert len(actual_seq_qlen) == len(actual_seq_kvlen) and all(isinstance(n, int) for n in actual_seq_qlen)
        # op-plugin's doc: "actual_seq_qlen ... varlen场景下长度最大支持1K" (at most 1K sequences in varlen mode).
        assert len(actual_seq_qlen) <= 1024, f"{len(actual_seq_qlen)} sequences in one varlen call (at most 1,024)"
        assert actual_seq_qlen[-1] == query.shape[0] and actual_seq_kvlen[-1] == key.shape[0]
        if sparse_mode == 3:
            assert atten_mask is not None and atten_mask.dtype == torch.bool and atten_mask.shape == (2048, 2048)
            assert torch.equal(atten_mask, torch.ones(2048, 2048, dtype=torch.bool).triu(1))
        else:
            assert sparse_mode == 0 and atten_mask is None
        groups = head_num // key.shape[1]
        out = torch.zeros_like(query)
        for qs, qe, ks, ke in zip([0] + actual_seq_qlen, actual_seq_qlen, [0] + actual_seq_kvlen, actual_seq_kvlen):
            q = query[qs:qe].float().transpose(0, 1)  # (N1, Lq, D)
            k = key[ks:ke].float().transpose(0, 1).repeat_interleave(groups, dim=0)  # (N1, Lk, D)
            v = value[ks:ke].float().transpose(0, 1).repeat_interleave(groups, dim=0)
            scores = (q @ k.transpose(-1, -2)) * scale  # (N1, Lq, Lk)
            if sparse_mode == 3:  # query i sees keys up to i + (Lk - Lq)
                lq, lk = qe - qs, ke - ks
                hidden = torch.arange(lk)[None, :] > torch.arange(lq)[:, None] + (lk - lq)  # (Lq, Lk)
                scores = scores.masked_fill(hidden, float("-inf"))
            out[qs:qe] = (scores.softmax(-1) @ v).transpose(0, 1).to(query.dtype)
        return out, None, None, None, 0, 0, 0


class FakeQuantNpu(FakeTorchNpu):
    """FakeTorchNpu plus the quantization kernels vllm-ascend's W8A8 linear methods call."""

    def npu_quantize(self, x, scales, zero_points, dtype, axis=1, div_mode=True):
        self._count("npu_quantize")
        assert dtype == torch.qint8 and axis == -1 and div_mode is False, "vllm-ascend's form: reciprocal scale"
        assert scales.shape == zero_points.shape == x.shape[-1:], "one scale and offset per input channel"
        # The doc, div_mode=False: scales in the input's dtype, zero_points in the scales' dtype.
        assert scales.dtype == x.dtype, f"scales {scales.dtype} for a {x.dtype} input"
        assert zero_points.dtype == scales.dtype, f"zero_points {zero_points.dtype}, scales {scales.dtype}"
        return torch.round(x.float() * scales.float() + zero_points.float()).clamp(-128, 127).to(torch.int8)

    def npu_dynamic_quant(self, x, smooth_scales=None):
        self._count("npu_dynamic_quant")
        assert smooth_scales is None
        scale = x.float().abs().amax(-1).clamp_min(1e-12) / 127.0
        return torch.round(x.float() / scale[..., None]).clamp(-128, 127).to(torch.int8), scale

    def npu_trans_quant_param(self, scale, offset=None, round_mode=0):
        """float32 scale -> int64: its bits cut to the top 19 (& 0xFFFFE000), bit 46 set (the doc's formula)."""
        self._count("npu_trans_quant_param")
        assert scale.dtype == torch.float32 and scale.is_contiguous() and offset is None and round_mode == 0
        bits = scale.view(torch.int32).to(torch.int64) & 0xFFFFE000
        return bits | (1 << 46)

    def npu_quant_matmul(self, x1, x2, scale, *, offset=None, pertoken_scale=None, bias=None, output_dtype=None):
        """The dtype combinations of the doc's table for Atlas A2/A3 (int8 x1/x2, no offset)."""
        self._count("npu_quant_matmul")
        assert x1.dtype == x2.dtype == torch.int8 and x1.dim() == x2.dim() == 2 and offset is None
        assert x1.shape[1] == x2.shape[0] and x2.is_contiguous(), "x2 is (K, N) and contiguous"
        n = x2.shape[1]
        if scale.dtype == torch.int64:
            assert output_dtype == torch.float16 and pertoken_scale is None
            assert bool(((scale >> 46) & 1).all()), "an int64 scale must come from npu_trans_quant_param"
            scale = (scale & 0xFFFFFFFF).to(torch.int32).view(torch.float32)
        elif output_dtype == torch.float16:
            assert scale.dtype == torch.float32
        assert scale.dtype in (torch.float32, torch.bfloat16) and scale.shape == (n,)
        acc = x1.double() @ x2.double()
        if pertoken_scale is None:
            if bias is not None:
                assert bias.dtype == torch.int32 and bias.shape == (n,)
                acc = acc + bias.double()
            out = acc * scale.double()
        else:
            assert pertoken_scale.dtype == torch.float32 and pertoken_scale.shape == (x1.shape[0],)
            out = acc * scale.double() * pertoken_scale.double()[:, None]
            if bias is not None:
                assert bias.dtype in (torch.bfloat16, torch.float32) and bias.shape == (n,), f"bias {bias.dtype}"
                out = out + bias.double()
        return out.to(output_dtype)


# ------------------------------------------------------------------------- graphs
class GraphRecordingNpu(FakeQuantNpu):
    """The kernels, with FIA calls made while an auto-dispatch capture is under way recorded in that graph; on
    replay each recorded call reads `actual_seq_lengths_kv` from its record (the value at capture, or what
    `update` wrote), not from the step's arguments: a host list is not an input of a captured graph."""

    def __init__(self) -> None:
        super().__init__()
        self.recording: FakeNpuGraph | None = None
        self.replaying: Iterator[dict[str, Any]] | None = None

    def npu_fused_infer_attention_score(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **kw: Any):
        if self.recording is not None:  # the host list torch_npu's handler lets `update` rewrite, where given
            lens = kw.get("actual_seq_lengths_kv")
            self.recording.records.append({} if lens is None else {"actual_seq_lengths_kv": list(lens)})
            self.recording.events.append(False)
        if self.replaying is not None:
            kw.update(next(self.replaying))
        return super().npu_fused_infer_attention_score(query, key, value, **kw)


class FakeNpuGraph:
    """torch.npu.NPUGraph as GraphDecode uses it: pool, replay, and update(list of dicts) as torch_npu 2.13's
    `_GraphDispatchMode.update_capture_record`: one dict applies to every recorded call, else one per call.

    `events[i]`: whether recorded call i's ExternalEvent is recorded (by `update`); a replay consumes it
    (the captured `event.reset`), so each replay of a graph with recorded calls needs an update first.
    """

    def __init__(self) -> None:
        self.call: tuple[Callable[..., torch.Tensor], tuple[Any, ...], torch.Tensor] | None = None
        self.records: list[dict[str, Any]] = []
        self.events: list[bool] = []
        self.auto_dispatch = False
        self.updates: list[list[int]] = []
        self.replays = 0
        self.backend: FakeNpuBackend | None = None

    def pool(self) -> object:
        return ("pool", id(self))

    def update(self, cpu_update_input: list[dict[str, Any]]) -> None:
        if not self.auto_dispatch:
            raise RuntimeError("The current graph configuration does not support update")
        assert self.backend is not None
        if self in self.backend.in_flight:
            raise RuntimeError("update while the previous replay of this graph may still run (no stream sync)")
        inputs = cpu_update_input * len(self.records) if len(cpu_update_input) == 1 else cpu_update_input
        if len(inputs) != len(self.records):
            raise RuntimeError(f"{len(self.records)} recorded operators, {len(inputs)} update inputs")
        for record, new in zip(self.records, inputs):
            record.update({k: v for k, v in new.items() if k in record})
        self.events = [True] * len(self.records)
        self.updates.append(list(cpu_update_input[0]["actual_seq_lengths_kv"]))

    def replay(self) -> None:
        assert self.call is not None and self.backend is not None, "replay before capture"
        if not all(self.events):
            raise RuntimeError(
                "replay waits on an ExternalEvent that no update recorded: on a device this replay hangs"
            )
        self.events = [False] * len(self.records)
        fn, args, output = self.call
        npu = self.backend.npu
        npu.replaying = iter(self.records) if self.records else None  # recorded calls read their records
        try:
            output.copy_(fn(*args))
        finally:
            npu.replaying = None
        self.replays += 1
        self.backend.in_flight.add(self)


class FakeStream:
    def __init__(self, backend: FakeNpuBackend) -> None:
        self.backend = backend

    def wait_stream(self, other: FakeStream) -> None:
        pass

    def synchronize(self) -> None:
        self.backend.in_flight.clear()


class FakeNpuBackend:
    """torch.npu's surface for GraphDecode, graph() taking auto_dispatch_capture as torch_npu 2.13 does."""

    NPUGraph = FakeNpuGraph

    def __init__(self, npu: GraphRecordingNpu) -> None:
        self.npu = npu
        self.capturing: FakeNpuGraph | None = None
        self.in_flight: set[FakeNpuGraph] = set()  # graphs replayed since the last synchronize

    def Stream(self) -> FakeStream:  # noqa: N802 - mirrors torch.npu.Stream
        return FakeStream(self)

    def current_stream(self) -> FakeStream:
        return FakeStream(self)

    @contextlib.contextmanager
    def stream(self, stream: FakeStream) -> Iterator[None]:
        yield

    def synchronize(self) -> None:
        self.in_flight.clear()

    @contextlib.contextmanager
    def graph(self, graph: FakeNpuGraph, pool: object = None, auto_dispatch_capture: bool = False) -> Iterator[None]:
        graph.auto_dispatch, graph.backend = auto_dispatch_capture, self
        self.capturing = graph
        if auto_dispatch_capture:  # torch_npu enters its dispatch mode only then
            self.npu.recording = graph
        try:
            yield
        finally:
            self.capturing, self.npu.recording = None, None


def captured(
    backend: FakeNpuBackend,
    decode: Callable[..., torch.Tensor],
    guard: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext,
) -> Callable[..., torch.Tensor]:
    """`decode` as the stand-in captures it: the call made under `backend.graph` is kept for replay (run under
    `guard`, e.g. a check that it makes no host sync)."""

    def step(*args: Any) -> torch.Tensor:
        if backend.capturing is None:
            return decode(*args)
        with guard():
            out = decode(*args)
        backend.capturing.call = (decode, args, out)
        return out

    return step


def first_run() -> SimpleNamespace:
    """The stand-ins for `python -m cluster.tools.npu_first_run --stand-in tests.npu_stand_in`: the kernels
    (npu), torch.npu's graph surface (backend), and how a step is wrapped to be captured (capture)."""
    npu = GraphRecordingNpu()
    backend = FakeNpuBackend(npu)
    return SimpleNamespace(npu=npu, backend=backend, capture=lambda decode: captured(backend, decode))
