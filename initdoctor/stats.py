"""Pure tensor -> number reductions, and the dataclasses that hold their results.

Per-unit moments are kept as (count, mean, centred sum of squares) and merged with Chan's parallel
formula, so a module called twice, or a batch split over ranks, gives the numbers of one pass over
the whole batch; centring before squaring keeps variances of 1e-17 next to a mean of 0.5 exact.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch


def units_view(t: torch.Tensor, unit_dim: int) -> torch.Tensor:
    """(samples, units) view of an activation: units are `unit_dim`, samples everything else."""
    if t.dim() == 0:
        return t.reshape(1, 1)
    if t.dim() == 1:
        return t.reshape(-1, 1) if unit_dim != 0 else t.reshape(1, -1)
    return t.movedim(unit_dim, -1).reshape(-1, t.shape[unit_dim])


def as_float(t: torch.Tensor) -> torch.Tensor:
    """float32/float64 as they are; every other dtype (bfloat16, half, ...) as float32."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def sample_dims(t: torch.Tensor, unit_dim: int) -> list[int] | None:
    """The dims to reduce over when units are not the last dim (conv outputs); None otherwise."""
    if t.dim() < 3 or unit_dim % t.dim() == t.dim() - 1 or t.numel() == 0:
        return None
    ud = unit_dim % t.dim()
    return [d for d in range(t.dim()) if d != ud]


@dataclass
class Moments:
    """Per-unit count, mean and centred sum of squares (float64 vectors on the CPU once finished)."""

    n: float = 0.0
    mean: torch.Tensor | None = None
    m2: torch.Tensor | None = None

    @staticmethod
    def over(t: torch.Tensor, unit_dim: int) -> Moments:
        """`of` for a tensor whose units lie on `unit_dim`, without copying it into (samples, units)."""
        dims = sample_dims(t, unit_dim)
        if dims is None:
            return Moments.of(units_view(t, unit_dim))
        return Moments._reduce(t, unit_dim % t.dim(), dims)

    @staticmethod
    def of(x: torch.Tensor) -> Moments:
        """Reduce a (samples, units) tensor in two float32 passes; stays on its device, never synchronizes.

        Each unit is shifted by its first sample (values near it subtract exactly) and scaled by its
        largest deviation, so squares stay finite for any finite input and a variance of 1e-17 next
        to a mean of 0.5 survives (relative error ~1e-7). A NaN or Inf in a unit makes its mean or m2
        non-finite, which is how `nonfinite_units` finds it.
        """
        if x.shape[0] == 0:
            return Moments()
        return Moments._reduce(x, 1, [0])

    @staticmethod
    def _reduce(t: torch.Tensor, ud: int, dims: list[int]) -> Moments:
        x = as_float(t.detach())
        k = x[tuple(slice(None) if d == ud else slice(0, 1) for d in range(x.dim()))]
        xs = x - k
        scale = xs.abs().amax(dim=dims, keepdim=True).clamp_min(1e-30)
        xs = xs.div_(scale)
        d = xs.mean(dim=dims, keepdim=True)
        m2 = (xs - d).square_().sum(dim=dims).double()
        s64 = scale.reshape(-1).double()
        n = float(x.numel() // max(x.shape[ud], 1))
        return Moments(n, k.reshape(-1).double() + d.reshape(-1).double() * s64, m2 * s64.square())

    def merge(self, other: Moments) -> Moments:
        if self.mean is None:
            return other
        if other.mean is None:
            return self
        n = self.n + other.n
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.n / n)
        m2 = self.m2 + other.m2 + delta.square() * (self.n * other.n / n)
        return Moments(n, mean, m2)

    @property
    def units(self) -> int:
        return 0 if self.mean is None else int(self.mean.numel())

    def var_units(self) -> torch.Tensor:
        return self.m2 / max(self.n, 1.0)

    def q(self) -> float:
        """Second moment mean(y^2) = mean over units of (var + mean^2)."""
        return float((self.var_units() + self.mean.square()).mean())

    def var(self) -> float:
        """Per-unit variance over samples, averaged over units: the input-dependent signal."""
        return float(self.var_units().mean())

    def nonfinite_units(self) -> int:
        return int((~(torch.isfinite(self.mean) & torch.isfinite(self.m2))).sum())


def weight_vec(w: torch.Tensor) -> torch.Tensor:
    """[count, sum, sum of squares, non-finite flag] of a tensor, on its device, in two passes.

    Weights are centred near zero, so the one-pass variance is exact enough here (unlike for
    activations, see Moments). Any NaN/Inf makes the sums non-finite, which sets the flag. All four
    add up over the shards of a sharded parameter.
    """
    x = as_float(w.detach().reshape(-1))
    s1 = x.sum().double()  # pairwise summation; a float64 accumulator costs 15x here
    s2 = torch.dot(x, x).double() if x.numel() else s1 * 0
    n = torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device)
    return torch.stack([n, s1, s2, (~torch.isfinite(s1 + s2)).double()])


def summary_of(vec: torch.Tensor, w: torch.Tensor | None = None) -> dict:
    """Mean, std and rms from `weight_vec`; with non-finite entries, their count (read from `w`)."""
    n, s1, s2, nonfinite = vec.tolist()
    if nonfinite:
        bad = int((~torch.isfinite(w.detach())).sum()) if w is not None else 1
        return {"weight_mean": None, "weight_std": None, "weight_rms": None, "weight_nonfinite": bad}
    if n == 0:
        return {"weight_mean": None, "weight_std": None, "weight_rms": None, "weight_nonfinite": 0}
    mean = s1 / n
    rms = math.sqrt(max(s2 / n, 0.0))
    return {"weight_mean": mean, "weight_std": math.sqrt(max(s2 / n - mean * mean, 0.0)), "weight_rms": rms,
            "weight_nonfinite": 0}


