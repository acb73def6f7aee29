"""check() and fix(): the pipeline probe -> statistics -> rules -> plan -> apply -> verify."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import __version__
from . import thresholds as T
from .apply import apply_plan, scale_layer
from .codes import SEVERITY_RANK, matches
from .graph import severity_for_ratio, trends
from .plan import Prescription, architectural, make_plan
from .probe import examine
from .rules import Finding, run_rules
from .stats import LayerStats, ModelStats


class ProbeError(RuntimeError):
    """The model could not be examined (its forward or backward pass raised)."""


@dataclass
class Diagnosis:
    stats: ModelStats
    findings: list[Finding]
    plan: list[Prescription]
    target: str = "model"
    input: dict = field(default_factory=dict)
    after: Diagnosis | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def layers(self) -> list[LayerStats]:
        return self.stats.layers

    def fired(self, at_least: str = "warning") -> list[Finding]:
        rank = SEVERITY_RANK[at_least]
        return [f for f in self.findings if SEVERITY_RANK[f.severity] >= rank]

    def codes(self, at_least: str = "warning") -> set[str]:
        return {f.code for f in self.fired(at_least)}

    def to_dict(self) -> dict:
        d = {
            "initdoctor": __version__,
            "target": self.target,
            "input": self.input,
            "findings": [f.to_dict() for f in self.findings],
            "layers": [lay.to_dict() for lay in self.stats.layers],
            "activations": [a.to_dict() for a in self.stats.activations],
            "plan": [p.to_dict() for p in self.plan],
        }
        if self.after is not None:
            d["after"] = {"findings": [f.to_dict() for f in self.after.findings],
                          "layers": [lay.to_dict() for lay in self.after.stats.layers],
                          "notes": self.after.notes}
        return d

    def __str__(self) -> str:
        from .report.text import render

        return render(self, color=False)


def eager(model: Any) -> nn.Module:
    """The module itself; a `torch.compile`d model is examined through the module it wraps."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"initdoctor needs an nn.Module, got {type(model).__name__}")
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else model


def _describe_input(x: Any) -> dict:
    ts = [t for t in (x if isinstance(x, tuple) else (x,)) if isinstance(t, torch.Tensor)]
    if not ts:
        return {"shape": [], "dtype": type(x).__name__, "inferred": False}
    d = {"shape": list(ts[0].shape), "dtype": str(ts[0].dtype).replace("torch.", ""), "inferred": False}
    if len(ts) > 1:
        d["shapes"] = [list(t.shape) for t in ts]
    return d


def check(model: nn.Module, example_input: Any, loss_fn: Callable | None = None, seed: int = 0, *,
          select: list[str] | None = None, ignore: list[str] | None = None, keep: tuple[str, ...] = (),
          scheme: str | None = None, target: str = "model", samples: int = 0) -> Diagnosis:
    """Examine `model` on `example_input` with one forward and one backward pass; never mutates it.

    `samples` keeps that many values of each layer's weights and outputs for histograms.
    """
    model = eager(model)
    try:
        stats = examine(model, example_input, loss_fn, seed, samples)
    except Exception as e:  # the user's model raised: say where, keep the cause
        raise ProbeError(f"the model's forward or backward pass raised {type(e).__name__}: {e}") from e
    findings = run_rules(stats, select, ignore)
    plan = make_plan(stats, findings, keep, scheme)
    return Diagnosis(stats, findings, plan, target, _describe_input(example_input))


@dataclass
class FixResult:
    before: Diagnosis
    after: Diagnosis
    plan: list[Prescription]
    written: list[str]
    cured: bool
    notes: list[str]

    def __str__(self) -> str:
        return str(self.before)


def _score(d: Diagnosis) -> tuple[int, int]:
    errs = sum(1 for f in d.findings if f.severity == "error")
    warns = sum(1 for f in d.findings if f.severity == "warning")
    return errs, warns


