"""What the hooks accumulate during a pass, the one buffer that carries it to the host (and across
ranks), and how that buffer becomes `ModelStats`.

Each accumulator travels as `(Key, tensor)`; the key says how copies from several processes combine
(`Reduce`), so the host copy and `distributed.py` share one protocol instead of parsing tuples.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import operator

import torch
from torch import nn

from . import thresholds as T
from . import vocab
from .lineage import ActivationCall, Graph
from .stats import (
    ActivationStats,
    LayerStats,
    ModelStats,
    Moments,
    Sums,
    as_float,
    sample_dims,
    scaled,
    summary_of,
    units_view,
)
from .weights import (
    NORM_MODULES,
    Extremes,
    fans,
    kind,
    layout_known,
    local,
    main_weight,
    parametrization,
    sharded,
    symmetry_all,
    trained_weight,
    weight_rows,
)

# --- the buffer protocol --------------------------------------------------------------------


class Reduce(enum.Enum):
    """How one accumulator's copies from several processes combine."""

    FIRST = "first"  # replicated (weights under DDP): rank 0's copy
    SUM = "sum"  # counts; and the shards of a sharded parameter (FSDP), whose parts add up
    MAX = "max"
    MIN = "min"
    MOMENTS = "moments"  # an (n, mean, m2) triple, merged with Chan's formula


# what -> how copies combine (moments and sharded parameters decide by their key instead)
REDUCTIONS = {
    "out": Reduce.MOMENTS, "grad": Reduce.MOMENTS, "actin": Reduce.MOMENTS,  # stats.Sums, as MOMENT_PARTS
    "actn": Reduce.SUM,  # samples a nonlinearity saw
    "sat": Reduce.SUM,  # per-unit count of saturated samples
    "maxv": Reduce.MAX,  # per-unit maximum of a rectifier's output
    "outbad": Reduce.SUM,  # non-finite entries of the model's outputs
    "pbad": Reduce.MAX,  # non-finite entries per other parameter (replicated under DDP)
    "w": Reduce.FIRST, "b": Reduce.FIRST,  # [sum, sum of squares] of a layer's weight and bias
    "wmax": Reduce.MAX, "wmin": Reduce.MIN,  # a layer's largest and smallest weight (over shards too)
    "gw": Reduce.FIRST,  # sum of squares of a layer's weight gradient
    "norms": Reduce.FIRST,  # sum |w| of each norm layer's weight (zero: a deliberate zero-init)
    "values": Reduce.FIRST, "wvalues": Reduce.FIRST, "gvalues": Reduce.FIRST,  # a few values for histograms
    "stream": Reduce.SUM,  # a stream norm's [sum_r |g_r|^2 q_r, sum_r |g_r|^2] (rows r of its input)
}
MOMENT_PARTS = ("n", "k", "s1", "s2", "scale")  # stats.Sums ("scale" only where it has one)
# kept values -> the ModelStats.values kind they fill (histograms)
VALUE_KINDS = {"values": "activations", "wvalues": "weights", "gvalues": "weight_gradients"}


class Key(tuple):
    """Names one accumulator: what it is (one of REDUCTIONS), the layer or activation record, and for
    moments its part (one of MOMENT_PARTS). `sharded` (a shard's local part) changes how copies combine
    but not which accumulator it is: keys equal without it. A tuple of the three, so that hashing and
    comparing run at C speed (building the statistics looks keys up a few hundred times a sample)."""

    what = property(operator.itemgetter(0))
    name = property(operator.itemgetter(1))
    part = property(operator.itemgetter(2))

    def __new__(cls, what: str, name: str = "", part: str = "", sharded: bool = False) -> Key:
        key = tuple.__new__(cls, (what, name, part))
        key.sharded = sharded
        return key

    def __repr__(self) -> str:
        return f"Key({self[0]!r}, {self[1]!r}, {self[2]!r}{', sharded=True' if self.sharded else ''})"

    def __reduce__(self):
        return Key, (*self, self.sharded)

    def with_part(self, part: str) -> Key:
        return Key(self[0], self[1], part, self.sharded)

    @property
    def reduce(self) -> Reduce:
        return Reduce.SUM if self.sharded else REDUCTIONS[self[0]]


Buffer = list[tuple[Key, torch.Tensor]]


def _layout(items: Buffer) -> list[int]:
    """The order in which `pack` lays items out: grouped by dtype and device (first seen first), so
    that each group is one concatenation, one conversion and one copy, not one per tensor (kernel
    launches on a GPU)."""
    groups: dict[tuple, list[int]] = {}
    for i, (_, t) in enumerate(items):
        groups.setdefault((t.dtype, t.device), []).append(i)
    return [i for idx in groups.values() for i in idx]


