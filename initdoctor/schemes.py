"""Gains, fans and scales on top of `torch.nn.init`; never a re-derivation of its formulas.

`Prescriber` is what the rules see of the cure (the `Cure` interface of `rules`): they quote it in
their advice without importing the planner.
"""

from __future__ import annotations

import math

from torch import nn

from . import thresholds as T
from . import vocab
from .vocab import RECTIFIERS, TANH_LIKE


def gain(activation: str | None, param: float | None = None) -> float:
    """The gain `torch.nn.init.calculate_gain` gives for the nonlinearity after a layer."""
    if activation == "leaky_relu":
        return nn.init.calculate_gain("leaky_relu", 0.01 if param is None else param)
    if activation in RECTIFIERS:
        return nn.init.calculate_gain("relu")
    if activation in TANH_LIKE:
        return nn.init.calculate_gain("tanh")
    if activation == "sigmoid":
        return nn.init.calculate_gain("sigmoid")
    return 1.0


def slope_factor(activation: str | None, param: float | None = None) -> float:
    """Share of a zero-mean input's second moment that passes the nonlinearity, for small inputs.

    Rectifiers keep half (leaky: (1 + a^2)/2); tanh's slope at 0 is 1 (its gain of 5/3 answers its
    saturation, not its slope); sigmoid's slope of 1/4 keeps 1/16.
    """
    if activation == "leaky_relu":
        a = 0.01 if param is None else param
        return (1 + a * a) / 2
    if activation in RECTIFIERS:
        return 0.5
    if activation == "sigmoid":
        return 1.0 / 16.0
    return 1.0


def default_linear_std(fan_in: int) -> float:
    """PyTorch's Linear/Conv default: kaiming_uniform_(a=sqrt(5)) = U(+-1/sqrt(fan_in))."""
    return 1.0 / math.sqrt(3.0 * fan_in)


def looks_default(std: float | None, fan_in: int | None, absmax: float | None = None) -> bool:
    """Whether weights look like PyTorch's default U(+-1/sqrt(fan_in)): its std, and (when the largest
    |w| is known) nothing beyond its bound, which tells it from a normal draw of the same std."""
    if not std or not fan_in:
        return False
    if absmax is not None and absmax > 1.0001 / math.sqrt(fan_in):
        return False
    return abs(std / default_linear_std(fan_in) - 1.0) < 0.1


def std_of(scheme: str, gain_: float, fan_in: int, fan_out: int) -> float:
    """Standard deviation a scheme draws with (as documented for torch.nn.init), for comparisons."""
    if scheme.startswith("xavier"):
        return gain_ * math.sqrt(2.0 / (fan_in + fan_out))
    if scheme in ("kaiming_uniform", "kaiming_normal", "lecun_normal"):
        return gain_ / math.sqrt(fan_in)
    if scheme == "orthogonal":
        return gain_ / math.sqrt(max(fan_in, fan_out))
    return 0.0


def deep_tanh_gain(depth: int) -> float:
    """tanh: 5/3 up to about TANH_DEEP layers, nearer 1 deeper (5/3 turns chaotic with depth)."""
    return nn.init.calculate_gain("tanh") if depth <= T.TANH_DEEP else T.TANH_DEEP_GAIN


