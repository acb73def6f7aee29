"""Pure tensor -> number reductions, and the dataclasses that hold their results.

Per-unit moments are kept as (count, mean, centred sum of squares) and merged with Chan's parallel
formula, so a module called twice, or a batch split over ranks, gives the numbers of one pass over
the whole batch; centring before squaring keeps variances of 1e-17 next to a mean of 0.5 exact.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch


def units_view(t: torch.Tensor, unit_dim: int) -> torch.Tensor:
    """(samples, units) view of an activation: units are `unit_dim`, samples everything else."""
    if t.dim() == 0:
        return t.reshape(1, 1)
    if t.dim() == 1:
        return t.reshape(-1, 1) if unit_dim != 0 else t.reshape(1, -1)
    if unit_dim in (-1, t.dim() - 1):
        return t.reshape(-1, t.shape[-1])
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
class Sums:
    """Raw per-unit sums of a tensor, taken on its device in a few kernels and never synchronized.

    Each unit is shifted by its first sample `k` (values near it subtract exactly, so a variance of
    1e-17 next to a mean of 0.5 survives), then `s1` = sum of (x - k) per unit and `s2` = sum of
    (x - k)^2, either per unit or `pooled` over all units (all that the signal, q and G need). A
    NaN or Inf in a unit makes its s1 non-finite.

    The squares must neither overflow nor underflow float32 (a gradient of 1e-20 is still a
    gradient). On the CPU the shifted copy, which is ours, is summed in float32 as it is where its
    sums of squares show that nothing overflowed or was lost (`SUMSQ_SAFE`: nearly always); where
    they do not, a large one is divided in place by its largest |value| (`scale`), so that every
    square lies in [0, 1], and summed again, with no float64 copy, whose freshly mapped pages cost
    more than the arithmetic there; a small one's pooled sum of squares is taken as one float64
    norm. On accelerators, where kernel launches are the cost, float32 (or narrower) data are summed
    raw in float64 with no shift at all (`_raw`: three kernels; `k` is None). Later calls of the same
    module add up under the first call's shift, or unshifted (in float64); `moments()` turns the
    sums into per-unit means and centred sums of squares in float64 on the host.
    """

    n: float
    s1: torch.Tensor
    s2: torch.Tensor
    k: torch.Tensor | None = None  # per-unit shift (flat)
    scale: torch.Tensor | None = None  # s1 and s2 are of (x - k) / scale

    @staticmethod
    def over(t: torch.Tensor, unit_dim: int, *, pooled: bool = True, shift: bool | None = None) -> Sums | None:
        """`shift=False`: raw float64 sums, no shift (`_raw`); the default on accelerators, where
        each kernel's launch is what counts, for data narrower than float64."""
        x, ud, dims = _prepare(t, unit_dim)
        if x is None:
            return None
        n = float(x.numel() // max(x.shape[ud], 1))
        if shift is None:
            shift = x.device.type == "cpu" or x.dtype == torch.float64
        if not shift:
            return Sums(n, *_raw(x, dims, pooled))
        if dims == [0]:  # (samples, units): the first row
            k = x[0].clone()
        else:
            k = x[tuple(slice(None) if d == ud else slice(0, 1) for d in range(x.dim()))].reshape(-1).clone()
        s1, s2, scale = _sums(x, k, ud, dims, pooled)
        return Sums(n, s1, s2, k, scale)

    @property
    def units(self) -> int:
        return int(self.s1.numel())

    @property
    def pooled(self) -> bool:
        return self.s2.numel() != self.s1.numel() or self.s1.numel() == 1

    def add(self, t: torch.Tensor, unit_dim: int) -> None:
        """Another call's tensor, under this one's shift, if any (so the sums simply add, in float64)."""
        x, ud, dims = _prepare(t, unit_dim)
        if x is None:
            return
        if x.shape[ud] != self.s1.numel():
            raise ValueError(f"{x.shape[ud]} units where an earlier call had {self.s1.numel()}")
        s1, s2, scale = _sums(x, self.k, ud, dims, self.pooled and self.s2.numel() == 1)
        self.n += float(x.numel() // max(x.shape[ud], 1))
        a1, a2 = _unscaled(self.s1, self.s2, self.scale)
        b1, b2 = _unscaled(s1, s2, scale)
        self.s1, self.s2, self.scale = a1 + b1, a2 + b2, None

    def moments(self) -> Moments:
        """Per-unit mean and centred sum of squares, float64 on the CPU."""
        scale = None if self.scale is None else _host(self.scale)
        if scale is not None and float(scale) == 1.0:  # summed unscaled (the usual case on the CPU)
            scale = None
        s1, s2 = _unscaled(_host(self.s1), _host(self.s2), scale)
        k = _double(_host(self.k)) if self.k is not None else torch.zeros_like(s1)
        # m2 = s2 - s1^2 / n: the sum over samples of the mean deviation, squared, per unit (or pooled)
        inv = 1.0 / self.n if self.n else math.nan
        if s2.numel() != s1.numel():
            # in Python floats: the same float64 arithmetic in fewer tensor operations
            m2 = torch.tensor([max(float(s2) - float(torch.square(s1).sum()) * inv, 0.0)], dtype=torch.float64)
        else:  # not torch.dot above: see _NO_BLAS
            m2 = torch.addcmul(s2, s1, s1, value=-inv).clamp_min_(0.0)
        return Moments(self.n, torch.add(k, s1, alpha=inv), m2)

    def summary(self) -> tuple[int, float, float]:
        """`moments().summary()`: (non-finite units, q, var). Pooled sums, where no per-unit variance
        is wanted, are summarized in NumPy on the host without building the moments: 8 against 16
        µs for 256 units (scratch), two per layer and sample; float64 throughout, as there."""
        s1, s2, k = _host(self.s1), _host(self.s2), None if self.k is None else _host(self.k)
        numpy_types = all(t.dtype in (torch.float32, torch.float64) for t in (s1, s2, k) if t is not None)
        if not self.pooled or s1.numel() == 1 or not self.n or not numpy_types:
            return self.moments().summary()
        d1 = s1.numpy().astype(np.float64)
        d2 = float(s2)
        if self.scale is not None and (c := float(_host(self.scale))) != 1.0:
            d1, d2 = d1 * c, d2 * (c * c)
        inv = 1.0 / self.n
        mean = d1 * inv if k is None else k.numpy() + d1 * inv  # float64: NumPy promotes float32 k
        units = d1.size
        var = max(d2 - float((d1 * d1).sum()) * inv, 0.0) / (max(self.n, 1.0) * units)
        msq = float((mean * mean).sum()) / units
        if math.isfinite(var) and math.isfinite(msq):
            return 0, var + msq, var
        return self.moments().summary()  # counts the units that are not finite


def _host(t: torch.Tensor) -> torch.Tensor:
    t = t.detach() if t.requires_grad else t
    return t if t.device.type == "cpu" else t.cpu()


def _prepare(t: torch.Tensor, unit_dim: int) -> tuple[torch.Tensor | None, int, list[int]]:
    x = as_float(t.detach())
    if x.numel() == 0:
        return None, 0, []
    dims = sample_dims(x, unit_dim)
    if dims is None:
        return units_view(x, unit_dim), 1, [0]
    return x, unit_dim % x.dim(), dims


def _double(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float64 else t.double()


def _unscaled(s1: torch.Tensor, s2: torch.Tensor, scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    s1, s2 = _double(s1), _double(s2)
    if scale is None:
        return s1, s2
    c = scale.double()
    return s1 * c, s2 * c.square()


# _NO_BLAS: what runs on the host after the copy (moments, summaries, the rules) makes no call that
# MKL (the CPU math library of x86 torch builds) runs on threads of its own: no BLAS (`torch.dot`)
# and no vectorized math on tensors (`sqrt`, `exp`, `log`, ...). Under `step(wait=False)` it runs on
# the watch's worker thread, where MKL starts a team of one thread per core (`torch.set_num_threads`
# applies to the threads that called it), whose spin-waits took the cores from training (scratch:
# 40 square roots of 512 values on another thread made 20 concurrent 128x512 @ 512x512 products
# 12 ms slower; an MLP's sampled step 1.45-1.55x a plain one with `step(wait=False)`, 1.20-1.30x
# without them). Elementwise products and sums run in the calling thread alone at these sizes. The
# same holds for NumPy (`Sums.summary`), whose BLAS has a thread pool of its own: no `np.dot` or `@`.

SMALL = 1 << 14  # entries: below this a float64 copy is cheap on the CPU too (no fresh pages), kernels count
# A float32 sum of squares at least this large (and finite) lost nothing that counts to underflow:
# squares below the smallest normal float32 (2^-126) add up to under 2^-95 in 2^31 entries, a part
# in 2^35 of it. A vanishing gradient of 1e-20 per entry is below it and is summed scaled instead.
SUMSQ_SAFE = 2.0 ** -60


def scaled(t: torch.Tensor) -> bool:
    """Whether a tensor counts as large for `Sums` (on the CPU only): where float32 squares would not
    hold, its shifted copy is scaled in place rather than summed as one float64 norm, and a layer's
    output is summed per unit (as cheap there)."""
    return t.device.type == "cpu" and t.numel() > SMALL


def _raw(x: torch.Tensor, dims: list[int], pooled: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums of x and x^2 in float64 without a shift: three kernels (the copy, the sums, one dot)
    where the shifted sums take five. Float32 data squared in float64 neither overflow nor
    underflow, and the variance s2/n - mean^2 then carries a relative error of about
    1e-16 (mean/std)^2, far below what float32 data resolve of such a spread."""
    xd = x.double()  # ours: squared in place below
    s1 = xd.sum(dim=dims)
    if pooled:
        flat = xd.reshape(-1)
        return s1, torch.dot(flat, flat).reshape(1)
    return s1, xd.square_().sum(dim=dims)


def _sums(x: torch.Tensor, k: torch.Tensor | None, ud: int, dims: list[int],
          pooled: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    if k is None:  # sums begun without a shift (`_raw`) go on without one
        return (*_raw(x, dims, pooled), None)
    xs = _shifted(x, k, ud)  # ours: changed in place below
    small = pooled and not scaled(xs)  # summed without a scale: no "scale" in the buffer
    if xs.device.type == "cpu":
        # summed in float32 as they are first, and kept where the sums of squares show that no square
        # overflowed or was lost to underflow (reading a CPU scalar costs no synchronization): the
        # Transformer's outputs 160 -> 96 µs each, a float64 norm's 10 µs -> 4 on small ones (scratch)
        s1 = xs.sum(dim=dims)
        if pooled:
            flat = xs.reshape(-1)
            s2 = torch.dot(flat, flat).reshape(1)
            low = high = float(s2)
        else:
            s2 = xs.square_().sum(dim=dims)
            low, high = (float(v) for v in torch.aminmax(s2))
        if SUMSQ_SAFE <= low and high < math.inf:
            # a scale of one, not none: every rank's buffer keeps one layout (distributed.py)
            return s1, s2, None if small else torch.ones((), dtype=xs.dtype)
        if not pooled:
            xs = _shifted(x, k, ud)
    if small:
        return xs.sum(dim=dims), torch.linalg.vector_norm(xs, dtype=torch.float64).square_().reshape(1), None
    lo, hi = torch.aminmax(xs)
    # a NaN or Inf anywhere: no scaling, so that only the units that hold one have a non-finite s1
    scale = torch.nan_to_num_(torch.maximum(lo.neg_(), hi), nan=1.0, posinf=1.0).clamp_min_(1e-30)
    xs.div_(scale)
    s1 = xs.sum(dim=dims)
    if pooled:
        flat = xs.reshape(-1)
        return s1, torch.dot(flat, flat).reshape(1), scale
    return s1, xs.square_().sum(dim=dims), scale


def _shifted(x: torch.Tensor, k: torch.Tensor, ud: int) -> torch.Tensor:
    return x - (k if ud == x.dim() - 1 else k.reshape([-1 if d == ud else 1 for d in range(x.dim())]))


@dataclass
class Moments:
    """Per-unit count, mean and centred sum of squares (float64 vectors on the CPU once finished).

    `m2` is per unit, or one number pooled over the units (`Sums(pooled=True)`): the average
    variance, q and the merge need only its sum.
    """

    n: float = 0.0
    mean: torch.Tensor | None = None
    m2: torch.Tensor | None = None

    @staticmethod
    def over(t: torch.Tensor, unit_dim: int) -> Moments:
        """Per-unit moments of a tensor whose units lie on `unit_dim`."""
        s = Sums.over(t, unit_dim, pooled=False)
        return Moments() if s is None else s.moments()

    @staticmethod
    def of(x: torch.Tensor) -> Moments:
        """Per-unit moments of a (samples, units) tensor."""
        if x.shape[0] == 0:
            return Moments()
        return Moments.over(x, 1)

    @property
    def pooled(self) -> bool:
        return self.m2 is not None and self.m2.numel() != self.mean.numel()

    def merge(self, other: Moments) -> Moments:
        if self.mean is None:
            return other
        if other.mean is None:
            return self
        n = self.n + other.n
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.n / n)
        corr = delta.square() * (self.n * other.n / n)
        if self.pooled or other.pooled:
            m2 = self.m2.sum().reshape(1) + other.m2.sum().reshape(1) + corr.sum().reshape(1)
        else:
            m2 = self.m2 + other.m2 + corr
        return Moments(n, mean, m2)

    @property
    def units(self) -> int:
        return 0 if self.mean is None else int(self.mean.numel())

    def var_units(self) -> torch.Tensor:
        """Per-unit variance (per-unit moments only)."""
        if self.pooled:
            raise ValueError("pooled moments have no per-unit variance")
        return self.m2 / max(self.n, 1.0)

    def q(self) -> float:
        """Second moment mean(y^2) = mean over units of (var + mean^2)."""
        return self.summary()[1]

    def var(self) -> float:
        """Per-unit variance over samples, averaged over units: the input-dependent signal."""
        return float(self.m2.sum()) / (max(self.n, 1.0) * max(self.units, 1))

    def summary(self) -> tuple[int, float, float]:
        """(non-finite units, q, var): the count needs no pass of its own where every unit is finite."""
        var = self.var()
        msq = float(torch.square(self.mean).sum()) / max(self.units, 1)  # not torch.dot: see _NO_BLAS
        # sums of non-negative terms are finite only if every term is; else count them
        bad = 0 if math.isfinite(var) and math.isfinite(msq) else self.nonfinite_units()
        return bad, var + msq, var

    def nonfinite_units(self) -> int:
        bad = ~torch.isfinite(self.mean)
        if not self.pooled:
            bad |= ~torch.isfinite(self.m2)
        return int(bad.sum())


def summary_of(n: int, s1: float, s2: float, w: torch.Tensor | None = None) -> dict:
    """Mean, std and rms of a tensor of `n` entries from its sum and sum of squares (float32 sums:
    weights are centred near zero, so the one-pass variance is exact enough here, unlike for
    activations). Sums that are not finite mean NaN/Inf entries: their count is read from `w`."""
    if not (math.isfinite(s1) and math.isfinite(s2)):
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
