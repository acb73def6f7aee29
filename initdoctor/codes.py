"""The finding codes: one table, used by the rules, the reports, `explain` and the docs."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources


@dataclass(frozen=True)
class Code:
    code: str
    name: str
    summary: str
    fix_title: str


CODES: dict[str, Code] = {
    c.code: c
    for c in [
        Code("ID101", "constant-weights", "every entry of a weight tensor is equal",
             "draw the weights at random (Xavier or He)"),
        Code("ID102", "duplicate-units", "two or more output units of a weight tensor are identical",
             "draw the weights at random so that units differ"),
        Code("ID103", "unbreakable-symmetry",
             "duplicate units whose gradients are identical too: gradient descent can never tell them apart",
             "draw the weights at random so that units differ"),
        Code("ID201", "vanishing-activations", "the signal's scale or its input-dependent share shrinks with depth",
             "use the gain and fan of the activation that follows (He for ReLU, Xavier for tanh)"),
        Code("ID202", "exploding-activations", "the signal's scale grows with depth",
             "use the variance-preserving scale for the fan and activation"),
        Code("ID203", "vanishing-gradients", "back-propagated gradients shrink toward the input",
             "use the variance-preserving scale for the fan and activation"),
        Code("ID204", "exploding-gradients", "back-propagated gradients grow toward the input",
             "lower the gain (or use orthogonal init); add normalization or skips where init cannot help"),
        Code("ID301", "saturated-activations", "sigmoid/tanh-like outputs pinned at their asymptotes",
             "shrink the weights to Xavier's scale for the fan"),
        Code("ID302", "linear-regime", "sigmoid/tanh inputs so small that the nonlinearity acts as a line",
             "grow the weights to Xavier's scale (sigmoid: gain 4 with centring)"),
        Code("ID303", "dead-units", "ReLU-family units that output zero for every example",
             "He init with zero biases"),
        Code("ID401", "non-finite", "NaN or Inf in weights, activations or gradients",
             "find the tensor named in the finding and re-initialize or repair it"),
        Code("ID501", "init-scale-mismatch",
             "a weight's scale is far from the variance-preserving scale for its fan and nonlinearity",
             "use the prescribed scheme"),
        Code("ID901", "layer-not-run", "a layer with weights never ran in the probe pass",
             "check the example input reaches it, or ignore the note"),
        Code("ID902", "activation-unknown", "the operation after a layer could not be identified",
             "the prescription assumes no nonlinearity; check it"),
        Code("ID903", "gradient-blocked", "a layer sees exactly zero gradient because a zero layer follows",
             "nothing: a zero-initialized layer downstream opens the path after one step"),
        Code("ID904", "no-backward", "no backward pass could be made, so gradient rules did not run",
             "make sure the output depends on trainable parameters, or pass loss_fn"),
        Code("ID905", "rnn-internals",
             "an RNN's gates run inside one fused op; initdoctor rebuilds them where it can",
             "nothing"),
        Code("ID906", "cannot-cure", "initialization alone cannot cure what remains",
             "change the architecture as the finding says"),
        Code("ID907", "deep-plain-stack",
             "a deep stack without normalization or skip connections: hard to train even when well initialized",
             "add residual connections or normalization, or use a small learning rate"),
    ]
}

SEVERITIES = ("error", "warning", "info")
SEVERITY_RANK = {"info": 0, "warning": 1, "error": 2}


def lookup(code: str) -> Code:
    """The code's entry; accepts `ID203` or `vanishing-gradients`, any case."""
    key = code.strip()
    if key.upper() in CODES:
        return CODES[key.upper()]
    for c in CODES.values():
        if c.name == key.lower():
            return c
    raise KeyError(f"unknown code {code!r}; valid codes: {', '.join(CODES)}")


def page(code: str) -> str:
    """The rule's documentation page (markdown), shared by `initdoctor explain` and the docs site."""
    c = lookup(code)
    return resources.files("initdoctor").joinpath("pages", f"{c.code}.md").read_text(encoding="utf-8")


def matches(code: str, prefixes: list[str]) -> bool:
    return any(code.startswith(p.strip().upper()) for p in prefixes if p.strip())
