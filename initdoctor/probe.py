"""The only place that registers hooks.

`Recorder` attaches forward hooks to every module, tensor hooks to every weight layer's output (the
gradient dL/dy, which survives in-place activations where module backward hooks do not), and a
`TorchFunctionMode` that sees functional calls (`torch.relu(x)`, `x.sigmoid()`) so that the
nonlinearity following each layer is known. Everything it attaches is removed on every exit path.

`examine` runs one forward and one backward pass of a model under a Recorder without changing the
model: train/eval modes, BatchNorm running statistics, parameters, `.grad` and the global RNG are
all as they were afterwards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from . import thresholds as T
from .stats import (
    ActivationStats,
    LayerStats,
    ModelStats,
    Moments,
    SymmetryStats,
    as_float,
    sample_dims,
    summary_of,
    units_view,
    weight_vec,
)

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
SATURATING = {"sigmoid", "tanh", "hardtanh", "softsign"}
DYING = {"relu", "gelu", "silu"}  # units can die (gelu/silu: never positive, "near-dead")
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
NORM_MODULES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def _fname(func: Any) -> str:
    name = getattr(func, "__name__", "") or ""
    return name.strip("_")


def is_weight_layer(m: nn.Module) -> bool:
    if isinstance(m, (nn.MultiheadAttention, nn.RNNBase)):
        return True
    if isinstance(m, NORM_MODULES):
        return False  # a LayerNorm over 2-D shapes has a 2-D weight, but no units to tell apart
    w = m._parameters.get("weight")
    return w is not None and w.dim() >= 2


def unit_dim(m: nn.Module, out: torch.Tensor) -> int:
    if isinstance(m, (nn.modules.conv._ConvNd,)):
        spatial = len(m.kernel_size)
        return 1 if out.dim() == spatial + 2 else 0
    return -1


def fans(m: nn.Module) -> tuple[int | None, int | None]:
    """Forward fan-in and fan-out; ConvTranspose's weight stores them the other way round."""
    if isinstance(m, nn.MultiheadAttention):
        return m.embed_dim, m.embed_dim
    if isinstance(m, nn.RNNBase):
        return m.input_size, m.hidden_size
    if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
        return None, m.embedding_dim
    w = m._parameters["weight"]
    fi, fo = nn.init._calculate_fan_in_and_fan_out(w)
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        fi, fo = fo, fi
    return fi, fo


def _sharded(t: Any) -> bool:
    """A DTensor (FSDP2's sharded parameters and gradients)."""
    return hasattr(t, "placements") and hasattr(t, "to_local")


def local(t: torch.Tensor) -> torch.Tensor:
    """The part of a tensor this process holds."""
    return t.to_local() if _sharded(t) else t


def full(t: torch.Tensor | None) -> torch.Tensor | None:
    """The whole tensor (a collective for a sharded one: every rank must ask in the same order)."""
    return t.full_tensor() if t is not None and _sharded(t) else t


@dataclasses.dataclass
class Rows:
    """One row per output unit: its weights, and its bias as one more column, kept apart (no copy)."""

    w: torch.Tensor  # (units, fan)
    b: torch.Tensor | None = None  # (units,)

    @staticmethod
    def of(w: torch.Tensor, b: torch.Tensor | None = None) -> Rows:
        w = w.detach()
        w = as_float(w)
        if b is not None:
            b = b.detach().to(w.dtype)
        return Rows(w, b)

    def __len__(self) -> int:
        return self.w.shape[0]

    def norms(self) -> torch.Tensor:
        n = torch.linalg.vector_norm(self.w, dim=1)
        return n if self.b is None else torch.sqrt(n.square() + self.b.square())

    def project(self, v: torch.Tensor) -> torch.Tensor:
        """Rows @ v for v of shape (fan + 1, k); the last row of v multiplies the bias."""
        p = self.w @ v[: self.w.shape[1]]
        return p if self.b is None else p + self.b[:, None] * v[-1]

    def distance(self, idx: torch.Tensor, ref: int) -> torch.Tensor:
        d = torch.linalg.vector_norm(self.w[idx] - self.w[ref], dim=1)
        return d if self.b is None else torch.sqrt(d.square() + (self.b[idx] - self.b[ref]).square())