def pack(items: Buffer) -> torch.Tensor:
    """Every tensor of a buffer flattened into one float64 vector (on the first accelerator's device
    among them, else the CPU: the counts known on the host travel with the device's tensors)."""
    dev = next((t.device for _, t in items if t.device.type != "cpu"), items[0][1].device)
    parts: list[torch.Tensor] = []
    order = _layout(items)
    start = 0
    while start < len(order):
        first = items[order[start]][1]
        end = start
        while end < len(order) and (items[order[end]][1].dtype, items[order[end]][1].device) == (
                first.dtype, first.device):
            end += 1
        parts.append(torch.cat([items[i][1].reshape(-1) for i in order[start:end]]).to(dev).double())
        start = end
    return torch.cat(parts)


def unpack(flat: torch.Tensor, like: Buffer) -> Buffer:
    """The inverse of `pack`, shaped as `like`."""
    out: list[tuple[Key, torch.Tensor] | None] = [None] * len(like)
    pos = 0
    for i in _layout(like):
        key, t = like[i]
        n = t.numel()
        out[i] = (key, flat[pos:pos + n].reshape(t.shape))
        pos += n
    return out  # type: ignore[return-value]


def to_host(items: Buffer) -> dict[Key, torch.Tensor]:
    """One device-to-host copy for all accumulators (per device). CPU tensors are taken as they are
    (no copy, no conversion on the training thread): `build_stats` converts what it reads."""
    by_dev: dict[torch.device, Buffer] = {}
    out: dict[Key, torch.Tensor] = {}
    for key, t in items:
        if t.device.type == "cpu":
            out[key] = t
        else:
            by_dev.setdefault(t.device, []).append((key, t))
    for part in by_dev.values():
        out.update(unpack(pack(part).cpu(), part))
    return out


def combine(items: list[tuple[Key, list[torch.Tensor]]]) -> Buffer:
    """Per key, one tensor from every rank's copy, as if one process had seen the whole batch."""
    parts = dict(items)
    out: Buffer = []
    done: set[Key] = set()
    for key, copies in items:
        if key in done:
            continue
        if key.reduce is Reduce.MOMENTS:
            # each copy's sums -> moments, merged by Chan's formula, back as sums shifted by the mean
            keys = {p: key.with_part(p) for p in MOMENT_PARTS}
            merged = Moments()
            for r in range(len(copies)):
                k = parts[keys["k"]][r] if keys["k"] in parts else None
                scale = parts[keys["scale"]][r] if keys["scale"] in parts else None
                n = float(parts[keys["n"]][r][0])
                merged = merged.merge(Sums(n, parts[keys["s1"]][r], parts[keys["s2"]][r], k, scale).moments())
            dev = copies[0].device
            n = torch.tensor([merged.n], dtype=torch.float64, device=dev)
            mean, m2 = merged.mean.to(dev), merged.m2.to(dev)
            out += [(keys["n"], n), (keys["k"], mean), (keys["s1"], torch.zeros_like(mean)), (keys["s2"], m2)]
            done.update(keys.values())
            continue
        if key.reduce is Reduce.SUM:
            value = torch.stack(copies).sum(0)
        elif key.reduce is Reduce.MAX:
            value = torch.stack(copies).amax(0)
        elif key.reduce is Reduce.MIN:
            value = torch.stack(copies).amin(0)
        else:
            value = copies[0]
        out.append((key, value))
        done.add(key)
    return out


# --- what the hooks accumulate ----------------------------------------------------------------


EXACT_COUNT = 1 << 24  # float32 counts up to this are exact


def saturated(kind_: str, y: torch.Tensor, dims: list[int]) -> torch.Tensor:
    """Per-unit count of outputs on a saturating nonlinearity's flat tails. The test writes 1.0/0.0
    in place into a float copy, which is summed: a bool mask costs twice as much to make (scratch:
    54 -> 23 µs for 128x512 on the CPU). float32 counts are exact below 2^24 samples per unit; more
    go through an int32 sum of the mask."""
    if kind_ == "sigmoid":  # the tails are symmetric about 1/2: y < LO or y > HI = 1 - LO
        far, bound = (y - 0.5).abs_(), 0.5 - T.SIGMOID_LO
    else:
        far, bound = y.abs(), T.TANH_ABS
    if y.numel() // max(math.prod(y.shape[d] for d in range(y.dim()) if d not in dims), 1) >= EXACT_COUNT:
        return (far > bound).sum(dim=dims, dtype=torch.int32)
    return far.gt_(bound).sum(dim=dims)


