"""The form each CPU matrix product of few rows runs in, chosen per weight shape and row count by timing.

`linear(x, weight, bias)` is F.linear everywhere but on CPU, where a decode step (1-8 rows), a speculative
verification (k + 1 rows per sequence) or a short prompt chunk may run faster in another form:
- **plain**: F.linear (`x @ weight^T`). CPU BLAS packs the weight into its blocked layout inside every
  call once the rows pass its small-row path, so from about 4 rows a product reads and writes the whole
  weight again per call: on one AVX-512/AMX host of this project the 0.5B's LM head took 19 ms at 1-3
  rows and 59-62 ms at 4-8 rows (two threads).
- **packed**: oneDNN's linear over a copy of the weight reordered into its blocked layout once, at tuning
  (`torch.ops.mkldnn._reorder_linear_weight`, what inductor's freezing does for CPU linears): 21 ms at
  4-5 rows and 26 ms at 8 against that LM head, and 1.3-1.6x faster than F.linear at 16-64 rows against
  the 0.5B's MLP. The copy costs the weight's memory again, for the weights that take this form only.
- **swapped**: `weight @ x^T`, one row padded to two; on another 2-core x86 host of this project it was
  1.5-4x faster than F.linear at 1-4 rows.

`tune_cpu_linears(weights)` (ModelRunner runs it on CPU after loading, over its decoder and LM head) times
the three forms for each distinct float weight shape at PROBE_ROWS rows and keeps another form than plain
only where it is at least FORM_GAIN faster; it packs every weight whose shape takes the packed form at
some row count. Each form is timed over one pass through all the weights, in the model's order, as a
decode step reads them: a weight timed alone stays in the last-level cache between calls (hundreds of MB
on such a host), where F.linear's repacking costs little, and the choice would not be the step's. Row
counts between two probes follow the next probe; above the last, plain. The forms sum in other orders
(last bits differ), and a shape near the FORM_GAIN line may get another form from one process to the next.

Under torch.compile (the cpu graph mode) the packed form is the custom op `qwen_vl::packed_linear`, which
inductor calls as it is: its weight argument is the parameter itself, whose packed copy it looks up.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch
import torch.nn.functional as F

PROBE_ROWS = (1, 2, 4, 8, 16, 64)
FORM_GAIN = 1.25  # another form than plain is kept only where it is at least this much faster
FORMS = ("plain", "packed", "swapped")
# (out, in, rows) -> the form measured fastest, for rows 1..PROBE_ROWS[-1] of each shape tuned; absent: plain
_forms: dict[tuple[int, int, int], str] = {}
PACKED_ATTR = "cpu_packed"  # the attribute of a weight that holds (its data_ptr when packed, its packed copy)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, or on CPU the form `tune_cpu_linears` chose for this weight shape and x's row count."""
    if x.device.type == "cpu" and x.dim() == 2:
        form = _forms.get((*weight.shape, x.shape[0]))
        if form == "packed":
            if torch.compiler.is_compiling():
                return torch.ops.qwen_vl.packed_linear(x, weight, bias)
            return packed_linear(x, weight, bias)
        if form == "swapped":
            return swapped_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def swapped_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    rows = x.shape[0]
    if rows == 1:  # weight @ (one column) would be a matrix-vector product: pad to two columns
        x = torch.cat([x, torch.zeros_like(x)])
    y = torch.mm(weight, x.t()).t()[:rows].contiguous()
    return y + bias if bias is not None else y


def pack(weight: torch.Tensor, rows: int = 4) -> torch.Tensor:
    """The weight reordered into oneDNN's blocked layout (for products of about `rows` rows); RuntimeError
    where this build of torch or this CPU has no such reorder for the dtype."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, rows)


def attach_packed(weight: torch.Tensor, packed: torch.Tensor | None = None) -> None:
    """Give `weight` its packed copy (`packed`, made by `pack(weight)` when None); `linear` uses it where the
    packed form was chosen."""
    setattr(weight, PACKED_ATTR, (weight.data_ptr(), pack(weight) if packed is None else packed))


def packed_copy(weight: torch.Tensor) -> torch.Tensor | None:
    """The weight's packed copy; None where it has none, or its storage moved since it was packed (a copy of
    other numbers must never be read). A weight whose numbers are changed in place after it was packed needs
    `attach_packed` again; the engine loads every weight before tuning."""
    held = getattr(weight, PACKED_ATTR, None)
    return held[1] if held is not None and held[0] == weight.data_ptr() else None


def _mkldnn_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight^T + bias through the weight's packed copy (`packed_copy`); F.linear where it has none."""
    packed = packed_copy(weight)
    return F.linear(x, weight, bias) if packed is None else _mkldnn_linear(x, packed, bias)