def weight_rows(m: nn.Module, grads: dict[int, torch.Tensor] | None) -> Iterator[tuple[str, Rows, Rows | None]]:
    """(label, rows, gradient rows) per unit-matrix of a layer: one row per output unit."""

    def g(p: torch.Tensor | None) -> torch.Tensor | None:
        if p is None or grads is None:
            return None
        return full(grads.get(id(p)))

    def rows(w, b, gw, gb, transpose=False):
        w, b = full(w), full(b)
        w2 = (w.transpose(0, 1) if transpose else w).detach().reshape(w.shape[1] if transpose else w.shape[0], -1)
        gw2 = None if gw is None else (gw.transpose(0, 1) if transpose else gw).reshape(w2.shape)
        if b is None or b.numel() != w2.shape[0]:
            b = gb = None
        elif gw2 is not None and gb is None:
            gb = torch.zeros_like(b)
        return Rows.of(w2, b), None if gw2 is None else Rows.of(gw2, gb)

    if isinstance(m, nn.MultiheadAttention):
        e = m.embed_dim
        if m.in_proj_weight is not None:
            w, b = full(m.in_proj_weight), full(m.in_proj_bias)
            gw, gb = g(m.in_proj_weight), g(m.in_proj_bias)
            for i, part in enumerate("qkv"):
                sl = slice(i * e, (i + 1) * e)
                yield (f"in_proj_weight[{part}]",) + rows(
                    w[sl], None if b is None else b[sl],
                    None if gw is None else gw[sl], None if gb is None else gb[sl])
        else:
            for part in "qkv":
                w = getattr(m, f"{part}_proj_weight")
                yield (f"{part}_proj_weight",) + rows(w, None, g(w), None)
        return
    if isinstance(m, nn.RNNBase):
        for pname, p in m._parameters.items():
            if p is None or not pname.startswith("weight_") or p.dim() < 2:
                continue
            bias = m._parameters.get(pname.replace("weight_", "bias_"))
            yield (pname,) + rows(p, bias, g(p), g(bias))
        return
    if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
        return  # rows are tokens, not units
    w = m._parameters["weight"]
    b = m._parameters.get("bias")
    transpose = isinstance(m, nn.modules.conv._ConvTransposeNd) and m.groups == 1
    yield ("weight",) + rows(w, b, g(w), g(b), transpose=transpose)


def _directions(fan: int, k: int, like: torch.Tensor) -> torch.Tensor:
    """k fixed random unit directions in the row space (fan weights + the bias)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    v = torch.randn(fan + 1, k, generator=gen, dtype=torch.float32)
    return (v / v.norm(dim=0)).to(device=like.device, dtype=like.dtype)


_LOOKAHEAD = 3  # neighbours compared in sorted order: tolerates two rows whose projection falls between twins


def duplicate_groups(rows: torch.Tensor | Rows, tol_rel: float) -> list[list[int]]:
    """Groups of rows equal within tol_rel * (largest row norm), in O(n log n).

    Rows are projected on three fixed random unit directions and sorted by the first. Rows within
    the tolerance of each other are within it on every projection (|v.(a - b)| <= |a - b|), so only
    near neighbours in that order that are close on all three projections are candidates; their
    distances are checked in one batch and the confirmed pairs joined into groups.
    """
    rows = rows if isinstance(rows, Rows) else Rows.of(rows)
    n = len(rows)
    if n < 2:
        return []
    scale = float(rows.norms().max())
    if not math.isfinite(scale):
        return []
    if scale == 0.0:
        return [list(range(n))]
    tol = tol_rel * scale
    proj = rows.project(_directions(rows.w.shape[1], 3, rows.w))
    if float((proj.amax(0) - proj.amin(0)).max()) <= tol:
        # every projection agrees: most likely one group (a constant tensor); settle it in one pass
        if bool((rows.distance(torch.arange(n, device=rows.w.device), 0) <= tol).all()):
            return [list(range(n))]
    order = torch.argsort(proj[:, 0])
    ps = proj[order]
    left, right = [], []
    for k in range(1, min(_LOOKAHEAD, n - 1) + 1):
        i = torch.nonzero(((ps[k:] - ps[:-k]).abs() <= tol).all(1)).flatten()
        left.append(order[i])
        right.append(order[i + k])
    a, b = torch.cat(left), torch.cat(right)
    if a.numel() == 0:
        return []
    d = torch.linalg.vector_norm(rows.w[a] - rows.w[b], dim=1)
    if rows.b is not None:
        d = torch.sqrt(d.square() + (rows.b[a] - rows.b[b]).square())
    keep = d <= tol
    parent = {}

    def root(i: int) -> int:
        while parent.get(i, i) != i:
            parent[i] = parent.get(parent[i], parent[i])
            i = parent[i]
        return i

    for i, j in zip(a[keep].tolist(), b[keep].tolist()):
        parent.setdefault(i, i)
        parent.setdefault(j, j)
        ri, rj = root(i), root(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    groups: dict[int, list[int]] = {}
    for i in list(parent):
        groups.setdefault(root(i), []).append(i)
    return sorted((sorted(g) for g in groups.values() if len(g) > 1), key=lambda g: g[0])


def _rows_differ(rows: Rows, tol: float) -> bool:
    """Whether any row differs from the first by more than tol; one projection settles most cases."""
    if len(rows) < 2:
        return False
    p = rows.project(_directions(rows.w.shape[1], 1, rows.w))[:, 0]
    if float((p - p[0]).abs().max()) > tol:
        return True
    return bool(rows.distance(torch.arange(len(rows), device=rows.w.device), 0).max() > tol)


def symmetry_of(label: str, rows: Rows, grows: Rows | None, tol_rel: float) -> SymmetryStats:
    """Constant/zero (weights alone, bias excluded) and duplicate rows (weights with bias)."""
    w = rows.w
    lo, hi = (float(v) for v in torch.aminmax(w)) if w.numel() else (0.0, 0.0)
    finite = math.isfinite(lo) and math.isfinite(hi)
    constant = finite and w.numel() > 1 and hi - lo <= tol_rel * max(abs(lo), abs(hi), 1e-30)
    zero = finite and lo == 0.0 and hi == 0.0
    groups = duplicate_groups(rows, tol_rel) if finite else []
    grad_constant = grad_differ = None
    frozen: list[list[int]] = []
    if grows is not None:
        gtol = tol_rel * max(float(grows.norms().max()) if grows.w.numel() else 0.0, 1e-30)
        glo, ghi = (float(v) for v in torch.aminmax(grows.w)) if grows.w.numel() else (0.0, 0.0)
        gwmax = max(abs(glo), abs(ghi))
        grad_constant = gwmax == 0.0 or ghi - glo <= tol_rel * gwmax
        grad_differ = _rows_differ(grows, gtol)
        for grp in groups:
            idx = torch.tensor(grp, device=grows.w.device)
            if float(grows.distance(idx, grp[0]).max()) <= gtol:
                frozen.append(grp)
    return SymmetryStats(label, len(rows), constant, zero, grad_constant, grad_differ, groups, frozen,
                         value=lo if constant else None, shape=list(rows.w.shape))


# --- accumulators ---------------------------------------------------------------------------


@dataclasses.dataclass
class ActAcc:
    kind: str
    layer: str | None
    n: float = 0.0  # samples seen (per unit)
    units: int = 0
    inp: Moments = dataclasses.field(default_factory=Moments)  # the nonlinearity's input (saturating kinds)
    sat: torch.Tensor | None = None  # per-unit count of saturated samples
    maxv: torch.Tensor | None = None  # per-unit signed maximum
    calls: int = 0
    index: int = -1


def _sat_mask(kind: str, y: torch.Tensor) -> torch.Tensor:
    if kind == "sigmoid":
        return (y < T.SIGMOID_LO) | (y > T.SIGMOID_HI)
    return y.abs() > T.TANH_ABS


class _Lineage:
    """Which weight layers a tensor derives from, and which nonlinearity produced it, by identity."""

    def __init__(self) -> None:
        self._d: dict[int, tuple[weakref.ref, frozenset[str], str | None]] = {}

    def get(self, t: Any) -> tuple[frozenset[str], str | None]:
        if not isinstance(t, torch.Tensor):
            return frozenset(), None
        e = self._d.get(id(t))
        if e is None or e[0]() is not t:
            return frozenset(), None
        return e[1], e[2]

    def set(self, t: Any, sources: frozenset[str], act: str | None) -> None:
        if not isinstance(t, torch.Tensor) or (not sources and act is None):
            return
        key = id(t)
        try:
            ref = weakref.ref(t, lambda _r, k=key, d=self._d: d.pop(k, None))
        except TypeError:
            return
        self._d[key] = (ref, sources, act)

    def clear(self) -> None:
        self._d.clear()


def _tensors(x: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a nested output: tensors, sequences, dicts, dataclasses, objects like ModelOutput."""
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)
    elif dataclasses.is_dataclass(x) and not isinstance(x, type):
        for f in dataclasses.fields(x):
            yield from _tensors(getattr(x, f.name))