NONFINITE_CHUNK = 1 << 22  # entries per pass on the CPU: a bounded copy (16 MiB of float32), an exact count


def nonfinite_count(t: torch.Tensor, mask: bool | None = None) -> torch.Tensor:
    """How many entries of a floating tensor are NaN or Inf (a float64 count, exact).

    On the CPU, where `isfinite` is not vectorized (233 µs for 8x32x500 against 30 µs so, scratch):
    x - x is 0 exactly where x is finite, and the test writes 1.0/0.0 in place into that copy, which
    is summed; in slices of rows of at most NONFINITE_CHUNK entries, so that a language model's
    logits are not copied whole. Elsewhere (`mask`): one byte-per-entry `isfinite` mask, the least
    memory and traffic where every kernel is bandwidth-bound."""
    if mask is None:
        mask = t.device.type != "cpu"
    if mask:
        return (t.numel() - torch.isfinite(t).sum()).to(torch.float64)
    if t.dim() == 0 or t.numel() <= NONFINITE_CHUNK:
        return (t - t).ne_(0).sum(dtype=torch.float32).double()  # float32: exact below 2^24
    rows = max(1, NONFINITE_CHUNK // max(t[0].numel(), 1))
    total = torch.zeros((), dtype=torch.float64)
    for part in t.split(rows):
        total += (part - part).ne_(0).sum(dtype=torch.float32)
    return total


def _add(table: dict[str, Sums], name: str, t: torch.Tensor, ud: int, pooled: bool) -> None:
    """A layer's output (per unit) or gradient (pooled over units); later calls add up."""
    if name in table:
        table[name].add(t, ud)
    else:
        s = Sums.over(t, ud, pooled=pooled)
        if s is not None:
            table[name] = s


def _add_input(acc: ActAcc, x: torch.Tensor, ud: int) -> None:
    """A saturating nonlinearity's input, per unit (the median unit's spread is what ID302 reads)."""
    if acc.inp is None:
        acc.inp = Sums.over(x, ud, pooled=False)
    elif acc.inp.s1.numel() == (x.shape[ud] if x.dim() else 1):
        acc.inp.add(x, ud)


@dataclasses.dataclass
class ActAcc:
    """One nonlinearity's accumulators."""

    kind: str
    layer: str | None  # the weight layer it follows
    module: str  # the module path it belongs to
    gate: str | None = None  # a recurrent gate's name ("i", "f", "g", "o", "r", "z", "n")
    n: float = 0.0  # samples seen (per unit)
    units: int = 0
    inp: Sums | None = None  # the nonlinearity's input, per unit (saturating kinds)
    sat: torch.Tensor | None = None  # per-unit count of saturated samples
    maxv: torch.Tensor | None = None  # per-unit signed maximum
    calls: int = 0
    index: int = -1


class Accumulators:
    """Per-layer and per-nonlinearity reductions of one pass, on the model's device."""

    def __init__(self, keep_values: int = 0) -> None:
        self.keep_values = keep_values  # values of each layer's output and weights kept for histograms
        self.order: list[str] = []  # weight layers in execution order
        self.calls: dict[str, int] = {}
        self.unit_dims: dict[str, int] = {}
        self.out: dict[str, Sums] = {}
        self.grad: dict[str, Sums] = {}
        self.acts: dict[str, ActAcc] = {}
        self.values: dict[str, torch.Tensor] = {}
        self.out_bad: list[torch.Tensor] = []
        self.stream_rows: dict[int, torch.Tensor] = {}  # per-row second moment of a stream norm's input
        self.stream: dict[int, torch.Tensor] = {}  # its gradient-weighted [sum |g|^2 |x|^2, sum |g|^2]
        self.stream_width: dict[int, int] = {}
        self._last_output: tuple[torch.Tensor | None, str] = (None, "")  # the latest layer output

    def called(self, layer: str) -> None:
        if layer not in self.calls:
            self.order.append(layer)
            self.calls[layer] = 0
        self.calls[layer] += 1

    def layer_output(self, layer: str, y: torch.Tensor, ud: int) -> None:
        self.unit_dims[layer] = ud
        # large ones per unit (as cheap there): a saturating nonlinearity that takes this very tensor
        # reads its spread from them
        _add(self.out, layer, y, ud, pooled=not scaled(y))
        self._last_output = (y, layer)
        if self.keep_values and layer not in self.values:
            self.values[layer] = y.detach().reshape(-1)[: self.keep_values].clone()

    def gradient(self, layer: str, g: torch.Tensor, ud: int) -> None:
        _add(self.grad, layer, g, ud, pooled=True)

    def stream_input(self, index: int, x: torch.Tensor) -> None:
        x = as_float(x.detach())
        self.stream_rows[index] = torch.linalg.vector_norm(x, dim=-1, dtype=torch.float64).square_().reshape(-1)
        self.stream_width[index] = x.shape[-1]

    def stream_gradient(self, index: int, g: torch.Tensor) -> None:
        """The stream's scale as the gradient sees it: rows weighted by |dL/dx_row|^2, so rows that the
        loss barely reaches (a class token's neighbours, padding) do not set it."""
        gr = torch.linalg.vector_norm(as_float(g.detach()), dim=-1, dtype=torch.float64).square_().reshape(-1)
        # [sum |g_r|^2 |x_r|^2, sum |g_r|^2]; q_r = |x_r|^2 / width is applied on the host
        v = torch.stack([torch.dot(gr, self.stream_rows[index]), gr.sum()])
        self.stream[index] = v if index not in self.stream else self.stream[index] + v

    def model_output(self, t: torch.Tensor) -> None:
        if t.is_floating_point():
            self.out_bad.append(nonfinite_count(t.detach()).reshape(1))

    def _acc(self, record: str, kind_: str, layer: str | None, module: str, gate: str | None = None) -> ActAcc:
        acc = self.acts.get(record)
        if acc is None:
            acc = self.acts[record] = ActAcc(kind_, layer, module, gate, index=len(self.acts))
        acc.calls += 1
        return acc

    def activation(self, call: ActivationCall) -> None:
        ud = self.unit_dims.get(call.layer, -1) if call.layer else (1 if call.out.dim() >= 4 else -1)
        if call.layer and ud == -1 and call.out.dim() >= 4:
            width = self.out[call.layer].units if call.layer in self.out else 0
            if width and call.out.shape[-1] != width:
                ud = 1  # the layer's output viewed as an image (a generator's head): channels are the units
        y = call.out.detach()
        dims = sample_dims(y, ud)
        if dims is None:  # units last: a (samples, units) view, no copy
            y, dims = units_view(y, ud), [0]
        units = (y.shape[ud] if dims != [0] else y.shape[1]) if y.numel() else 0
        record, k = call.record, 1
        while record in self.acts and self.acts[record].units and units and self.acts[record].units != units:
            k += 1  # one record, another width (a dense block's growing concatenation): a record of its own
            record = f"{call.record}#{k}"
        acc = self._acc(record, call.kind, call.layer, call.module)
        if y.numel():
            acc.units = units
            acc.n += y.numel() / acc.units
        if call.kind in vocab.SATURATING:
            cnt = saturated(call.kind, as_float(y), dims)
            acc.sat = cnt if acc.sat is None else acc.sat + cnt
            if isinstance(call.x, torch.Tensor) and call.x is not call.out:
                last, layer = self._last_output
                if (acc.inp is None and call.x is last and self.calls.get(layer) == 1
                        and self.unit_dims.get(layer) == ud and layer in self.out and not self.out[layer].pooled):
                    acc.inp = dataclasses.replace(self.out[layer])  # the layer's own output: its sums
                else:
                    _add_input(acc, call.x, ud)
        if call.kind in vocab.DYING and y.numel():
            mx = y.amax(dim=dims)
            acc.maxv = mx if acc.maxv is None else torch.maximum(acc.maxv, mx)

    def gate(self, record: str, module: str, gate: str, kind_: str, pre: torch.Tensor, post: torch.Tensor) -> None:
        """A recurrent gate rebuilt from its layer's weights: pre- and post-activation, units last."""
        acc = self._acc(record, kind_, None, module, gate)
        yv, xv = units_view(post, -1), units_view(pre, -1)
        acc.n += yv.shape[0]
        acc.units = yv.shape[1]
        _add_input(acc, xv, -1)
        cnt = saturated(kind_, as_float(yv), [0])
        acc.sat = cnt if acc.sat is None else acc.sat + cnt

    # -- to the host --
    def buffer(self, model: nn.Module, layers: dict[str, nn.Module], grads: dict[int, torch.Tensor] | None,
               others: list[tuple[str, torch.Tensor]] | None = None,
               norms: list[tuple[str, nn.Module]] | None = None) -> Buffer:
        """Every accumulator, and the weights' sums, as (Key, tensor): a few reductions per layer on
        the device, nothing converted here (counts known on the host are CPU tensors).

        `others` (default `other_params`): parameters checked for non-finite values only; `norms`
        (default `norm_layers`): norm layers whose zero weight marks a deliberate zero-init."""
        items: Buffer = []
        squares: Buffer = []  # flat weights, gradients and biases whose sums of squares are wanted

        def sums(what: str, name: str, s: Sums | None) -> None:
            if s is not None:
                items.append((Key(what, name, "n"), torch.tensor([s.n], dtype=torch.float64)))
                items.extend([(Key(what, name, "s1"), s.s1), (Key(what, name, "s2"), s.s2)])
                if s.k is not None:
                    items.append((Key(what, name, "k"), s.k))
                if s.scale is not None:
                    items.append((Key(what, name, "scale"), s.scale))

        for name, s in self.out.items():
            sums("out", name, s)
        for name, s in self.grad.items():
            sums("grad", name, s)
        for name, a in self.acts.items():
            items.append((Key("actn", name), torch.tensor([a.n], dtype=torch.float64)))
            sums("actin", name, a.inp)
            if a.sat is not None:
                items.append((Key("sat", name), a.sat))
            if a.maxv is not None:
                items.append((Key("maxv", name), a.maxv))
        for name, m in layers.items():
            w = main_weight(m)
            if w is not None:
                lw = as_float(local(w).detach()).reshape(-1)
                if lw.numel():
                    shard = sharded(w)
                    lo, hi = torch.aminmax(lw)  # the largest |w| without an |w| copy of the weight
                    items += [(Key("w", name, "s1", sharded=shard), lw.sum()),
                              (Key("wmin", name), lo), (Key("wmax", name), hi)]
                    squares.append((Key("w", name, "s2", sharded=shard), lw))
                tw = trained_weight(m)
                if grads is not None and tw is not None and id(tw) in grads:
                    g = grads[id(tw)]
                    squares.append((Key("gw", name, sharded=sharded(g)), as_float(local(g.detach())).reshape(-1)))
            b = m._parameters.get("bias")
            if isinstance(b, torch.Tensor) and b.numel():
                lb = as_float(local(b).detach()).reshape(-1)
                shard = sharded(b)
                items.append((Key("b", name, "s1", sharded=shard), lb.sum()))
                squares.append((Key("b", name, "s2", sharded=shard), lb))
        items += sums_of_squares(squares)
        for index, v in self.stream.items():
            items.append((Key("stream", str(index)), v))
        for name, t in self.values.items():
            items.append((Key("values", name), t))
            w = main_weight(layers[name]) if name in layers else None
            if w is not None:
                items.append((Key("wvalues", name), local(w).detach().reshape(-1)[: self.keep_values].clone()))
            tw = trained_weight(layers[name]) if name in layers else None
            if grads is not None and tw is not None and grads.get(id(tw)) is not None:
                g = local(grads[id(tw)].detach()).reshape(-1)[: self.keep_values].clone()
                items.append((Key("gvalues", name), g))
        if self.out_bad:
            bad = self.out_bad[0] if len(self.out_bad) == 1 else torch.cat(
                [t.to(self.out_bad[0].device, torch.float64) for t in self.out_bad]).sum(0, True)
            items.append((Key("outbad"), bad))
        others = other_params(model, layers) if others is None else others
        if others:  # sum |p|: not finite exactly when p holds a NaN or Inf (counted on the host then)
            items.append((Key("pbad"), _l1_norms([local(p).detach() for _, p in others])))
        norms = norm_layers(model, layers) if norms is None else norms
        if norms:
            items.append((Key("norms"), _l1_norms([local(m.weight).detach() for _, m in norms])))
        return items


def sums_of_squares(items: Buffer, foreach: bool | None = None) -> Buffer:
    """Each flat tensor's sum of squares (float32), under its key. On the CPU one `torch.dot` each
    (faster there than a `_foreach_norm` call, which loops over the tensors: measured); elsewhere
    (`foreach`) one `_foreach_norm` per device and dtype, squared in place: two launches for all the
    layers instead of one per tensor."""
    out: Buffer = []
    groups: dict[tuple, Buffer] = {}
    for key, t in items:
        if (t.device.type != "cpu") if foreach is None else foreach:
            groups.setdefault((t.device, t.dtype), []).append((key, t))
        else:
            out.append((key, torch.dot(t, t)))
    for group in groups.values():
        norms = list(torch._foreach_norm([t for _, t in group], 2))
        torch._foreach_mul_(norms, norms)
        out += [(key, n) for (key, _), n in zip(group, norms)]
    return out


def _l1_norms(ts: list[torch.Tensor]) -> torch.Tensor:
    """sum |t| of each tensor, in one call where they share a device."""
    dev = ts[0].device
    if all(t.device == dev for t in ts):
        return torch.stack(torch._foreach_norm(ts, 1))
    return torch.stack([torch.linalg.vector_norm(t, 1).float().to(dev) for t in ts])


def norm_layers(model: nn.Module, layers: dict[str, nn.Module]) -> list[tuple[str, nn.Module]]:
    """Norm layers (not measured as weight layers) with a weight: a zero one is a deliberate zero-init."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, NORM_MODULES) and n not in layers and isinstance(getattr(m, "weight", None), torch.Tensor)]


def other_params(model: nn.Module, layers: dict[str, nn.Module]) -> list[tuple[str, torch.Tensor]]:
    """Floating parameters other than the layers' main weights (checked for non-finite values only)."""
    mains = {id(main_weight(m)) for m in layers.values()}
    return [(n, p) for n, p in model.named_parameters() if p.is_floating_point() and id(p) not in mains]


# --- the host copy -> ModelStats --------------------------------------------------------------


def _host_sums(host: dict[Key, torch.Tensor], what: str, name: str) -> Sums | None:
    n = host.get(Key(what, name, "n"))
    if n is None:
        return None
    return Sums(float(n[0]), host[Key(what, name, "s1")], host[Key(what, name, "s2")],
                host.get(Key(what, name, "k")), host.get(Key(what, name, "scale")))


def _moments(host: dict[Key, torch.Tensor], what: str, name: str) -> Moments:
    s = _host_sums(host, what, name)
    return Moments() if s is None else s.moments()


def _pair(host: dict[Key, torch.Tensor], what: str, name: str) -> tuple[float, float] | None:
    """A tensor's [sum, sum of squares] from the host copy."""
    s1 = host.get(Key(what, name, "s1"))
    return None if s1 is None else (float(s1), float(host[Key(what, name, "s2")]))


def nonzero_norms(host: dict[Key, torch.Tensor], model: nn.Module, layers: dict[str, nn.Module],
                  norms: list[tuple[str, nn.Module]] | None = None) -> list[str]:
    """Norm layers (not measured as weight layers) whose weight is not all zero: the ones to reset.
    Zero-weight norms are deliberate (zero-init residual). Read from the host copy (`norms`, in the
    order of `norm_layers`, which `norms` gives when the caller has it already)."""
    v = host.get(Key("norms"))
    if v is None:
        return []
    return [n for (n, _), x in zip(norm_layers(model, layers) if norms is None else norms, v.tolist()) if x != 0]


def reads_weights(host: dict[Key, torch.Tensor]) -> bool:
    """Whether `build_stats` will read live weights (to count the non-finite entries of a weight, a
    bias or another parameter whose sums are not finite)."""
    for key, t in host.items():
        if key.what in ("w", "b", "pbad") and not all(math.isfinite(x) for x in t.reshape(-1).tolist()):
            return True
    return False


def build_stats(model: nn.Module, layers: dict[str, nn.Module], graph: Graph, acc: Accumulators,
                host: dict[Key, torch.Tensor], grads: dict[int, torch.Tensor] | None, backward: bool,
                symmetry: bool, *, others: list[tuple[str, torch.Tensor]] | None = None,
                norms: list[tuple[str, nn.Module]] | None = None, static: dict | None = None) -> ModelStats:
    """ModelStats from the host copy of the buffer, the structure the graph saw, and the weights.

    It reads the live weights only for `symmetry`, for trained norm gains, and where
    `reads_weights(host)`. `others` and `norms` are `other_params` and `norm_layers` where the
    caller has them; `static` keeps what each layer's module alone decides (its kind, fans, ...)
    from one call to the next while the modules stay the same (probe.Structure)."""
    order = {n: i for i, n in enumerate(acc.order)}
    out = [_layer_stats(name, m, order, graph, acc, host, static) for name, m in layers.items()]
    _ties(out, layers)
    if symmetry:
        _symmetry(out, layers, grads, host)
    acts = [_act_stats(name, a, host) for name, a in acc.acts.items()]
    by_layer = {a.layer: a for a in acts if a.layer}
    for lay in out:
        a = by_layer.get(lay.name)
        if a is not None:
            lay.saturated, lay.saturated_units = a.saturated, a.saturated_units
            lay.dead, lay.preact_std = a.dead, a.preact_std
    norms = nonzero_norms(host, model, layers, norms)
    out_bad = int(host[Key("outbad")].sum()) if Key("outbad") in host else 0
    stats = ModelStats(out, acts, norms, out_bad, backward, residual_adds=graph.residual_adds,
                       trained_norms=[n for n in norms if _varies(model.get_submodule(n))])
    for key, t in host.items():
        if key.what in VALUE_KINDS:
            stats.values[(VALUE_KINDS[key.what], key.name)] = t.float()
    stats.unknown_ops = [(lay.name, graph.unknown[lay.name]) for lay in out if lay.name in graph.unknown]
    if Key("pbad") in host:
        for (pname, p), l1 in zip(other_params(model, layers) if others is None else others,
                                  host[Key("pbad")].tolist()):
            if not math.isfinite(l1):
                stats.nonfinite_params.append((pname, int((~torch.isfinite(local(p).detach())).sum())))
    return stats


def _varies(norm: nn.Module) -> bool:
    """Whether a norm layer's affine parameters differ across channels: gains a model was trained to,
    which no initialization chooses (at init they are constant: ones and zeros, or one chosen value)."""
    for p in (getattr(norm, "weight", None), getattr(norm, "bias", None)):
        if isinstance(p, torch.Tensor) and p.numel() > 1:
            v = local(p).detach()
            if bool((v != v.reshape(-1)[0]).any()):
                return True
    return False


def _ties(stats: list[LayerStats], layers: dict[str, nn.Module]) -> None:
    """Layers that share one weight tensor (a language model's head tied to its embedding)."""
    by_weight: dict[int, list[LayerStats]] = {}
    for lay in stats:
        w = layers[lay.name]._parameters.get("weight")
        if isinstance(w, torch.Tensor):
            by_weight.setdefault(id(w), []).append(lay)
    for group in by_weight.values():
        if len(group) < 2:
            continue
        emb = next((lay.name for lay in group if lay.kind == vocab.EMBEDDING), None)
        for lay in group:
            lay.tied = [other.name for other in group if other is not lay]
            lay.tied_embedding = emb if lay.kind != vocab.EMBEDDING else None


def _symmetry(stats: list[LayerStats], layers: dict[str, nn.Module], grads: dict[int, torch.Tensor] | None,
              host: dict[Key, torch.Tensor] | None = None) -> None:
    """Each layer's row symmetry (a tied weight once, under its first layer), screened together.

    Where a layer's rows are its whole plain weight, the screen takes the weight's extremes and the
    gradient's norm from the host copy instead of reading both tensors again (`Extremes`)."""
    seen: set[int] = set()
    items, owners = [], []
    for lay in stats:
        m = layers[lay.name]
        w = main_weight(m)
        if w is None or id(w) in seen:
            continue
        seen.add(id(w))
        tol = T.DUP_TOL.get(lay.dtype, T.DUP_TOL["default"])
        parts = list(weight_rows(m, grads, lay.transposed))
        known = _extremes(host, lay.name, m) if len(parts) == 1 and lay.parametrization is None else None
        for label, rows, grows in parts:
            items.append((label, rows, grows, tol, known))
            owners.append(lay)
    for lay, sym in zip(owners, symmetry_all(items)):
        lay.symmetry.append(sym)


def _extremes(host: dict[Key, torch.Tensor] | None, name: str, m: nn.Module) -> Extremes | None:
    if host is None or Key("wmin", name) not in host or Key("gw", name) not in host:
        return None
    b = m._parameters.get("bias")
    return Extremes(float(host[Key("wmin", name)]), float(host[Key("wmax", name)]),
                    float(host[Key("b", name, "s2")]) if isinstance(b, torch.Tensor) and Key("b", name, "s2") in host
                    else 0.0, float(host[Key("gw", name)]))


def _layer_stats(name, m, order, graph: Graph, acc: Accumulators, host, static: dict | None = None) -> LayerStats:
    w = main_weight(m)
    params = [p for p in m._parameters.values() if p is not None]
    transposed: bool | None = name in graph.transposed
    # what the module alone decides; fans also follow the weight's shape (`p.data = ...` can change it)
    key = (name, transposed, tuple(w.shape) if w is not None else None)
    info = static.get(key) if static is not None else None
    if info is None:
        info = (type(m).__name__, kind(m), parametrization(m), layout_known(m), fans(m, transposed))
        if static is not None:
            static[key] = info
    type_name, kind_, param_, known, (fi, fo) = info
    if name not in order and not known:  # never ran: (out, in) or (in, out) was not observed
        transposed = fi = fo = None
    lay = LayerStats(name=name, type=type_name, kind=kind_, index=order.get(name, -1),
                     transposed=transposed, parametrization=param_,
                     calls=acc.calls.get(name, 0),
                     weight_shape=list(w.shape) if w is not None else [], fan_in=fi, fan_out=fo,
                     frozen=bool(params) and not any(p.requires_grad for p in params),
                     dtype=str(w.dtype).replace("torch.", "") if w is not None else "float32")
    ws = _pair(host, "w", name)
    if ws is not None:
        for k, v in summary_of(w.numel(), *ws, local(w)).items():
            setattr(lay, k, v)
    if Key("wmax", name) in host and lay.weight_nonfinite == 0:
        lay.weight_absmax = max(-float(host[Key("wmin", name)]), float(host[Key("wmax", name)]))
    bias = m._parameters.get("bias")
    lay.has_bias = isinstance(bias, torch.Tensor) and bias.numel() > 0
    bsum = _pair(host, "b", name)
    if bsum is not None:
        bs = summary_of(bias.numel(), *bsum, local(bias))
        lay.bias_mean, lay.bias_std = bs["weight_mean"], bs["weight_std"]
    follows = graph.follows.get(name)
    if follows is not None:
        lay.activation, lay.activation_param, lay.activation_module = follows.kind, follows.param, follows.record
    elif lay.index >= 0:
        lay.activation = "identity"
    norm = graph.stream_norm_of(name)
    if norm is not None and Key("stream", str(norm)) in host:
        num, den = host[Key("stream", str(norm))].tolist()
        width = acc.stream_width.get(norm, 0)
        lay.stream_q = num / den / width if den > 0 and width and math.isfinite(num / den) else None
    lay.fed_by = graph.fed_by.get(name)
    if lay.fed_by is None and lay.index >= 0 and lay.kind == vocab.ATTENTION:
        lay.fed_by = "other"
    lay.is_output = name in graph.outputs
    lay.residual = name in graph.residual_writers
    lay.fed_from = sorted(s for s, t in graph.feeds.items() if t == name)
    lay.normalized = name in graph.normalized
    so = _host_sums(host, "out", name)
    if so is not None and so.n > 0:
        lay.units, lay.samples = so.units, int(so.n)
        lay.output_nonfinite, lay.q, lay.signal = so.summary()
        lay.r = lay.signal / lay.q if lay.q and math.isfinite(lay.q) and lay.q > 0 else None
    sg = _host_sums(host, "grad", name)
    if sg is not None and sg.n > 0:
        lay.grad_nonfinite, lay.grad_q, _ = sg.summary()
    if Key("gw", name) in host:
        sumsq = float(host[Key("gw", name)])
        tw = w if param_ is None else trained_weight(m)
        lay.weight_grad_rms = math.sqrt(sumsq / max(tw.numel() if tw is not None else w.numel(), 1))
        if lay.weight_rms:
            lay.weight_grad_ratio = lay.weight_grad_rms / lay.weight_rms
    return lay


def _act_stats(name: str, a: ActAcc, host: dict[Key, torch.Tensor]) -> ActivationStats:
    n = float(host[Key("actn", name)][0])
    sat, maxv, inp = host.get(Key("sat", name)), host.get(Key("maxv", name)), _moments(host, "actin", name)
    # NaN survives amax and the saturation count's comparisons read it as "not saturated": the
    # maxima tell for dying kinds; the layer before reports its own non-finite outputs anyway
    bad = int(torch.isnan(maxv).sum()) if maxv is not None else 0
    s = ActivationStats(name=name, kind=a.kind, layer=a.layer, module=a.module, gate=a.gate, index=a.index,
                        calls=a.calls, units=a.units, nonfinite=bad)
    if sat is not None and n > 0:
        per_unit = sat / n
        s.saturated = float(per_unit.mean())
        s.saturated_units = float((per_unit >= T.SAT_UNIT_BATCH).double().mean())
    if maxv is not None:
        s.dead = float((maxv <= 0).double().mean())
    if inp.mean is not None and inp.n > 1 and not inp.pooled:
        # the median commutes with sqrt (the lower middle element either way); a tensor sqrt here would
        # run on MKL's thread team when the watch's worker builds (stats._NO_BLAS)
        s.preact_std = math.sqrt(float(inp.var_units().median()))
    return s
