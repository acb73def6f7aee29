"""ID101-ID103: units that start equal, and whether gradient descent can ever tell them apart.

Units i and j are duplicates when their weight rows and biases are equal. They stay equal forever
when their gradient rows are equal too (SGD, momentum, Adam(W), RMSprop and weight decay all map
identical (weights, gradient, state) to identical updates). 1-D parameters are never flagged alone.
"""

from __future__ import annotations

from ..stats import ModelStats
from . import Context, Finding, Rule, compact, register


def _where(name: str, param: str) -> str:
    if param == "weight":
        return name or "(model)"
    return f"{name}.{param}" if name else param


@register
class ConstantWeights(Rule):
    code = "ID101"

    def judge(self, ctx: Context) -> list[Finding]:
        stats = ctx.stats
        out = []
        for lay in stats.layers:
            for sym in lay.symmetry:
                if not sym.constant:
                    continue
                value = sym.value if sym.value is not None else lay.weight_mean
                what = "zero" if sym.zero else f"the constant {value:.4g}"
                where = _where(lay.name, sym.param)
                if sym.grad_constant is None:
                    sev, why = "warning", "no gradient was computed, so whether training breaks it is unknown"
                elif sym.grad_constant:
                    sev = "error"
                    why = ("its gradient is " + ("zero" if sym.zero else "constant too")
                           + ", so every entry receives the same update and it can never move apart"
                           + (" (see ID103)" if sym.frozen_groups else ""))
                elif sym.zero and sym.grad_rows_differ:
                    sev, why = "info", "a deliberate zero-init: its gradient rows differ, so it moves on the first step"
                elif sym.grad_rows_differ:
                    sev, why = "info", "its gradient rows differ, so the first step breaks the constant"
                else:
                    sev = "info"
                    why = ("its gradient varies along each row, so entries move apart, but the rows stay "
                           "identical (see ID103)")
                out.append(self.finding(
                    sev, [where],
                    f"every entry of {where} ({lay.type} {'x'.join(map(str, sym.shape or lay.weight_shape))}) is {what}; {why}."
                    + ("" if sev == "info" else " Draw it at random (Xavier or He, see the plan)."),
                    rows=sym.rows, zero=sym.zero, gradient_constant=sym.grad_constant, value=value))
        return compact(out, lambda f: (f.severity, f.evidence["value"], f.evidence["gradient_constant"]))


def _dups(stats: ModelStats, frozen: bool):
    for lay in stats.layers:
        for sym in lay.symmetry:
            if not sym.duplicate_groups or (sym.zero and not frozen):
                continue  # a zero tensor is never ID102's: ID101 says it, and ID103 when its rows cannot part
            groups = sym.frozen_groups if frozen else sym.duplicate_groups
            if groups:
                yield lay, sym, groups


@register
class DuplicateUnits(Rule):
    code = "ID102"

    def judge(self, ctx: Context) -> list[Finding]:
        stats = ctx.stats
        out = []
        for lay, sym, groups in _dups(stats, frozen=False):
            groups = [g for g in groups if g not in sym.frozen_groups]  # those are ID103's
            if not groups:
                continue
            n = sum(len(g) for g in groups)
            where = _where(lay.name, sym.param)
            sev = "warning" if sym.grad_rows_differ is not False else "error"
            out.append(self.finding(
                sev, [where],
                f"{n} of {sym.rows} units of {where} are identical in {len(groups)} group(s) (largest: "
                f"{max(len(g) for g in groups)}); their gradients differ, so they separate only slowly and "
                f"waste capacity until then. Draw the weights at random.",
                units=sym.rows, duplicate_units=n, groups=[g[:16] for g in groups[:8]]))
        return compact(out, lambda f: f.severity)


@register
class UnbreakableSymmetry(Rule):
    code = "ID103"

    def judge(self, ctx: Context) -> list[Finding]:
        stats = ctx.stats
        out = []
        for lay, sym, groups in _dups(stats, frozen=True):
            n = sum(len(g) for g in groups)
            where = _where(lay.name, sym.param)
            if sym.zero and sym.grad_constant:
                out.append(self.finding(
                    "error", [where],
                    f"every entry of {where} is zero and so is its gradient: it can never move, and its "
                    f"{sym.rows} units stay one (a zero layer that feeds a ReLU, or zero query and key "
                    f"projections, which leave each other's gradient at zero). Draw the weights at random "
                    f"(see the plan).",
                    units=sym.rows, frozen_units=n, groups=[g[:16] for g in groups[:8]], zero=True))
                continue
            out.append(self.finding(
                "error", [where],
                f"{n} of {sym.rows} units of {where} are identical and so are their gradients "
                f"({len(groups)} group(s), largest {max(len(g) for g in groups)}): every optimizer gives them "
                f"the same update forever, so the layer acts as {sym.rows - n + len(groups)} unit(s). "
                f"Draw the weights at random (see the plan).",
                units=sym.rows, frozen_units=n, groups=[g[:16] for g in groups[:8]]))
        return compact(out, lambda f: f.evidence.get("zero", False))