@torch.library.custom_op("qwen_vl::packed_linear", mutates_args=())
def _packed_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return packed_linear(x, weight, bias)


@_packed_linear_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


def _run(form: str, x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | None) -> None:
    if form == "packed":
        _mkldnn_linear(x, packed, None)
    elif form == "swapped":
        swapped_linear(x, weight, None)
    else:
        F.linear(x, weight)


def _time_pass(
    weights: list[torch.Tensor], packs: dict[int, torch.Tensor], rows: int, form: str
) -> dict[tuple[int, int], float]:
    """Seconds per weight shape of one product of `rows` rows with each weight in turn, in `form` (weights with
    no packed copy are left out of the packed form). One pass over all of them, as a decode step goes
    through its layers, so that each weight comes from memory, not from a cache the one before left warm."""
    xs = {(w.shape[1], w.dtype): torch.randn(rows, w.shape[1], dtype=w.dtype) for w in weights}
    spent: dict[tuple[int, int], float] = {}
    for weight in weights:
        packed = packs.get(id(weight))
        if form == "packed" and packed is None:
            continue
        shape = (int(weight.shape[0]), int(weight.shape[1]))
        x = xs[(weight.shape[1], weight.dtype)]
        start = time.perf_counter()
        _run(form, x, weight, packed)
        spent[shape] = spent.get(shape, 0.0) + time.perf_counter() - start
    return spent


@torch.inference_mode()
def tune_cpu_linears(weights: Iterable[torch.Tensor]) -> dict[tuple[int, int, int], str]:
    """Choose each distinct float CPU weight shape's form at PROBE_ROWS rows by timing (`linear`), then keep the
    packed copies of the weights whose shape takes the packed form anywhere. Each form is timed over a pass
    through all the weights given, in their order (`_time_pass`), after one product per shape that warms it
    up. Shapes measured before in this process are not timed again (their weights are packed by the choice
    made then). Returns the choices made now, (out, in, probe rows) -> form."""
    known = {key[:2] for key in _forms}
    eligible = [w for w in weights if w.device.type == "cpu" and w.dim() == 2 and w.dtype.is_floating_point]
    weights = [w for w in eligible if tuple(w.shape) not in known]
    packs: dict[int, torch.Tensor] = {}
    for weight in weights:
        try:
            packs[id(weight)] = pack(weight)
        except RuntimeError:  # no reorder for this dtype here: the packed form is not timed for it
            pass
    firsts = list({tuple(w.shape): w for w in reversed(weights)}.values())  # one weight of each shape
    made: dict[tuple[int, int, int], str] = {}
    for rows in PROBE_ROWS if weights else ():
        times: dict[str, dict[tuple[int, int], float]] = {}
        for form in FORMS:
            _time_pass(firsts, packs, rows, form)  # one-time costs (a kernel made for this shape and rows)
            times[form] = _time_pass(weights, packs, rows, form)
        for shape, plain in times["plain"].items():
            best = min((form for form in FORMS if shape in times[form]), key=lambda form: times[form][shape])
            made[(*shape, rows)] = best if times[best][shape] * FORM_GAIN <= plain else "plain"
    for (out, inp, probe), form in made.items():  # the probe's choice for each row count it stands for
        below = max((p for p in PROBE_ROWS if p < probe), default=0)
        _forms.update({(out, inp, rows): form for rows in range(below + 1, probe + 1)})
    chosen = {key[:2] for key, form in _forms.items() if form == "packed"}
    for weight in eligible:  # those of shapes tuned before too (a second model of this process)
        if tuple(weight.shape) in chosen and packed_copy(weight) is None:
            try:
                attach_packed(weight, packs.get(id(weight)))
            except RuntimeError:  # no reorder for this dtype here: `linear` falls back to F.linear
                pass
    return made
