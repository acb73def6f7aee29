"""What the hooks accumulate during a pass, the one buffer that carries it to the host (and across
ranks), and how that buffer becomes `ModelStats`.

Each accumulator travels as `(Key, tensor)`; the key says how copies from several processes combine
(`Reduce`), so the host copy and `distributed.py` share one protocol instead of parsing tuples.
"""

from __future__ import annotations

import dataclasses
import enum
import math

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
    as_float,
    sample_dims,
    summary_of,
    units_view,
    weight_vec,
)
from .weights import (
    NORM_MODULES,
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
    MOMENTS = "moments"  # an (n, mean, m2) triple, merged with Chan's formula


# what -> how copies combine (moments and sharded parameters decide by their key instead)
REDUCTIONS = {
    "out": Reduce.MOMENTS, "grad": Reduce.MOMENTS, "actin": Reduce.MOMENTS,  # per-unit moments
    "actn": Reduce.SUM,  # samples a nonlinearity saw
    "sat": Reduce.SUM,  # per-unit count of saturated samples
    "maxv": Reduce.MAX,  # per-unit maximum of a rectifier's output
    "outbad": Reduce.SUM,  # non-finite entries of the model's outputs
    "pbad": Reduce.MAX,  # non-finite entries per other parameter (replicated under DDP)
    "w": Reduce.FIRST, "b": Reduce.FIRST,  # weight_vec of a layer's weight and bias
    "wmax": Reduce.MAX,  # largest |w| of a layer's weight (over shards too)
    "gw": Reduce.FIRST,  # [sum of squares, count] of a layer's weight gradient
    "values": Reduce.FIRST, "wvalues": Reduce.FIRST, "gvalues": Reduce.FIRST,  # a few values for histograms
    "stream": Reduce.SUM,  # a stream norm's [sum_r |g_r|^2 q_r, sum_r |g_r|^2] (rows r of its input)
}
MOMENT_PARTS = ("n", "mean", "m2")
# kept values -> the ModelStats.values kind they fill (histograms)
VALUE_KINDS = {"values": "activations", "wvalues": "weights", "gvalues": "weight_gradients"}


@dataclasses.dataclass(frozen=True)
class Key:
    what: str  # one of REDUCTIONS
    name: str = ""  # the layer or activation record
    part: str = ""  # for moments: one of MOMENT_PARTS
    sharded: bool = dataclasses.field(default=False, compare=False)  # a shard's local part

    @property
    def reduce(self) -> Reduce:
        return Reduce.SUM if self.sharded else REDUCTIONS[self.what]


Buffer = list[tuple[Key, torch.Tensor]]


def pack(items: Buffer) -> torch.Tensor:
    """Every tensor of a buffer flattened into one float64 vector (on the first tensor's device)."""
    dev = items[0][1].device
    return torch.cat([t.reshape(-1).double().to(dev) for _, t in items])


def unpack(flat: torch.Tensor, like: Buffer) -> Buffer:
    """The inverse of `pack`, shaped as `like`."""
    out: Buffer = []
    pos = 0
    for key, t in like:
        n = t.numel()
        out.append((key, flat[pos:pos + n].reshape(t.shape)))
        pos += n
    return out


def to_host(items: Buffer) -> dict[Key, torch.Tensor]:
    """One device-to-host copy for all accumulators (per device; none on the CPU)."""
    if all(t.device.type == "cpu" for _, t in items):
        return {k: t.double() for k, t in items}
    by_dev: dict[torch.device, Buffer] = {}
    for key, t in items:
        by_dev.setdefault(t.device, []).append((key, t))
    out: dict[Key, torch.Tensor] = {}
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
            keys = [dataclasses.replace(key, part=p) for p in MOMENT_PARTS]
            merged = Moments()
            for r in range(len(copies)):
                n, mean, m2 = (parts[k][r] for k in keys)
                merged = merged.merge(Moments(float(n[0]), mean, m2))
            n = torch.tensor([merged.n], dtype=torch.float64, device=copies[0].device)
            out += list(zip(keys, (n, merged.mean, merged.m2)))
            done.update(keys)
            continue
        if key.reduce is Reduce.SUM:
            value = torch.stack(copies).sum(0)
        elif key.reduce is Reduce.MAX:
            value = torch.stack(copies).amax(0)
        else:
            value = copies[0]
        out.append((key, value))
        done.add(key)
    return out


# --- what the hooks accumulate ----------------------------------------------------------------


def saturated(kind_: str, y: torch.Tensor) -> torch.Tensor:
    """Mask of outputs on a saturating nonlinearity's flat tails."""
    if kind_ == "sigmoid":
        return (y < T.SIGMOID_LO) | (y > T.SIGMOID_HI)
    return y.abs() > T.TANH_ABS


@dataclasses.dataclass
class ActAcc:
    """One nonlinearity's accumulators."""

    kind: str
    layer: str | None  # the weight layer it follows
    module: str  # the module path it belongs to
    gate: str | None = None  # a recurrent gate's name ("i", "f", "g", "o", "r", "z", "n")
    n: float = 0.0  # samples seen (per unit)
    units: int = 0
    inp: Moments = dataclasses.field(default_factory=Moments)  # the nonlinearity's input (saturating kinds)
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
        self.out: dict[str, Moments] = {}
        self.grad: dict[str, Moments] = {}
        self.acts: dict[str, ActAcc] = {}
        self.values: dict[str, torch.Tensor] = {}
        self.out_bad: list[torch.Tensor] = []
        self.stream_rows: dict[int, torch.Tensor] = {}  # per-row second moment of a stream norm's input
        self.stream: dict[int, torch.Tensor] = {}  # its gradient-weighted [sum |g|^2 q, sum |g|^2]

    def called(self, layer: str) -> None:
        if layer not in self.calls:
            self.order.append(layer)
            self.calls[layer] = 0
        self.calls[layer] += 1

    def layer_output(self, layer: str, y: torch.Tensor, ud: int) -> None:
        self.unit_dims[layer] = ud
        self.out[layer] = self.out.get(layer, Moments()).merge(Moments.over(y, ud))
        if self.keep_values and layer not in self.values:
            self.values[layer] = y.detach().reshape(-1)[: self.keep_values].double().clone()

    def gradient(self, layer: str, g: torch.Tensor, ud: int) -> None:
        self.grad[layer] = self.grad.get(layer, Moments()).merge(Moments.over(g, ud))

    def stream_input(self, index: int, x: torch.Tensor) -> None:
        self.stream_rows[index] = as_float(x.detach()).square().mean(-1)

    def stream_gradient(self, index: int, g: torch.Tensor) -> None:
        """The stream's scale as the gradient sees it: rows weighted by |dL/dx_row|^2, so rows that the
        loss barely reaches (a class token's neighbours, padding) do not set it."""
        gr = as_float(g.detach()).square().sum(-1)
        v = torch.stack([(gr * self.stream_rows[index]).sum().double(), gr.sum().double()])
        self.stream[index] = v if index not in self.stream else self.stream[index] + v

    def model_output(self, t: torch.Tensor) -> None:
        if t.is_floating_point():
            self.out_bad.append((~torch.isfinite(t.detach())).sum().double().reshape(1))

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
            cnt = saturated(call.kind, y.float()).sum(dim=dims).double()
            acc.sat = cnt if acc.sat is None else acc.sat + cnt
            if isinstance(call.x, torch.Tensor) and call.x is not call.out:
                acc.inp = acc.inp.merge(Moments.over(call.x, ud))
        if call.kind in vocab.DYING and y.numel():
            mx = y.amax(dim=dims).double()
            acc.maxv = mx if acc.maxv is None else torch.maximum(acc.maxv, mx)

    def gate(self, record: str, module: str, gate: str, kind_: str, pre: torch.Tensor, post: torch.Tensor) -> None:
        """A recurrent gate rebuilt from its layer's weights: pre- and post-activation, units last."""
        acc = self._acc(record, kind_, None, module, gate)
        yv, xv = units_view(post, -1), units_view(pre, -1)
        acc.n += yv.shape[0]
        acc.units = yv.shape[1]
        acc.inp = acc.inp.merge(Moments.of(xv))
        cnt = saturated(kind_, yv.float()).sum(0).double()
        acc.sat = cnt if acc.sat is None else acc.sat + cnt

    # -- to the host --
    def buffer(self, model: nn.Module, layers: dict[str, nn.Module], grads: dict[int, torch.Tensor] | None) -> Buffer:
        """Every accumulator, and the weights' sums, as (Key, float64 device tensor)."""
        items: Buffer = []

        def moments(what: str, name: str, m: Moments) -> None:
            if m.mean is not None:
                n = torch.tensor([m.n], dtype=torch.float64, device=m.mean.device)
                items.extend(zip((Key(what, name, p) for p in MOMENT_PARTS), (n, m.mean, m.m2)))

        for name, m in self.out.items():
            moments("out", name, m)
        for name, m in self.grad.items():
            moments("grad", name, m)
        for name, a in self.acts.items():
            dev = a.sat.device if a.sat is not None else (a.maxv.device if a.maxv is not None else None)
            items.append((Key("actn", name), torch.tensor([a.n], dtype=torch.float64, device=dev)))
            moments("actin", name, a.inp)
            if a.sat is not None:
                items.append((Key("sat", name), a.sat))
            if a.maxv is not None:
                items.append((Key("maxv", name), a.maxv))
        for name, m in layers.items():
            w = main_weight(m)
            if w is not None:
                lw = local(w).detach()
                items.append((Key("w", name, sharded=sharded(w)), weight_vec(lw)))
                if lw.numel():  # the largest |w| without an |w| copy of the whole weight
                    lo, hi = torch.aminmax(lw)
                    items.append((Key("wmax", name), torch.maximum(-lo, hi).double().reshape(1)))
                tw = trained_weight(m)
                if grads is not None and tw is not None and id(tw) in grads:
                    g = grads[id(tw)]
                    gw = as_float(local(g.detach()).reshape(-1))
                    count = torch.tensor(float(gw.numel()), dtype=torch.float64, device=gw.device)
                    items.append((Key("gw", name, sharded=sharded(g)), torch.stack([torch.dot(gw, gw).double(), count])))
            b = m._parameters.get("bias")
            if isinstance(b, torch.Tensor) and b.numel():
                items.append((Key("b", name, sharded=sharded(b)), weight_vec(local(b))))
        for index, v in self.stream.items():
            items.append((Key("stream", str(index)), v))
        for name, t in self.values.items():
            items.append((Key("values", name), t))
            w = main_weight(layers[name]) if name in layers else None
            if w is not None:
                items.append((Key("wvalues", name), local(w).detach().reshape(-1)[: self.keep_values].double().clone()))
            tw = trained_weight(layers[name]) if name in layers else None
            if grads is not None and tw is not None and grads.get(id(tw)) is not None:
                g = local(grads[id(tw)].detach()).reshape(-1)[: self.keep_values].double().clone()
                items.append((Key("gvalues", name), g))
        if self.out_bad:
            dev = self.out_bad[0].device
            items.append((Key("outbad"), torch.cat([t.to(dev) for t in self.out_bad]).sum(0, True)))
        others = _other_params(model, layers)
        if others:
            dev = others[0][1].device
            items.append((Key("pbad"), torch.stack([(~torch.isfinite(local(p).detach())).sum().double().to(dev)
                                                    for _, p in others])))
        return items


def _other_params(model: nn.Module, layers: dict[str, nn.Module]) -> list[tuple[str, torch.Tensor]]:
    """Floating parameters other than the layers' main weights (checked for non-finite values only)."""
    mains = {id(main_weight(m)) for m in layers.values()}
    return [(n, p) for n, p in model.named_parameters() if p.is_floating_point() and id(p) not in mains]


# --- the host copy -> ModelStats --------------------------------------------------------------


def _moments(host: dict[Key, torch.Tensor], what: str, name: str) -> Moments:
    n = host.get(Key(what, name, "n"))
    if n is None:
        return Moments()
    return Moments(float(n[0]), host[Key(what, name, "mean")], host[Key(what, name, "m2")])


def nonzero_norms(model: nn.Module, layers: dict[str, nn.Module]) -> list[str]:
    """Norm layers (not measured as weight layers) whose weight is not all zero: the ones to reset.

    Zero-weight norms are deliberate (zero-init residual). This reads the live weights, so `watch`
    takes it on the training thread before the optimizer changes them.
    """
    return [n for n, m in model.named_modules()
            if isinstance(m, NORM_MODULES) and n not in layers and
            isinstance(getattr(m, "weight", None), torch.Tensor) and bool((local(m.weight).detach() != 0).any())]


def reads_weights(host: dict[Key, torch.Tensor]) -> bool:
    """Whether `build_stats` will read live weights beyond `nonzero_norms` (to count non-finite entries)."""
    return any(key.what in ("w", "b") and bool(t[3]) for key, t in host.items())


def build_stats(model: nn.Module, layers: dict[str, nn.Module], graph: Graph, acc: Accumulators,
                host: dict[Key, torch.Tensor], grads: dict[int, torch.Tensor] | None, backward: bool,
                symmetry: bool, norms: list[str] | None = None) -> ModelStats:
    """ModelStats from the host copy of the buffer, the structure the graph saw, and the weights.

    It reads the live weights only for `symmetry`, for `norms` when not given, and where
    `reads_weights(host)`."""
    order = {n: i for i, n in enumerate(acc.order)}
    out = [_layer_stats(name, m, order, graph, acc, host) for name, m in layers.items()]
    _ties(out, layers)
    if symmetry:
        _symmetry(out, layers, grads)
    acts = [_act_stats(name, a, host) for name, a in acc.acts.items()]
    by_layer = {a.layer: a for a in acts if a.layer}
    for lay in out:
        a = by_layer.get(lay.name)
        if a is not None:
            lay.saturated, lay.saturated_units = a.saturated, a.saturated_units
            lay.dead, lay.preact_std = a.dead, a.preact_std
    if norms is None:
        norms = nonzero_norms(model, layers)
    out_bad = int(host[Key("outbad")].sum()) if Key("outbad") in host else 0
    stats = ModelStats(out, acts, norms, out_bad, backward, residual_adds=graph.residual_adds,
                       trained_norms=[n for n in norms if _varies(model.get_submodule(n))])
    for key, t in host.items():
        if key.what in VALUE_KINDS:
            stats.values[(VALUE_KINDS[key.what], key.name)] = t.float()
    stats.unknown_ops = [(lay.name, graph.unknown[lay.name]) for lay in out if lay.name in graph.unknown]
    if Key("pbad") in host:
        for (pname, _), bad in zip(_other_params(model, layers), host[Key("pbad")].tolist()):
            if bad:
                stats.nonfinite_params.append((pname, int(bad)))
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


def _symmetry(stats: list[LayerStats], layers: dict[str, nn.Module], grads: dict[int, torch.Tensor] | None) -> None:
    """Each layer's row symmetry (a tied weight once, under its first layer), screened together."""
    seen: set[int] = set()
    items, owners = [], []
    for lay in stats:
        m = layers[lay.name]
        w = main_weight(m)
        if w is None or id(w) in seen:
            continue
        seen.add(id(w))
        tol = T.DUP_TOL.get(lay.dtype, T.DUP_TOL["default"])
        for label, rows, grows in weight_rows(m, grads, lay.transposed):
            items.append((label, rows, grows, tol))
            owners.append(lay)
    for lay, sym in zip(owners, symmetry_all(items)):
        lay.symmetry.append(sym)


def _layer_stats(name, m, order, graph: Graph, acc: Accumulators, host) -> LayerStats:
    w = main_weight(m)
    params = [p for p in m._parameters.values() if p is not None]
    transposed: bool | None = name in graph.transposed
    fi, fo = fans(m, bool(transposed))
    if name not in order and not layout_known(m):  # never ran: (out, in) or (in, out) was not observed
        transposed = fi = fo = None
    lay = LayerStats(name=name, type=type(m).__name__, kind=kind(m), index=order.get(name, -1),
                     transposed=transposed, parametrization=parametrization(m),
                     calls=acc.calls.get(name, 0),
                     weight_shape=list(w.shape) if w is not None else [], fan_in=fi, fan_out=fo,
                     frozen=bool(params) and not any(p.requires_grad for p in params),
                     dtype=str(w.dtype).replace("torch.", "") if w is not None else "float32")
    if Key("w", name) in host:
        for k, v in summary_of(host[Key("w", name)], local(w)).items():
            setattr(lay, k, v)
    if Key("wmax", name) in host and lay.weight_nonfinite == 0:
        lay.weight_absmax = float(host[Key("wmax", name)][0])
    bias = m._parameters.get("bias")
    lay.has_bias = isinstance(bias, torch.Tensor) and bias.numel() > 0
    if Key("b", name) in host:
        bs = summary_of(host[Key("b", name)], local(bias))
        lay.bias_mean, lay.bias_std = bs["weight_mean"], bs["weight_std"]
    follows = graph.follows.get(name)
    if follows is not None:
        lay.activation, lay.activation_param, lay.activation_module = follows.kind, follows.param, follows.record
    elif lay.index >= 0:
        lay.activation = "identity"
    norm = graph.stream_norm_of(name)
    if norm is not None and Key("stream", str(norm)) in host:
        num, den = host[Key("stream", str(norm))].tolist()
        lay.stream_q = num / den if den > 0 and math.isfinite(num / den) else None
    lay.fed_by = graph.fed_by.get(name)
    if lay.fed_by is None and lay.index >= 0 and lay.kind == vocab.ATTENTION:
        lay.fed_by = "other"
    lay.is_output = name in graph.outputs
    lay.residual = name in graph.residual_writers
    lay.fed_from = sorted(s for s, t in graph.feeds.items() if t == name)
    lay.normalized = name in graph.normalized
    mo = _moments(host, "out", name)
    if mo.mean is not None and mo.n > 0:
        lay.units, lay.samples = mo.units, int(mo.n)
        lay.output_nonfinite = mo.nonfinite_units()
        lay.q, lay.signal = mo.q(), mo.var()
        lay.r = lay.signal / lay.q if lay.q and math.isfinite(lay.q) and lay.q > 0 else None
    mg = _moments(host, "grad", name)
    if mg.mean is not None and mg.n > 0:
        lay.grad_nonfinite = mg.nonfinite_units()
        lay.grad_q = mg.q()
    if Key("gw", name) in host:
        sumsq, count = host[Key("gw", name)].tolist()
        lay.weight_grad_rms = math.sqrt(sumsq / max(count, 1.0))
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
    if inp.mean is not None and inp.n > 1:
        s.preact_std = float(inp.var_units().sqrt().median())
    return s