def _first_tensor(x: Any) -> torch.Tensor | None:
    for t in _tensors(x):
        return t
    return None


class _FunctionWatch(TorchFunctionMode):
    def __init__(self, rec: Recorder) -> None:
        super().__init__()
        self.rec = rec

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _fname(func)
        if self.rec.dropout_off and name in DROPOUTS:
            out = args[0] if args else kwargs["input"]
        else:
            out = func(*args, **kwargs)
        self.rec._on_function(name, args, kwargs, out)
        return out


class Recorder:
    """Hooks on a model that reduce what flows through it to per-layer accumulators.

    Use as a context manager; on exit every hook and the function mode are gone, whatever happened.
    `dropout_off` neutralizes dropout (functional calls included) for the duration.
    """

    def __init__(self, model: nn.Module, *, dropout_off: bool = False, functions: bool = True,
                 gradients: bool = True, samples: int = 0) -> None:
        self.model = model
        self.dropout_off = dropout_off
        self.functions = functions
        self.gradients = gradients
        self.names: dict[int, str] = {}
        self.modules: dict[str, nn.Module] = {}
        for name, m in model.named_modules():  # shared modules appear once
            self.names[id(m)] = name
            self.modules[name] = m
        self.weight_layers = [n for n, m in self.modules.items() if is_weight_layer(m)]
        self._weight_set = set(self.weight_layers)
        self._handles: list[Any] = []
        self._stack: list[str] = []
        self._lineage = _Lineage()
        self._mode: _FunctionWatch | None = None
        self.samples = samples
        self.reset()

    # -- lifecycle --
    def reset(self) -> None:
        self.order: list[str] = []
        self.calls: dict[str, int] = {}
        self.out: dict[str, Moments] = {}
        self.grad: dict[str, Moments] = {}
        self.acts: dict[str, ActAcc] = {}
        self.activation: dict[str, tuple[str, float | None, str | None]] = {}
        self.fed_by: dict[str, str] = {}
        self.normalized: set[str] = set()
        self.outputs: set[str] = set()
        self.unknown: dict[str, str] = {}
        self.unit_dims: dict[str, int] = {}
        self._out_bad: list[torch.Tensor] = []
        self.residual_adds = 0
        self._samples: dict[str, torch.Tensor] = {}
        self._stack.clear()
        self._lineage.clear()

    def __enter__(self) -> Recorder:
        try:
            for name, m in self.modules.items():
                self._handles.append(m.register_forward_pre_hook(self._pre_hook(name)))
                # always_call: after a forward that raises, the root hook still leaves the function mode
                self._handles.append(m.register_forward_hook(self._post_hook(name), always_call=name == ""))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._mode is not None:
            mode, self._mode = self._mode, None
            with contextlib.suppress(Exception):
                mode.__exit__(None, None, None)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._stack.clear()

    def _enter_functions(self) -> None:
        # The mode lives for the model's forward only: backward, the loss and the optimizer step run
        # without it, so steps that are not observed pay nothing.
        if self.functions and self._mode is None:
            self._mode = _FunctionWatch(self)
            self._mode.__enter__()

    def _exit_functions(self) -> None:
        if self._mode is not None:
            mode, self._mode = self._mode, None
            mode.__exit__(None, None, None)

    def mark_inputs(self, inputs: Any) -> None:
        for t in _tensors(inputs):
            self._lineage.set(t, frozenset(), "input")

    def mark_outputs(self, output: Any) -> None:
        for t in _tensors(output):
            sources, _ = self._lineage.get(t)
            for s in sources:
                self.outputs.add(s)
                self.activation.setdefault(s, ("identity", None, None))
            if t.is_floating_point():
                self._out_bad.append((~torch.isfinite(t.detach())).sum().double().reshape(1))

    # -- module hooks --
    def _pre_hook(self, name: str):
        root = name == ""

        def hook(module, args):
            if root:
                self._enter_functions()
                self.mark_inputs(args)
            self._stack.append(name)
        return hook

    def _post_hook(self, name: str):
        root = name == ""

        def hook(module, args, output):
            if self._stack and self._stack[-1] == name:
                self._stack.pop()
            if root and output is None:  # the forward raised (or returned nothing)
                self._stack.clear()
                self._exit_functions()
                return
            if name in self._weight_set:
                # our own reductions are not the model's operations: keep them out of the mode
                with torch._C.DisableTorchFunction():
                    self._record_layer(name, module, output)
                    if isinstance(module, (nn.LSTM, nn.GRU)):
                        self._record_gates(name, module, args, output)
            if root:
                with torch._C.DisableTorchFunction():
                    self.mark_outputs(output)
                self._exit_functions()
        return hook

    def _record_layer(self, name: str, module: nn.Module, output: Any) -> None:
        if name not in self.calls:
            self.order.append(name)
            self.calls[name] = 0
        self.calls[name] += 1
        y = _first_tensor(output)
        if y is None or not y.is_floating_point():
            return
        target = name
        if isinstance(module, nn.MultiheadAttention):
            # F.multi_head_attention_forward uses out_proj's weight without calling it: the
            # attention output is out_proj's output.
            target = f"{name}.out_proj" if name else "out_proj"
            if target not in self.calls:
                self.order.append(target)
                self.calls[target] = 0
            self.calls[target] += 1
        ud = unit_dim(module, y)
        self.unit_dims[target] = ud
        self.out[target] = self.out.get(target, Moments()).merge(Moments.over(y, ud))
        if self.samples and target not in self._samples:
            self._samples[target] = y.detach().reshape(-1)[: self.samples].double().clone()
        self._lineage.set(y, frozenset([target]), None)
        if self.gradients and y.requires_grad:
            def grad_hook(g, target=target, ud=ud):
                self.grad[target] = self.grad.get(target, Moments()).merge(Moments.over(g, ud))
            y.register_hook(grad_hook)

    def _record_gates(self, name: str, m: nn.RNNBase, args: tuple, output: Any) -> None:
        """Rebuild LSTM/GRU gate pre-activations from the weights, the input and the output sequence.

        The fused op hides the gates; the previous hidden state is the previous output step, so the
        pre-activations follow without re-running the recurrence (single-layer modules; deeper
        layers' inputs are not returned and are noted instead).
        """
        x = args[0] if args else None
        out = output[0] if isinstance(output, tuple) else output
        if (not isinstance(x, torch.Tensor) or not isinstance(out, torch.Tensor) or m.num_layers != 1
                or getattr(m, "proj_size", 0) or x.dim() != 3):
            return  # ID905 says which recurrent layers were not rebuilt
        with torch.no_grad():
            if not m.batch_first:
                x, out = x.transpose(0, 1), out.transpose(0, 1)
            h0 = args[1] if len(args) > 1 else None
            if isinstance(h0, tuple):
                h0 = h0[0]
            hid = m.hidden_size
            gate_names = ("i", "f", "g", "o") if isinstance(m, nn.LSTM) else ("r", "z", "n")
            kinds = {"g": "tanh", "n": "tanh"}
            for d, suffix in enumerate([""] + (["_reverse"] if m.bidirectional else [])):
                w_ih, w_hh = getattr(m, f"weight_ih_l0{suffix}"), getattr(m, f"weight_hh_l0{suffix}")
                b_ih = getattr(m, f"bias_ih_l0{suffix}", None) if m.bias else None
                b_hh = getattr(m, f"bias_hh_l0{suffix}", None) if m.bias else None
                hs = out[..., d * hid:(d + 1) * hid]
                start = h0[d].unsqueeze(1) if isinstance(h0, torch.Tensor) else torch.zeros_like(hs[:, :1])
                if d == 0:
                    prev = torch.cat([start, hs[:, :-1]], 1)
                else:  # the reverse direction runs from the last step back
                    prev = torch.cat([hs[:, 1:], start], 1)
                gi = nn.functional.linear(x, w_ih, b_ih)
                gh = nn.functional.linear(prev, w_hh, b_hh)
                gi_parts, gh_parts = gi.chunk(len(gate_names), -1), gh.chunk(len(gate_names), -1)
                for k, gname in enumerate(gate_names):
                    if gname == "n":  # GRU: n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
                        r = torch.sigmoid(gi_parts[0] + gh_parts[0])
                        pre = gi_parts[k] + r * gh_parts[k]
                    else:
                        pre = gi_parts[k] + gh_parts[k]
                    kind = kinds.get(gname, "sigmoid")
                    post = torch.tanh(pre) if kind == "tanh" else torch.sigmoid(pre)
                    rec = f"{name}:{gname}{suffix}"
                    acc = self.acts.get(rec)
                    if acc is None:
                        acc = self.acts[rec] = ActAcc(kind, None, index=len(self.acts))
                    acc.calls += 1
                    yv, xv = units_view(post, -1), units_view(pre, -1)
                    acc.n += yv.shape[0]
                    acc.units = yv.shape[1]
                    acc.inp = acc.inp.merge(Moments.of(xv))
                    cnt = _sat_mask(kind, yv.float()).sum(0).double()
                    acc.sat = cnt if acc.sat is None else acc.sat + cnt

    # -- functional calls --
    def _on_function(self, name: str, args: tuple, kwargs: dict, out: Any) -> None:
        if name in ("register_hook", "size", "dim", "numel", "is_floating_point"):
            return
        x = args[0] if args else kwargs.get("input")
        if isinstance(x, (list, tuple)):
            srcs: frozenset[str] = frozenset()
            act = None
            for t in x:
                s, a = self._lineage.get(t)
                srcs |= s
                act = act or a
        else:
            srcs, act = self._lineage.get(x)
        if name in ACTIVATIONS:
            self._on_activation(ACTIVATIONS[name], name, args, kwargs, x, out, srcs)
            return
        if name in WEIGHT_OPS:
            for s in srcs:
                self.activation.setdefault(s, ("identity", None, None))
            if self._stack:
                layer = self._stack[-1]
                if layer in self._weight_set and layer not in self.fed_by:
                    self.fed_by[layer] = act or "other"
            return
        if name in LINEAR_CONSUMERS:
            for s in srcs:
                self.activation.setdefault(s, ("identity", None, None))
            return
        if name in NORMS:
            for s in srcs:
                if s not in self.activation:
                    self.normalized.add(s)
        if name in PASSTHROUGH or name in NORMS or name in DROPOUTS or name == "get":
            if isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor):
                if name in ("add", "iadd", "radd") and len(args) > 1 and (srcs or act):
                    other = self._lineage.get(args[1])
                    if (other[0] or other[1]) and isinstance(args[1], torch.Tensor) and args[1].shape == x.shape:
                        self.residual_adds += 1  # two signals of the network meet: a skip connection
                for t in args[1:]:
                    s2, a2 = self._lineage.get(t)
                    srcs |= s2
                    act = act or a2
            for t in _tensors(out):
                self._lineage.set(t, srcs, act)
            return
        if srcs and isinstance(out, torch.Tensor):
            for s in srcs:
                if s not in self.activation:
                    self.activation[s] = ("unknown", None, None)
                    self.unknown[s] = name

    def _on_activation(self, kind, fname, args, kwargs, x, out, srcs) -> None:
        if not isinstance(out, torch.Tensor) or not out.is_floating_point():
            return
        param = None
        if kind == "leaky_relu":
            if fname == "prelu":
                w = args[1] if len(args) > 1 else kwargs.get("weight")
                param = float(w.detach().float().mean()) if isinstance(w, torch.Tensor) else 0.25
            else:
                param = args[1] if len(args) > 1 and isinstance(args[1], (int, float)) else kwargs.get(
                    "negative_slope", 0.01)
                param = float(param) if fname != "rrelu" else 0.5 * (1 / 8 + 1 / 3)
        inner = self._stack[-1] if self._stack else None
        inner_mod = self.modules.get(inner) if inner is not None else None
        src = min(srcs) if srcs else None
        if inner_mod is not None and not is_weight_layer(inner_mod) and not list(inner_mod.children()):
            rec_name = inner
            seen = self.acts.get(rec_name)
            if seen is not None and seen.layer != src:  # one activation module shared by several layers
                rec_name = f"{inner}@{src}"
        else:
            rec_name = f"{src or inner or 'input'}:{fname}"
        for s in srcs:
            self.activation.setdefault(s, (kind, param, rec_name))
        ud = self.unit_dims.get(src, -1) if src else (1 if out.dim() >= 4 else -1)
        acc = self.acts.get(rec_name)
        if acc is None:
            acc = self.acts[rec_name] = ActAcc(kind, src, index=len(self.acts))
        acc.calls += 1
        y = out.detach()
        dims = sample_dims(y, ud)
        if dims is None:  # units last: a (samples, units) view, no copy
            y, dims = units_view(y, ud), [0]
        if y.numel():
            acc.units = y.shape[ud] if dims != [0] else y.shape[1]
            acc.n += y.numel() / acc.units
        if kind in SATURATING:
            cnt = _sat_mask(kind, y.float()).sum(dim=dims).double()
            acc.sat = cnt if acc.sat is None else acc.sat + cnt
            if isinstance(x, torch.Tensor) and x is not out:
                acc.inp = acc.inp.merge(Moments.over(x, ud))
        if kind in DYING and y.numel():
            mx = y.amax(dim=dims).double()
            acc.maxv = mx if acc.maxv is None else torch.maximum(acc.maxv, mx)
        self._lineage.set(out, frozenset(), kind)

    # -- results --
    # -- results --
    def _main_weight(self, m: nn.Module) -> torch.Tensor | None:
        if isinstance(m, nn.MultiheadAttention):
            return m.in_proj_weight if m.in_proj_weight is not None else m.q_proj_weight
        if isinstance(m, nn.RNNBase):
            return m._parameters.get("weight_ih_l0")
        return m._parameters.get("weight")

    def raw(self, grads: dict[int, torch.Tensor] | None) -> list[tuple[tuple, torch.Tensor]]:
        """Every accumulator as (key, float64 device tensor): the one buffer that crosses to the host."""
        items: list[tuple[tuple, torch.Tensor]] = []

        def moments(key: str, name: str, m: Moments) -> None:
            if m.mean is None:
                return
            dev = m.mean.device
            items.append(((key, name, "n"), torch.tensor([m.n], dtype=torch.float64, device=dev)))
            items.append(((key, name, "mean"), m.mean))
            items.append(((key, name, "m2"), m.m2))

        for name, m in self.out.items():
            moments("out", name, m)
        for name, m in self.grad.items():
            moments("grad", name, m)
        for name, a in self.acts.items():
            dev = a.sat.device if a.sat is not None else (a.maxv.device if a.maxv is not None else None)
            items.append((("actn", name), torch.tensor([a.n], dtype=torch.float64, device=dev)))
            moments("actin", name, a.inp)
            if a.sat is not None:
                items.append((("sat", name), a.sat))
            if a.maxv is not None:
                items.append((("maxv", name), a.maxv))
        def shards(key: tuple, t: torch.Tensor) -> tuple:
            # the parts of a sharded tensor add up across ranks; a replicated one is taken from rank 0
            return key + ("sum",) if _sharded(t) else key

        for name in self._layer_names():
            m = self.modules[name]
            w = self._main_weight(m)
            if w is not None:
                items.append((shards(("w", name), w), weight_vec(local(w))))
                if grads is not None and id(w) in grads:
                    gw = local(grads[id(w)].detach()).reshape(-1)
                    gw = as_float(gw)
                    items.append((shards(("gw", name), grads[id(w)]),
                                  torch.stack([torch.dot(gw, gw).double(),
                                               torch.tensor(float(gw.numel()), dtype=torch.float64, device=gw.device)])))
            b = m._parameters.get("bias")
            if isinstance(b, torch.Tensor) and b.numel():
                items.append((shards(("b", name), b), weight_vec(local(b))))
        for name, t in self._samples.items():
            items.append((("sample", name), t))
            w = self._main_weight(self.modules[name]) if name in self.modules else None
            if w is not None:
                items.append((("wsample", name), local(w).detach().reshape(-1)[: self.samples].double().clone()))
        if self._out_bad:
            items.append((("outbad",), torch.cat([t.to(self._out_bad[0].device) for t in self._out_bad]).sum(0, True)))
        mains = {id(self._main_weight(self.modules[n])) for n in self._layer_names()}
        params = [p for _, p in self.model.named_parameters() if p.is_floating_point() and id(p) not in mains]
        if params:
            dev = params[0].device
            items.append((("pbad",), torch.stack([(~torch.isfinite(local(p).detach())).sum().double().to(dev)
                                                   for p in params])))
        return items

    def finish(self, grads: dict[int, torch.Tensor] | None = None, backward: bool = True,
               reduce: Callable[[list], list] | None = None, symmetry: bool = True) -> ModelStats:
        """Turn the accumulators into statistics. `grads` maps id(parameter) -> its gradient.

        All accumulators go to the host in one flat buffer (one synchronization); `reduce`, when
        given, combines that buffer across processes first (see distributed.py).
        """
        items = self.raw(grads)
        if reduce is not None:
            items = reduce(items)
        host = _to_host(items)
        self._load(host)
        layers: list[LayerStats] = []
        order = {n: i for i, n in enumerate(self.order)}
        seen_params: dict[int, str] = {}
        for name in self._layer_names():
            layers.append(self._layer_stats(name, self.modules[name], order, grads, seen_params, host, symmetry))
        acts = [self._act_stats(n, a) for n, a in self.acts.items()]
        by_layer = {a.layer: a for a in acts if a.layer}
        for lay in layers:
            a = by_layer.get(lay.name)
            if a is not None:
                lay.saturated, lay.saturated_units = a.saturated, a.saturated_units
                lay.dead, lay.preact_std = a.dead, a.preact_std
        # Zero-weight norms are deliberate (zero-init residual): they are not norms to reset.
        norms = [n for n, m in self.modules.items()
                 if isinstance(m, NORM_MODULES) and ("w", n) not in host and
                 isinstance(getattr(m, "weight", None), torch.Tensor) and bool((local(m.weight).detach() != 0).any())]
        out_bad = int(host[("outbad",)].sum()) if ("outbad",) in host else 0
        stats = ModelStats(layers, acts, norms, out_bad, backward)
        stats.residual_adds = self.residual_adds
        for key, t in host.items():
            if key[0] in ("sample", "wsample"):
                stats.samples[("activations" if key[0] == "sample" else "weights", key[1])] = t.float()
        for lay in layers:
            if lay.name in self.unknown:
                stats.notes.append((lay.name, self.unknown[lay.name]))
        if ("pbad",) in host:
            mains = {id(self._main_weight(self.modules[n])) for n in self._layer_names()}
            names = [n for n, p in self.model.named_parameters() if p.is_floating_point() and id(p) not in mains]
            for pname, bad in zip(names, host[("pbad",)].tolist()):
                if bad:
                    stats.nonfinite_params.append((pname, int(bad)))
        return stats

    def _load(self, host: dict) -> None:
        """Replace the device accumulators by their host copies."""
        def moments(key: str, name: str) -> Moments:
            return Moments(float(host[(key, name, "n")][0]), host[(key, name, "mean")],
                           host[(key, name, "m2")]) if (key, name, "n") in host else Moments()

        self.out = {name: moments("out", name) for name in self.out}
        self.grad = {name: moments("grad", name) for name in self.grad}
        for name, a in self.acts.items():
            a.n, a.inp = float(host[("actn", name)][0]), moments("actin", name)
            a.sat, a.maxv = host.get(("sat", name)), host.get(("maxv", name))

    def _layer_names(self) -> list[str]:
        names = list(self.weight_layers)
        for n in list(names):
            m = self.modules[n]
            if isinstance(m, nn.MultiheadAttention):
                child = f"{n}.out_proj" if n else "out_proj"
                if child not in names and child in self.modules:
                    names.append(child)
        return names

    def _layer_stats(self, name, m, order, grads, seen_params, host, symmetry) -> LayerStats:
        w = self._main_weight(m)
        params = [p for p in m._parameters.values() if p is not None]
        fi, fo = fans(m)
        lay = LayerStats(name=name, type=type(m).__name__, index=order.get(name, -1),
                         calls=self.calls.get(name, 0),
                         weight_shape=list(w.shape) if w is not None else [], fan_in=fi, fan_out=fo,
                         frozen=bool(params) and not any(p.requires_grad for p in params),
                         dtype=str(w.dtype).replace("torch.", "") if w is not None else "float32")
        if ("w", name) in host:
            for k, v in summary_of(host[("w", name)], local(w)).items():
                setattr(lay, k, v)
        bias = m._parameters.get("bias")
        lay.has_bias = isinstance(bias, torch.Tensor) and bias.numel() > 0
        if ("b", name) in host:
            bs = summary_of(host[("b", name)], local(m._parameters.get("bias")))
            lay.bias_mean, lay.bias_std = bs["weight_mean"], bs["weight_std"]
        act = self.activation.get(name)
        if act is not None:
            lay.activation, lay.activation_param, lay.activation_module = act
        elif lay.index >= 0:
            lay.activation = "identity"
        lay.fed_by = self.fed_by.get(name)
        if lay.fed_by is None and lay.index >= 0 and isinstance(m, nn.MultiheadAttention):
            lay.fed_by = "other"
        lay.is_output = name in self.outputs
        lay.normalized = name in self.normalized
        mo = self.out.get(name)
        if mo is not None and mo.mean is not None and mo.n > 0:
            lay.units, lay.samples = mo.units, int(mo.n)
            lay.output_nonfinite = mo.nonfinite_units()
            lay.q, lay.signal = mo.q(), mo.var()
            lay.r = lay.signal / lay.q if lay.q and math.isfinite(lay.q) and lay.q > 0 else None
        mg = self.grad.get(name)
        if mg is not None and mg.mean is not None and mg.n > 0:
            lay.grad_nonfinite = mg.nonfinite_units()
            lay.grad_q = mg.q()
        if ("gw", name) in host:
            sumsq, count = host[("gw", name)].tolist()
            lay.weight_grad_rms = math.sqrt(sumsq / max(count, 1.0))
            if lay.weight_rms:
                lay.weight_grad_ratio = lay.weight_grad_rms / lay.weight_rms
        dup_tol = T.DUP_TOL.get(lay.dtype, T.DUP_TOL["default"])
        if symmetry and w is not None and id(w) not in seen_params:
            seen_params[id(w)] = name
            for label, rows, grows in weight_rows(m, grads):
                lay.symmetry.append(symmetry_of(label, rows, grows, dup_tol))
        return lay

    def _act_stats(self, name: str, a: ActAcc) -> ActivationStats:
        # NaN survives amax and the saturation count's comparisons read it as "not saturated": the
        # maxima tell for dying kinds; the layer before reports its own non-finite outputs anyway
        bad = int(torch.isnan(a.maxv).sum()) if a.maxv is not None else 0
        s = ActivationStats(name=name, kind=a.kind, layer=a.layer, index=a.index, calls=a.calls,
                            units=a.units, nonfinite=bad)
        n = a.n
        if a.sat is not None and n > 0:
            per_unit = a.sat / n
            s.saturated = float(per_unit.mean())
            s.saturated_units = float((per_unit >= T.SAT_UNIT_BATCH).double().mean())
        if a.maxv is not None:
            s.dead = float((a.maxv <= 0).double().mean())
        if a.inp.mean is not None and a.inp.n > 1:
            s.preact_std = float(a.inp.var_units().sqrt().median())
        return s


