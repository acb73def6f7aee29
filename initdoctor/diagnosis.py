"""check() and fix(): the pipeline probe -> statistics -> rules -> plan -> apply -> verify."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from . import thresholds as T
from ._version import __version__
from .apply import apply_plan, restore, scale_layer, snapshot
from .codes import SEVERITY_RANK
from .depth import Trend, residual_scales, severity_for_ratio, tanh_depth, trends
from .outputs import softmax_tails, with_output_softmax
from .plan import Prescription, make_plan
from .probe import call_args, cotangent_loss, eager, examine
from .rules import Context, Finding, FixOutcome, conclude, run_rules
from .schemes import Prescriber
from .stats import LayerStats, ModelStats


class ProbeError(RuntimeError):
    """The model could not be examined (its forward or backward pass raised)."""


@dataclass(frozen=True)
class Diagnosis:
    stats: ModelStats
    findings: list[Finding]
    plan: list[Prescription]
    target: str = "model"
    input: dict = field(default_factory=dict)
    after: Diagnosis | None = None
    fix_log: list[str] = field(default_factory=list)  # what `fix` did beyond the plan (gain adjustments, undo)
    trends: list[Trend] = field(default_factory=list, repr=False)
    sources: list[str] = field(default_factory=list)  # where statistics came from, when not the usual pass

    @property
    def layers(self) -> list[LayerStats]:
        return self.stats.layers

    def problems(self, at_least: str = "warning") -> list[Finding]:
        """The findings at or above a severity (by default those that fired: warnings and errors)."""
        rank = SEVERITY_RANK[at_least]
        return [f for f in self.findings if SEVERITY_RANK[f.severity] >= rank]

    def codes(self, at_least: str = "warning") -> set[str]:
        return {f.code for f in self.problems(at_least)}

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
        if self.sources:
            d["sources"] = list(self.sources)
        if self.after is not None:
            d["after"] = {"findings": [f.to_dict() for f in self.after.findings],
                          "layers": [lay.to_dict() for lay in self.after.stats.layers],
                          "notes": self.after.fix_log}
        return d

    def __str__(self) -> str:
        from .report.text import render

        return render(self, color=False)


def describe_input(x: Any) -> dict:
    args, kwargs = call_args(x)
    named = [(None, t) for t in args if isinstance(t, torch.Tensor)]
    named += [(k, t) for k, t in kwargs.items() if isinstance(t, torch.Tensor)]
    if not named:
        return {"shape": [], "dtype": type(x).__name__, "inferred": False}
    first = named[0][1]
    d = {"shape": list(first.shape), "dtype": str(first.dtype).replace("torch.", ""), "inferred": False}
    if len(named) > 1:
        d["shapes"] = [list(t.shape) for _, t in named]
    if kwargs:
        d["keywords"] = [k for k, _ in named if k is not None]
    return d


def prescriber(stats: ModelStats) -> Prescriber:
    """The cure as the rules quote it, for this model."""
    return Prescriber(tanh_depth(stats), residual_scales(stats))


def judge(stats: ModelStats, select: list[str] | None = None,
          ignore: list[str] | None = None) -> tuple[list[Finding], list[Trend]]:
    """The findings of one examination, and the depth trends they rest on (computed once)."""
    found = trends(stats)
    return run_rules(stats, found, prescriber(stats), select, ignore), found


def check(model: nn.Module, example_input: Any, loss_fn: Callable | None = None, seed: int = 0, *,
          select: list[str] | None = None, ignore: list[str] | None = None, keep: tuple[str, ...] = (),
          scheme: str | None = None, target: str = "model", histogram_values: int = 0,
          inferred: bool = False) -> Diagnosis:
    """Examine `model` on `example_input` with one forward and one backward pass; never mutates it.

    `histogram_values` keeps that many values of each layer's weights and outputs for histograms.
    """
    model = eager(model)
    observed: dict = {}

    def loss(output: Any, batch: Any) -> Any:  # the probe's loss, seeing the output as logits first
        observed.update(softmax_tails(output))
        return loss_fn(output, batch) if loss_fn is not None else cotangent_loss(output, seed)

    try:
        stats = examine(model, example_input, loss, seed, histogram_values)
    except Exception as e:  # the user's model raised: say where, keep the cause
        raise ProbeError(f"the model's forward or backward pass raised {type(e).__name__}: {e}") from e
    stats = with_output_softmax(stats, observed)
    findings, found = judge(stats, select, ignore)
    plan = make_plan(stats, findings, keep, scheme)
    return Diagnosis(stats, findings, plan, target, {**describe_input(example_input), "inferred": inferred},
                     trends=found)


@dataclass(frozen=True)
class FixResult:
    before: Diagnosis
    after: Diagnosis
    plan: list[Prescription]
    written: list[str]
    cured: bool
    fix_log: list[str]

    def __str__(self) -> str:
        return str(self.before)


def _score(d: Diagnosis) -> tuple[int, int]:
    errs = sum(1 for f in d.findings if f.severity == "error")
    warns = sum(1 for f in d.findings if f.severity == "warning")
    return errs, warns


def _adjust(model: nn.Module, after: Diagnosis, plan: list[Prescription], factors: dict[str, float]) -> list[str]:
    """LSUV-style: scale each homologous group with a remaining depth trend by its measured factor.

    The factors applied are multiplied into `factors` (layer -> gain factor), so the plan can say
    which gain each layer settled on.
    """
    notes = []
    by_layer = {p.layer: p for p in plan}
    adjusted: set[str] = set()
    for t in after.trends:
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
            factors[name] = factors.get(name, 1.0) * c
        notes.append(f"{t.metric} still changed x{f:.3g} per layer over {t.layers[0]}..{t.layers[-1]}: "
                     f"weights scaled by {c:.3g}")
    return notes


def fix(model: nn.Module, example_input: Any, loss_fn: Callable | None = None, seed: int = 0, *,
        keep: tuple[str, ...] = (), scheme: str | None = None, select: list[str] | None = None,
        ignore: list[str] | None = None, target: str = "model", histogram_values: int = 0,
        inferred: bool = False) -> FixResult:
    """Apply the prescription in place, examine again, adjust gains a few times, and report.

    If the cure does not reduce the fired findings, the weights are put back and the result says
    what initialization cannot do.
    """
    model = eager(model)
    kw = dict(select=select, ignore=ignore, keep=keep, scheme=scheme, target=target,
              histogram_values=histogram_values, inferred=inferred)
    before = check(model, example_input, loss_fn, seed, **kw)
    plan = before.plan
    saved = snapshot(model)
    log: list[str] = []
    factors: dict[str, float] = {}
    written = apply_plan(model, plan, seed) if any(p.apply for p in plan) else []
    if scheme == "lsuv" and written:
        log += _lsuv(model, example_input, loss_fn, seed, plan, factors)
    after = check(model, example_input, loss_fn, seed, **kw)
    for _ in range(T.LSUV_ITERATIONS if written else 0):
        step = _adjust(model, after, plan, factors)
        if not step:
            break
        log += step
        after = check(model, example_input, loss_fn, seed, **kw)
    new = after.codes() - before.codes()
    cured = bool(written) and _score(after) < _score(before) and not new
    if written and not cured:
        restore(saved)
        plan = [replace(p, apply=False) for p in plan]
        why = (f"it would add {', '.join(sorted(new))}" if new else "it did not reduce the findings")
        log.append(f"the prescription was tried and undone: {why}")
        after = check(model, example_input, loss_fn, seed, **kw)
        written = []
    else:
        plan = [replace(p, gain=p.gain * factors[p.layer]) if p.layer in factors else p for p in plan]
    concluded = conclude(Context(after.stats, after.trends, prescriber(after.stats), after.findings,
                                 FixOutcome(cured, tuple(keep))), select, ignore)
    after = replace(after, findings=concluded, fix_log=log)
    return FixResult(replace(before, after=after, plan=plan), after, plan, written, cured, log)


def _lsuv(model, example_input, loss_fn, seed, plan, factors: dict[str, float]) -> list[str]:
    """Layer-sequential unit variance (Mishkin & Matas): each layer's output second moment to 1."""
    by_layer = {p.layer: p for p in plan if p.apply and p.scheme != "ones"}
    order = examine(model, example_input, loss_fn, seed, backward=False).ran()
    for i, lay in enumerate(order):
        if lay.name not in by_layer:
            continue
        # each layer's output depends on the layers before it, rescaled in turn: measure afresh
        cur = lay if i == 0 else examine(model, example_input, loss_fn, seed, backward=False).layer(lay.name)
        if cur.q and math.isfinite(cur.q) and cur.q > 0:
            c = cur.q ** -0.5
            scale_layer(model, lay.name, c, by_layer[lay.name].bias == "centred")
            factors[lay.name] = factors.get(lay.name, 1.0) * c
    return [f"LSUV: {len(by_layer)} layer(s) scaled to unit output variance"]