def _adjust(model: nn.Module, after: Diagnosis, plan: list[Prescription]) -> list[str]:
    """LSUV-style: scale each homologous group with a remaining depth trend by its measured factor."""
    notes = []
    by_layer = {p.layer: p for p in plan}
    adjusted: set[str] = set()
    for t in trends(after.stats):
        if t.metric not in ("signal", "gradient") or t.normalized:
            continue
        if severity_for_ratio(t.ratio, T.TREND_WARN, T.TREND_ERROR, t.ratio < 1) is None:
            continue
        f = t.per_layer
        if not (math.isfinite(f) and f > 0):
            continue
        c = f ** -0.5
        for name in t.layers:
            if name in adjusted or name not in by_layer or not by_layer[name].apply:
                continue
            adjusted.add(name)
            scale_layer(model, name, c, by_layer[name].bias == "centred")
            by_layer[name].gain *= c
        notes.append(f"{t.metric} still changed x{f:.3g} per layer over {t.layers[0]}..{t.layers[-1]}: "
                     f"weights scaled by {c:.3g}")
    return notes


def fix(model: nn.Module, example_input: Any, loss_fn: Callable | None = None, seed: int = 0, *,
        keep: tuple[str, ...] = (), scheme: str | None = None, select: list[str] | None = None,
        ignore: list[str] | None = None, target: str = "model", samples: int = 0) -> FixResult:
    """Apply the prescription in place, examine again, adjust gains a few times, and report.

    If the cure does not reduce the fired findings, the weights are put back and the result says
    what initialization cannot do.
    """
    model = eager(model)
    kw = dict(select=select, ignore=ignore, keep=keep, scheme=scheme, target=target, samples=samples)
    before = check(model, example_input, loss_fn, seed, **kw)
    plan = before.plan
    saved = {id(p): (p, p.detach().clone()) for p in model.parameters()}
    notes: list[str] = []
    written = apply_plan(model, plan, seed) if any(p.apply for p in plan) else []
    if scheme == "lsuv" and written:
        notes += _lsuv(model, example_input, loss_fn, seed, plan)
    after = check(model, example_input, loss_fn, seed, **kw)
    for _ in range(T.LSUV_ITERATIONS if written else 0):
        step = _adjust(model, after, plan)
        if not step:
            break
        notes += step
        after = check(model, example_input, loss_fn, seed, **kw)
    new = after.codes() - before.codes()
    cured = bool(written) and _score(after) < _score(before) and not new
    if written and not cured:
        with torch.no_grad():
            for p, v in saved.values():
                p.copy_(v)
        for p in plan:
            p.apply = False
        why = (f"it would add {', '.join(sorted(new))}" if new else "it did not reduce the findings")
        notes.append(f"the prescription was tried and undone: {why}")
        after = check(model, example_input, loss_fn, seed, **kw)
        written = []
    arch = architectural(after.findings)
    remaining = [f for f in after.fired() if f.code.startswith(("ID2", "ID3"))]
    wanted = (not select or matches("ID906", select)) and not (ignore and matches("ID906", ignore))
    if wanted and (arch or (remaining and not cured)):
        order = {lay.name: lay.index for lay in after.stats.layers}
        names = sorted({n for f in (arch or remaining) for n in f.layers}, key=lambda n: order.get(n, 1 << 30))
        after.findings.append(Finding(
            "ID906", "info", names[:8],
            "initialization alone cannot cure " + ", ".join(sorted({f.code for f in (arch or remaining)}))
            + ": " + ("the layers are followed by normalization, which undoes any init scale, yet gradients "
                      "still grow through the plain stack; add residual connections (or use fewer layers)."
                      if arch else "consider normalization (BatchNorm/LayerNorm), residual connections, or "
                      "another activation."),
            {"remaining": sorted({f.code for f in (arch or remaining)})}))
    after.notes = notes
    before.after = after
    before.plan = plan
    return FixResult(before, after, plan, written, cured, notes)


def _lsuv(model, example_input, loss_fn, seed, plan) -> list[str]:
    """Layer-sequential unit variance (Mishkin & Matas): each layer's output second moment to 1."""
    by_layer = {p.layer: p for p in plan if p.apply and p.scheme != "ones"}
    notes = []
    order = examine(model, example_input, loss_fn, seed, backward=False).ran()
    for i, lay in enumerate(order):
        if lay.name not in by_layer:
            continue
        # each layer's output depends on the layers before it, rescaled in turn: measure afresh
        cur = lay if i == 0 else examine(model, example_input, loss_fn, seed, backward=False).layer(lay.name)
        if cur.q and math.isfinite(cur.q) and cur.q > 0:
            c = cur.q ** -0.5
            scale_layer(model, lay.name, c, by_layer[lay.name].bias == "centred")
            by_layer[lay.name].gain *= c
    notes.append(f"LSUV: {len(by_layer)} layer(s) scaled to unit output variance")
    return notes