# --- one examination ------------------------------------------------------------------------


def _to_host(items: list[tuple[tuple, torch.Tensor]]) -> dict[tuple, torch.Tensor]:
    """One device-to-host copy for all accumulators."""
    if not items:
        return {}
    if all(t.device.type == "cpu" for _, t in items):  # nothing to synchronize: no packing
        return {(k[:-1] if k[-1] == "sum" else k): t.double() for k, t in items}
    by_dev: dict[torch.device, list[int]] = {}
    for i, (_, t) in enumerate(items):
        by_dev.setdefault(t.device, []).append(i)
    out: dict[tuple, torch.Tensor] = {}
    for idx in by_dev.values():
        flat = torch.cat([items[i][1].reshape(-1).double() for i in idx]).cpu()
        pos = 0
        for i in idx:
            key, t = items[i]
            n = t.numel()
            out[key[:-1] if key[-1] == "sum" else key] = flat[pos:pos + n].reshape(t.shape)
            pos += n
    return out


def cotangent_loss(output: Any, seed: int) -> torch.Tensor:
    """L = <y, eps> summed over every floating output, eps ~ N(0, I) from its own generator."""
    total = None
    gens: dict[str, torch.Generator] = {}
    for t in _tensors(output):
        if not t.is_floating_point() or not t.requires_grad:
            continue
        key = str(t.device)
        if key not in gens:
            gens[key] = torch.Generator(device=t.device).manual_seed(seed)
        eps = torch.randn(t.shape, generator=gens[key], device=t.device, dtype=torch.float32).to(t.dtype)
        term = (t * eps).sum()
        total = term if total is None else total + term
    return total


