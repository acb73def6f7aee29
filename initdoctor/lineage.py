"""Which weight layer feeds which nonlinearity, by tensor identity (DESIGN's "graph").

Module hooks cannot see `torch.relu(x)` or `x.sigmoid()` inside a `forward`, yet the prescription
depends on exactly that. The probe's function mode reports every torch function call here; `Graph`
follows each tensor back to the weight layers it derives from (through reshapes, additions, pooling,
dropout and norms) and records what consumes it: a nonlinearity, another weight op, a linear
consumer, a norm, or something unknown.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Iterator
from typing import Any

import torch

# --- what the functional calls mean ---------------------------------------------------------
# name of the torch function (trailing underscores stripped) -> activation kind
ACTIVATIONS = {
    "relu": "relu", "relu6": "relu", "threshold": "relu",
    "leaky_relu": "leaky_relu", "prelu": "leaky_relu", "rrelu": "leaky_relu",
    "elu": "elu", "celu": "elu", "selu": "selu",
    "gelu": "gelu", "silu": "silu", "mish": "silu", "hardswish": "silu", "softplus": "softplus",
    "sigmoid": "sigmoid", "hardsigmoid": "sigmoid",
    "tanh": "tanh", "hardtanh": "hardtanh", "softsign": "softsign",
}
WEIGHT_OPS = {
    "linear", "bilinear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
    "conv_transpose3d", "embedding", "embedding_bag", "multi_head_attention_forward",
    "gru", "lstm", "rnn_tanh", "rnn_relu",
}
# Consumers that are linear in the sourced tensor: the layer before them has no nonlinearity.
LINEAR_CONSUMERS = {"matmul", "bmm", "mm", "einsum", "baddbmm", "scaled_dot_product_attention",
                    "softmax", "log_softmax", "cross_entropy", "mse_loss", "nll_loss"}
DROPOUTS = {"dropout", "alpha_dropout", "feature_alpha_dropout", "dropout1d", "dropout2d", "dropout3d"}
NORMS = {"batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm", "local_response_norm"}
# norms over the last dim: what a transformer's residual stream passes through
STREAM_NORMS = {"layer_norm", "rms_norm"}
MATMULS = {"addmm", "mm", "matmul", "bmm", "baddbmm"}
PASSTHROUGH = {
    "view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "transpose", "permute",
    "contiguous", "clone", "to", "float", "double", "half", "bfloat16", "type", "type_as", "get",
    "add", "iadd", "radd", "sub", "isub", "rsub", "mul", "imul", "rmul", "div", "idiv", "truediv",
    "itruediv", "neg", "mean", "sum", "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d",
    "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
    "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d", "max_pool2d_with_indices",
    "getitem", "select", "narrow", "expand", "expand_as", "repeat", "pad", "interpolate", "cat",
    "stack", "chunk", "split", "unbind", "detach", "roll", "movedim", "swapaxes", "T", "mT",
    "pixel_shuffle", "upsample", "fold", "unfold", "masked_fill", "where", "concat", "concatenate",
}
IGNORED = {"register_hook", "size", "dim", "numel", "is_floating_point"}
# Composed nonlinearities, recognised by what they compute rather than by name: a tensor's square
# ("moment": on through mean, + eps, rsqrt/sqrt/reciprocal) that multiplies or divides the tensor
# again is a normalization (RMSNorm: x * rsqrt(mean(x^2) + eps)); tanh of a cubic polynomial of a
# tensor ("cubic") is the tanh approximation of GELU (0.5 x (1 + tanh(c (x + 0.044715 x^3)))).
MOMENT, CUBIC = "moment", "cubic"
POWERS = {"pow", "square", "float_power"}
STATISTIC_OPS = {"rsqrt", "sqrt", "reciprocal"}


_NAMES: dict[Any, str] = {}  # a forward calls the same few functions again and again


def function_name(func: Any) -> str:
    """A torch function's name with Python's dunder and in-place underscores stripped."""
    try:
        return _NAMES[func]
    except (KeyError, TypeError):
        pass
    name = (getattr(func, "__name__", "") or "").strip("_")
    if len(_NAMES) < 4096:  # torch's functions are a bounded set; anything else is named each time
        try:
            _NAMES[func] = name
        except TypeError:
            pass
    return name


def tensors(x: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a nested value: tensors, sequences, dicts, dataclasses, objects like ModelOutput."""
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from tensors(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from tensors(v)
    elif dataclasses.is_dataclass(x) and not isinstance(x, type):
        for f in dataclasses.fields(x):
            yield from tensors(getattr(x, f.name))


def first_tensor(x: Any) -> torch.Tensor | None:
    for t in tensors(x):
        return t
    return None


_NONE: tuple[frozenset[str], str | None] = (frozenset(), None)


class Lineage:
    """Which weight layers a tensor derives from, and which nonlinearity produced it, by identity."""

    def __init__(self) -> None:
        self._d: dict[int, tuple[weakref.ref, tuple[frozenset[str], str | None]]] = {}

    def get(self, t: Any) -> tuple[frozenset[str], str | None]:
        # by id alone: an entry leaves with its tensor (the weakref's callback), so a live entry's id
        # is no other object's; the identity check guards against a callback not yet run
        e = self._d.get(id(t))
        if e is None or e[0]() is not t:
            return _NONE
        return e[1]

    def set(self, t: Any, sources: frozenset[str], act: str | None) -> None:
        if not isinstance(t, torch.Tensor) or (not sources and act is None):
            return
        key = id(t)
        try:
            ref = weakref.ref(t, lambda _r, k=key, d=self._d: d.pop(k, None))
        except TypeError:
            return
        self._d[key] = (ref, (sources, act))

    def clear(self) -> None:
        self._d.clear()


@dataclasses.dataclass
class Follows:
    """What follows a weight layer: the nonlinearity kind, its parameter, and the activation record."""

    kind: str  # a vocab activation family, "identity" or "unknown"
    param: float | None = None  # leaky_relu's negative slope
    record: str | None = None  # the ActivationStats name that measures it


@dataclasses.dataclass
class ActivationCall:
    """One nonlinearity applied to a tensor: what the probe accumulates statistics of."""

    record: str  # the name it is measured under (a module path, or "<layer>:<function>")
    module: str  # the module path it belongs to (the activation module, else the layer it follows)
    kind: str
    layer: str | None  # the weight layer whose output it consumes
    x: Any  # the nonlinearity's input
    out: torch.Tensor


@dataclasses.dataclass
class StreamNorm:
    """A norm over the last dim: its input is the stream whose scale the gradient is relative to."""

    index: int
    x: torch.Tensor


class Graph:
    """The structure seen in one forward pass (reset per pass)."""

    def __init__(self, weight_layers: set[str], leaf_activations: set[str]) -> None:
        self.weight_layers = weight_layers
        # modules with no children and no weights: a nonlinearity called inside one is that module
        self.leaf_activations = leaf_activations
        self.lineage = Lineage()
        # Which weight layers are upstream of a tensor, through every op but weight ops (attention's
        # matmuls included): a branch's layers reach the stream norm of the branch they write into.
        self.upstream = Lineage()
        self.reset()

    def reset(self) -> None:
        self.follows: dict[str, Follows] = {}  # weight layer -> what consumes its output first
        self.fed_by: dict[str, str] = {}  # weight layer -> the nonlinearity that feeds it ("input", "other")
        self.normalized: set[str] = set()  # weight layers whose output a norm consumes
        self.outputs: set[str] = set()  # weight layers whose output is the model's
        self.unknown: dict[str, str] = {}  # weight layer -> the unknown op its output goes into
        self.transposed: set[str] = set()  # weight layers whose weight the model multiplies from the right
        self.residual_adds = 0  # additions of two signals of the network (skip connections)
        self.residual_writers: set[str] = set()  # weight layers whose output such an addition adds in
        self._record_layer: dict[str, str | None] = {}  # activation record -> the layer it follows
        self.feeds: dict[str, str] = {}  # weight layer -> the first weight layer its output reaches
        self.next_norm: dict[str, int] = {}  # weight layer -> the first stream norm its output reaches
        self.stream_norms = 0
        self._norm_input: torch.Tensor | None = None
        self.lineage.clear()
        self.upstream.clear()

    def mark_inputs(self, inputs: Any) -> None:
        for t in tensors(inputs):
            self.lineage.set(t, frozenset(), "input")

    def mark_outputs(self, output: Any) -> None:
        for t in tensors(output):
            for s in self.lineage.get(t)[0]:
                self.outputs.add(s)
                self.follows.setdefault(s, Follows("identity"))

    def layer_output(self, layer: str, y: torch.Tensor) -> None:
        self.lineage.set(y, frozenset([layer]), None)
        self.upstream.set(y, frozenset([layer]), None)

    def stream_norm_of(self, layer: str) -> int | None:
        """The stream norm a layer's output reaches, directly or through the layers it feeds."""
        seen: set[str] = set()
        while layer not in self.next_norm and layer in self.feeds and layer not in seen:
            seen.add(layer)
            layer = self.feeds[layer]
        return self.next_norm.get(layer)

    def _linear(self, sources: frozenset[str]) -> None:
        for s in sources:
            self.follows.setdefault(s, Follows("identity"))

    def on_function(self, name: str, args: tuple, kwargs: dict, out: Any,
                    inner: str | None) -> tuple[ActivationCall | None, StreamNorm | None]:
        """Follow one function call; `inner` is the innermost module running (or the layer whose
        weight the call uses). Returns the nonlinearity to measure and the stream norm to measure,
        if the call is either."""
        if name in IGNORED:
            return None, None
        up: frozenset[str] = frozenset()
        get = self.upstream.get
        for t in (*args, *kwargs.values()) if kwargs else args:
            if isinstance(t, (list, tuple)):
                for u in t:
                    up |= get(u)[0]
            else:
                s = get(t)[0]
                if s:
                    up = up | s if up else s
        self._norm_input = None
        call = self._follow(name, args, kwargs, out, inner)
        norm = None
        if (name in WEIGHT_OPS or name in MATMULS) and inner in self.weight_layers:
            # the layer's own operation (F.linear, or x @ W inside HF's Conv1D): what feeds it
            for s in up - {inner}:
                self.feeds.setdefault(s, inner)
            return call, None
        if self._norm_input is not None:
            norm = StreamNorm(self.stream_norms, self._norm_input)
            self.stream_norms += 1
            for s in up:
                self.next_norm.setdefault(s, norm.index)
        if up:
            for t in (out,) if isinstance(out, torch.Tensor) else tensors(out):
                if not self.upstream.get(t)[0]:
                    self.upstream.set(t, up, None)
        return call, norm

    def _follow(self, name: str, args: tuple, kwargs: dict, out: Any, inner: str | None) -> ActivationCall | None:
        x = args[0] if args else kwargs.get("input")
        if isinstance(x, (list, tuple)):
            srcs: frozenset[str] = frozenset()
            act = None
            for t in x:
                s, a = self.lineage.get(t)
                srcs |= s
                act = act or a
        else:
            srcs, act = self.lineage.get(x)
        if srcs and (name in POWERS or (name in STATISTIC_OPS and act == MOMENT)):
            self._composed(name, args, kwargs, act, srcs, out)
            return None
        if srcs and act is None and name == "mul" and self._squares(x, args):  # (k x) * x: as pow(x, 2)
            self._composed("square", (x,), {}, act, srcs, out)
            return None
        if name in ("mul", "imul", "rmul", "div", "truediv", "itruediv") and self._normalizes(x, args, out):
            return None
        if name in ACTIVATIONS:
            kind = ACTIVATIONS[name]
            if kind == "tanh" and act == CUBIC:
                kind = "gelu"
            return self._activation(kind, name, args, kwargs, x, out, srcs, inner)
        if name in MATMULS and inner in self.weight_layers:
            # the layer's own product (x @ W in HF's Conv1D; addmm's input is its second argument)
            operand = args[1] if name in ("addmm", "baddbmm") and len(args) > 1 else x
            srcs, act = self.lineage.get(operand)
            name = "linear"
        if name in WEIGHT_OPS:
            self._linear(srcs)
            if inner in self.weight_layers and inner not in self.fed_by:
                self.fed_by[inner] = act or "other"
            return None
        if name in LINEAR_CONSUMERS:
            self._linear(srcs)
            return None
        if name in NORMS:
            self.normalized.update(s for s in srcs if s not in self.follows)
            if name in STREAM_NORMS and isinstance(x, torch.Tensor):
                self._norm_input = x
        if name in PASSTHROUGH or name in NORMS or name in DROPOUTS:
            if isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor):
                if name in ("add", "iadd", "radd") and len(args) > 1 and (srcs or act):
                    other = self.lineage.get(args[1])
                    # x + c x^3 (GELU), q cos + rot(q) sin (RoPE): one layer's signal added to a function
                    # of itself, no skip connection
                    one = bool(srcs) and srcs == other[0]
                    if (other[0] or other[1]) and isinstance(args[1], torch.Tensor) and args[1].shape == x.shape \
                            and not one:
                        self.residual_adds += 1  # two signals of the network meet: a skip connection
                        if srcs != other[0]:
                            self.residual_writers.update(srcs ^ other[0])  # the stream's and the branch's
                for t in args[1:]:
                    s2, a2 = self.lineage.get(t)
                    srcs |= s2
                    act = act or a2
            for t in tensors(out):
                self.lineage.set(t, srcs, act)
            return None
        if srcs and isinstance(out, torch.Tensor):
            for s in srcs:
                if s not in self.follows:
                    self.follows[s] = Follows("unknown")
                    self.unknown[s] = name
        return None

    def _composed(self, name: str, args: tuple, kwargs: dict, act: str | None, srcs: frozenset[str],
                  out: Any) -> None:
        """A power of a layer's output, or a statistic of its second moment: no consumer of its own."""
        if name in STATISTIC_OPS:
            tag = MOMENT
        else:
            exp = 2 if name == "square" else (args[1] if len(args) > 1 else kwargs.get("exponent"))
            tag = {2: MOMENT, 3: CUBIC}.get(exp if isinstance(exp, (int, float)) else None)
            if tag is None:
                for s in srcs:  # another power: an unknown consumer, as before
                    if s not in self.follows:
                        self.follows[s] = Follows("unknown")
                        self.unknown[s] = name
        for t in tensors(out):
            self.lineage.set(t, srcs, tag)

    def _squares(self, x: Any, args: tuple) -> bool:
        """Whether an elementwise product multiplies a layer's output (or a multiple of it) by itself."""
        y = args[1] if len(args) > 1 else None
        if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)) or x.shape != y.shape:
            return False
        return self.lineage.get(x) == self.lineage.get(y)

    def _normalizes(self, x: Any, args: tuple, out: Any) -> bool:
        """`x * rsqrt(mean(x^2) + eps)` (or `x / sqrt(...)`): the layers behind x are normalized."""
        y = args[1] if len(args) > 1 else None
        if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
            return False
        (sx, ax), (sy, ay) = self.lineage.get(x), self.lineage.get(y)
        if ax == MOMENT and ay != MOMENT:  # rsqrt(mean(x^2) + eps) * x: the same, written the other way
            x, y, (sx, ax), (sy, ay) = y, x, (sy, ay), (sx, ax)
        if ay != MOMENT or ax == MOMENT or not sx or not (sy & sx):
            return False
        if y.dim() == 0 or y.shape[-1] != 1:
            # x * (1 + k x^2) elementwise, no mean over the features: a cubic (HF's FastGELU), not a norm
            self.lineage.set(out, sx | sy, CUBIC)
            return True
        self.normalized.update(s for s in sx if s not in self.follows)
        self.lineage.set(out, sx, ax)  # what a norm layer passes on: the signal, normalized
        self._norm_input = x
        return True

    def _activation(self, kind, fname, args, kwargs, x, out, srcs, inner) -> ActivationCall | None:
        if not isinstance(out, torch.Tensor) or not out.is_floating_point():
            return None
        param = None
        if kind == "leaky_relu":
            if fname == "prelu":
                w = args[1] if len(args) > 1 else kwargs.get("weight")
                param = float(w.detach().float().mean()) if isinstance(w, torch.Tensor) else 0.25
            else:
                param = args[1] if len(args) > 1 and isinstance(args[1], (int, float)) else kwargs.get(
                    "negative_slope", 0.01)
                param = float(param) if fname != "rrelu" else 0.5 * (1 / 8 + 1 / 3)
        src = min(srcs) if srcs else None
        if inner is not None and inner in self.leaf_activations:
            record = module = inner
            if record in self._record_layer and self._record_layer[record] != src:
                record = f"{inner}@{src}"  # one activation module shared by several layers
        else:
            module = src or inner or "input"
            record = f"{module}:{fname}"
        self._record_layer.setdefault(record, src)
        for s in srcs:
            self.follows.setdefault(s, Follows(kind, param, record))
        self.lineage.set(out, frozenset(), kind)
        return ActivationCall(record, module, kind, src, x, out)
