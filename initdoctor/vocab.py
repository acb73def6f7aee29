"""The words initdoctor speaks in, in one torch-free place (like `codes.py` for findings).

Scheme names, activation families, layer kinds and metric names are used by the command line, the
probe, the rules, the plan and the reporters alike; each is defined here once.
"""

from __future__ import annotations

from dataclasses import dataclass

# --- initialization schemes -----------------------------------------------------------------
# What a plan entry may say (DESIGN section 2, JSON `scheme`).
SCHEMES = ("xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal", "lecun_normal",
           "orthogonal", "zeros", "ones", "keep")
# What `--scheme` may force on every layer ("lsuv" is orthogonal, then scaled to unit variance).
FORCEABLE = ("xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal", "orthogonal", "lsuv")

# --- activation families (the `activation` of a layer) ---------------------------------------
RECTIFIERS = frozenset({"relu", "leaky_relu", "gelu", "silu", "elu", "softplus"})  # He init
TANH_LIKE = frozenset({"tanh", "hardtanh", "softsign"})  # Xavier with tanh's gain
SATURATING = frozenset({"sigmoid"}) | TANH_LIKE  # flat tails: saturation and the linear regime
# The softmax a classifier's logits go into (measured at an output layer tied to the input embedding,
# whose outputs score the input's own tokens): saturated when one class takes nearly all probability.
SOFTMAX = "softmax"
DYING = frozenset({"relu", "gelu", "silu"})  # units can output <= 0 for every example
ZERO_GRADIENT = frozenset({"relu"})  # ... and then get no gradient (GELU and SiLU still have a slope)

# --- layer kinds (read from the module by the probe; `LayerStats.kind`) ----------------------
LINEAR = "linear"  # Linear, HF Conv1D and any other (out, in) matrix
CONV = "conv"
CONV_TRANSPOSE = "conv_transpose"  # the weight stores (in, out): torch's fans are swapped
EMBEDDING = "embedding"  # rows are tokens, not units; no fan-in
RECURRENT = "recurrent"  # LSTM/GRU/RNN: gates inside one fused op
ATTENTION = "attention"  # nn.MultiheadAttention's packed projections
KINDS = (LINEAR, CONV, CONV_TRANSPOSE, EMBEDDING, RECURRENT, ATTENTION)
# gate blocks stacked in a recurrent layer's weight, by module class
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


# --- metrics (one name per statistic, from LayerStats to charts and TensorBoard tags) --------
@dataclass(frozen=True)
class Metric:
    name: str  # the public name: history keys, plot_history(metric=...), TensorBoard tags
    attr: str  # the LayerStats attribute it reads
    title: str
    log: bool  # variance-like: shown on log axes
    per_activation: bool = False  # measured on the nonlinearity that follows the layer


METRICS = (
    Metric("signal", "signal", "signal (per-unit variance)", log=True),
    Metric("scale", "q", "scale q = mean(y²)", log=True),
    Metric("gradient", "grad_q", "gradient G = mean(δ²)", log=True),
    Metric("weight_grad_ratio", "weight_grad_ratio", "|dL/dW| / |W|", log=True),
    Metric("saturation", "saturated", "saturated share", log=False, per_activation=True),
    Metric("dead", "dead", "dead-unit share", log=False, per_activation=True),
)
METRIC = {m.name: m for m in METRICS}
# a watch() history record keeps each metric under its LayerStats attribute
HISTORY_FIELDS = tuple(m.attr for m in METRICS)