@contextlib.contextmanager
def preserved(model: nn.Module, devices: list | None = None) -> Iterator[None]:
    """Put back train/eval modes, norm-layer running statistics and the global RNG afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    # every buffer: BatchNorm's running statistics, spectral norm's power-iteration vectors, ...
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        with torch.random.fork_rng(devices=devices or [], enabled=True):
            yield
    finally:
        for m, mode in modes:
            m.training = mode
        with torch.no_grad():
            for buf, saved in buffers:
                buf.copy_(saved)


def examine(model: nn.Module, inputs: Any, loss_fn: Callable | None = None, seed: int = 0,
            samples: int = 0, backward: bool = True) -> ModelStats:
    """One forward and one backward pass under a Recorder; the model is left exactly as it was.

    backward=False measures the forward pass alone (no gradients, no symmetry checks).
    """
    params = []
    seen: set[int] = set()
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    # enable_grad: a caller inside torch.no_grad() still gets the backward pass it asked for.
    with preserved(model, devices), torch.set_grad_enabled(backward), \
            Recorder(model, dropout_off=True, samples=samples, gradients=backward) as rec:
        model.train()
        for m in model.modules():
            if isinstance(m, nn.modules.dropout._DropoutNd):
                m.eval()
        output = model(*args)
        if not backward:
            del output
            return rec.finish(None, False, symmetry=False)
        loss = loss_fn(output, inputs) if loss_fn is not None else cotangent_loss(output, seed)
        grads: dict[int, torch.Tensor] = {}
        backward = isinstance(loss, torch.Tensor) and loss.requires_grad and bool(params)
        if backward:
            got = torch.autograd.grad(loss, params, allow_unused=True)
            grads = {id(p): g for p, g in zip(params, got) if g is not None}
        del output, loss
        return rec.finish(grads if backward else None, backward)