def _finite(x: float | None) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return x


@dataclass
class SymmetryStats:
    """Row-level symmetry of one weight tensor (or one chunk of a packed tensor)."""

    param: str
    rows: int
    constant: bool
    zero: bool
    grad_constant: bool | None  # None when no gradient was computed
    grad_rows_differ: bool | None
    duplicate_groups: list[list[int]] = field(default_factory=list)
    frozen_groups: list[list[int]] = field(default_factory=list)  # duplicates with equal gradients
    value: float | None = None  # the constant, when constant
    shape: list[int] = field(default_factory=list)  # (units, fan) as compared

    @property
    def duplicate_units(self) -> int:
        return sum(len(g) for g in self.duplicate_groups)


@dataclass
class LayerStats:
    """Everything measured about one weight layer. Floats are None when not measurable."""

    name: str
    type: str
    kind: str = "linear"  # vocab.KINDS: how the weight maps inputs to units
    transposed: bool | None = False  # the weight is stored (in, out): the model computes x @ W (HF Conv1D);
    # None: the layout is unknown (not a torch layer, and it never ran), and so are its fans
    parametrization: str | None = None  # what computes the weight from its parameters (spectral_norm, ...)
    tied: list[str] = field(default_factory=list)  # other layers that use the same weight tensor
    tied_embedding: str | None = None  # an embedding among them: the weight's scale is the embedding's
    index: int = -1  # execution order among weight layers; -1: never ran
    calls: int = 0
    weight_shape: list[int] = field(default_factory=list)
    fan_in: int | None = None
    fan_out: int | None = None
    activation: str | None = None  # what follows: relu, leaky_relu, tanh, sigmoid, identity, ...
    activation_param: float | None = None  # negative slope of leaky_relu
    activation_module: str | None = None  # the activation's record name (see ActivationStats)
    fed_by: str | None = None  # the nonlinearity whose output feeds this layer, 'input' for the batch
    is_output: bool = False
    residual: bool = False  # a skip connection adds its output into a stream (a block's last projection)
    fed_from: list[str] = field(default_factory=list)  # the weight layers whose outputs reach it first
    normalized: bool = False  # a norm layer follows before the nonlinearity
    frozen: bool = False
    has_bias: bool = False
    dtype: str = "float32"
    # weights
    weight_mean: float | None = None
    weight_std: float | None = None
    weight_rms: float | None = None
    weight_nonfinite: int = 0
    weight_absmax: float | None = None  # tells PyTorch's default U(+-1/sqrt(fan_in)) from a normal draw
    bias_mean: float | None = None
    bias_std: float | None = None
    # forward (pre-activation output of the layer)
    q: float | None = None
    signal: float | None = None  # per-unit variance over samples, averaged over units
    r: float | None = None  # signal / q
    # q of the stream the layer's output reaches at its next norm over the last dim (pre-norm
    # transformers' residual stream), weighted by each row's gradient: the norm rescales G by 1/q there
    stream_q: float | None = None
    output_nonfinite: int = 0
    units: int = 0
    samples: int = 0
    # backward
    grad_q: float | None = None  # G = mean(delta^2) for delta = dL/dy
    grad_nonfinite: int = 0
    weight_grad_rms: float | None = None
    weight_grad_ratio: float | None = None  # |dW| / |W|
    # the nonlinearity that follows, copied from its ActivationStats
    saturated: float | None = None
    saturated_units: float | None = None
    dead: float | None = None
    preact_std: float | None = None
    symmetry: list[SymmetryStats] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, float):
                d[k] = _finite(v)
        return d


@dataclass
class ActivationStats:
    """One nonlinearity application (a module, or a functional call attributed to a layer)."""

    name: str
    kind: str
    layer: str | None  # the weight layer whose output it consumes
    module: str = ""  # the module path it belongs to (its own module, else the layer it follows)
    gate: str | None = None  # a recurrent layer's gate ("i", "f", "g", "o"; "r", "z", "n"), rebuilt
    index: int = -1
    calls: int = 0
    units: int = 0
    saturated: float | None = None
    saturated_units: float | None = None
    dead: float | None = None
    preact_std: float | None = None
    nonfinite: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ModelStats:
    layers: list[LayerStats]
    activations: list[ActivationStats]
    norms: list[str]  # norm-layer module names (their affine parameters are part of the plan)
    output_nonfinite: int = 0
    backward: bool = True
    unknown_ops: list[tuple[str, str]] = field(default_factory=list)  # (layer, op) for unknown consumers
    nonfinite_params: list[tuple[str, int]] = field(default_factory=list)  # other than layer weights
    residual_adds: int = 0  # additions of two signals of the network (skip connections)
    trained_norms: list[str] = field(default_factory=list)  # norms whose gains vary across channels
    # (kind, layer) -> a few values of weights/activations for histograms; never serialized
    values: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict, repr=False)

    def layer(self, name: str) -> LayerStats:
        for lay in self.layers:
            if lay.name == name:
                return lay
        raise KeyError(name)

    def ran(self) -> list[LayerStats]:
        return sorted((lay for lay in self.layers if lay.index >= 0), key=lambda lay: lay.index)