def recommend(lay, tanh_depth: int = 0) -> tuple[str, float, str, str]:
    """(scheme, gain, mode, reason) for a weight layer, from the nonlinearity that follows it."""
    act, param = lay.activation, lay.activation_param
    mode = "fan_out" if lay.kind == vocab.CONV_TRANSPOSE else "fan_in"  # torch's fans are swapped there
    if lay.kind == vocab.EMBEDDING:
        return "keep", 1.0, mode, "embeddings have no fan-in; their scale is the model's choice"
    if lay.tied_embedding:
        return "keep", 1.0, mode, f"tied to the embedding {lay.tied_embedding}: its scale is the embedding's"
    if lay.parametrization:
        return ("keep", gain(act, param), mode,
                f"the weight is computed by {lay.parametrization}, which sets its scale: initialization of "
                f"its parameters cannot change it")
    if lay.kind == vocab.RECURRENT:
        return ("xavier_uniform", 1.0, mode,
                "recurrent layer: Xavier for input weights, orthogonal for recurrent weights, zero biases")
    if act in RECTIFIERS:
        g = gain(act, param)
        name = f"leaky_relu({param:g})" if act == "leaky_relu" and param is not None else act
        return "kaiming_normal", g, mode, f"He init for {name}: gain {g:.3g}, {mode} keeps the variance"
    if act == "selu":
        return "lecun_normal", 1.0, "fan_in", "LeCun normal keeps SELU self-normalizing"
    if act in TANH_LIKE:
        g = deep_tanh_gain(tanh_depth)
        why = (f"Xavier for {act} with gain {g:.3g}" + (f" ({tanh_depth} tanh layers: 5/3 turns chaotic this deep)"
                                                       if g != nn.init.calculate_gain("tanh") else ""))
        return "xavier_uniform", g, mode, why
    if act == "sigmoid":
        if lay.fed_by == "sigmoid":
            return ("xavier_uniform", T.SIGMOID_GAIN, mode,
                    "Xavier gain 4 undoes sigmoid's slope of 1/4; bias centred to cancel its 0.5 mean")
        return "xavier_uniform", 1.0, mode, "Xavier gain 1 before a sigmoid, fed by the standardized input"
    where = "output layer" if lay.is_output else "no nonlinearity follows"
    return "xavier_uniform", 1.0, mode, f"{where}: Xavier gain 1"


def prescribed_std(lay, tanh_depth: int = 0, residual: dict | None = None) -> tuple[str, float] | None:
    """(scheme, std) the prescription would draw this layer with; None where it keeps the layer or
    where its scale is the model's deliberate choice (a residual projection at 1/sqrt(N) of its branch:
    `residual`, from depth.residual_scales)."""
    if not (lay.weight_std and lay.fan_in and lay.fan_out) or lay.kind in (vocab.RECURRENT, vocab.ATTENTION):
        return None
    if residual and lay.name in residual and residual[lay.name].deliberate:
        return None
    scheme, g, _, _ = recommend(lay, tanh_depth)
    if scheme == "keep":
        return None
    return scheme, std_of(scheme, g, lay.fan_in, lay.fan_out)


def at_prescribed_scale(lay, tanh_depth: int = 0, residual: dict | None = None) -> bool:
    """Whether the layer's weight variance is within PRESCRIBED_VAR_TOL of what the plan would draw."""
    prescribed = prescribed_std(lay, tanh_depth, residual)
    if prescribed is None or not prescribed[1]:
        return False
    ratio = (lay.weight_std / prescribed[1]) ** 2
    return 1 / T.PRESCRIBED_VAR_TOL <= ratio <= T.PRESCRIBED_VAR_TOL


def centre_bias(lay) -> bool:
    """Layers fed by a sigmoid get bias = -0.5 * rowsum(W), cancelling the sigmoid's mean of 0.5.

    Not for transposed convolutions: their outputs sum over a stride-dependent subset of the kernel.
    """
    return lay.fed_by == "sigmoid" and lay.kind != vocab.CONV_TRANSPOSE


class Prescriber:
    """The cure as the rules quote it, for one model (its tanh depth fixes the tanh gain; its residual
    projections drawn at 1/sqrt(N) of their branches, `depth.residual_scales`, are its own choice)."""

    def __init__(self, tanh_depth: int = 0, residual: dict | None = None) -> None:
        self.tanh_depth = tanh_depth
        self.residual = residual or {}

    def recommend(self, lay) -> tuple[str, float, str, str]:
        return recommend(lay, self.tanh_depth)

    def prescribed_std(self, lay) -> tuple[str, float] | None:
        return prescribed_std(lay, self.tanh_depth, self.residual)

    def at_prescribed_scale(self, lay) -> bool:
        return at_prescribed_scale(lay, self.tanh_depth, self.residual)

    centre_bias = staticmethod(centre_bias)
    slope_factor = staticmethod(slope_factor)

    @staticmethod
    def looks_default(lay) -> bool:
        # torch draws its default from the fan it reads off the stored tensor: a transposed
        # convolution's (in, out) weight gives it the forward fan-out
        fan = lay.fan_out if lay.kind == vocab.CONV_TRANSPOSE else lay.fan_in
        return looks_default(lay.weight_std, fan, lay.weight_absmax)
