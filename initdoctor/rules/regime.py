"""ID301-ID303: where on its curve each nonlinearity works."""

from __future__ import annotations

import math

from .. import thresholds as T
from .. import vocab
from ..depth import own_std, severity_for_ratio
from . import Context, Finding, Rule, init_call, register


def _module_paths(hits) -> list[str]:
    """Module paths of the hit activations: the layer they follow, else the module (RNN gates: 'rnn:i')."""
    out: list[str] = []
    for h in hits:
        name = h[1].layer or h[1].module
        if name not in out:
            out.append(name)
    return out


def _worst(sevs: list[str]) -> str:
    return "error" if "error" in sevs else "warning"


@register
class SaturatedActivations(Rule):
    code = "ID301"

    def judge(self, ctx: Context) -> list[Finding]:
        stats = ctx.stats
        hits = []
        for a in stats.activations:
            if a.saturated is None or a.kind == vocab.SOFTMAX:
                continue
            s, u = a.saturated, a.saturated_units or 0.0
            if s > T.SAT_SHARE_ERROR or u > T.SAT_UNITS_ERROR:
                hits.append(("error", a, s, u))
            elif s > T.SAT_SHARE_WARN or u > T.SAT_UNITS_WARN:
                hits.append(("warning", a, s, u))
        pinned = [f for a in stats.activations if a.kind == vocab.SOFTMAX for f in self._pinned(ctx, a)]
        if not hits:
            return pinned
        worst = max(hits, key=lambda h: h[2])
        _, a, s, u = worst
        names = _module_paths(hits)
        return [self.finding(
            _worst([h[0] for h in hits]), names,
            f"{len(hits)} {a.kind} layer(s) work on their flat tails: at {a.layer or a.name} {s:.0%} of outputs "
            f"and {u:.0%} of units are saturated, so their gradients are near zero. The weights are too large "
            f"for their fan; use Xavier's scale (see the plan).",
            saturated={h[1].name: round(h[2], 4) for h in hits},
            saturated_units={h[1].name: round(h[3], 4) for h in hits})] + pinned

    def _pinned(self, ctx: Context, a) -> list[Finding]:
        """The softmax over a tied head's logits, pinned on one class at init: the cause is the embedding's
        scale (a position's logit for its own token grows with its square), the cure re-drawing it."""
        s = a.saturated
        sev = "error" if s > T.SAT_SHARE_ERROR else "warning" if s > T.SAT_SHARE_WARN else None
        if sev is None:
            return []
        stats = ctx.stats
        head = stats.layer(a.layer)
        emb = stats.layer(head.tied_embedding)
        text = (f"the softmax over {head.name}'s {a.units} logits starts pinned: {s:.0%} of positions put more "
                f"than {T.SIGMOID_HI:.0%} of their probability on one class (logits std {a.preact_std:.2g}), so the "
                f"initial cross-entropy is far above log({a.units}) = {math.log(a.units):.3g} and the first "
                f"updates go to undoing that confidence. {head.name} is tied to the embedding {emb.name}, drawn at "
                f"std {emb.weight_std:.2g}")
        own = own_std(stats)
        redraw: dict[str, float] = {}
        if own and emb.weight_std and emb.weight_std > own:
            c = own / emb.weight_std
            # every embedding added into the same stream keeps its share of it (token vs position)
            stream = [lay for lay in stats.layers if lay.kind == vocab.EMBEDDING and lay.weight_std and
                      (lay.residual or lay.name == emb.name)]
            redraw = {lay.name: lay.weight_std * c for lay in stream}
            text += (f", {1 / c:.3g}x the std the model draws its other weight layers at ({own:.2g}): a position's "
                     f"logit for its own input token grows with the square of that scale. Re-draw the embeddings "
                     f"at the model's own scale ({', '.join(f'{n} at std {v:.2g}' for n, v in redraw.items())}; "
                     f"the plan does).")
        else:
            text += (": the logits' scale comes from the stream the head reads, not from the embedding's draw; "
                     "initialization of the embedding alone cannot cure it.")
        return [self.finding(sev, [head.name], text, saturated={a.name: round(s, 4)}, logits_std=a.preact_std,
                             classes=a.units, embedding=emb.name, embedding_std=emb.weight_std, own_std=own,
                             redraw=redraw)]


def _fired_collapse_or_vanishing(ctx: Context) -> bool:
    for t in ctx.trends:
        if t.metric == "collapse" and severity_for_ratio(t.ratio, T.COLLAPSE_WARN, T.COLLAPSE_ERROR, True):
            return True
        if t.metric in ("gradient", "signal") and severity_for_ratio(t.ratio, T.TREND_WARN, T.TREND_ERROR, True):
            return True
    return False


@register
class LinearRegime(Rule):
    code = "ID302"

    def judge(self, ctx: Context) -> list[Finding]:
        stats = ctx.stats
        out = []
        for kind, limit in T.LINEAR_STD.items():
            acts = [a for a in stats.activations if a.kind == kind and a.preact_std is not None]
            small = [a for a in acts if a.preact_std < limit]
            if not acts or len(small) < T.LINEAR_LAYER_SHARE * len(acts):
                continue
            sev = "warning" if _fired_collapse_or_vanishing(ctx) else "info"
            med = sorted(a.preact_std for a in small)[len(small) // 2]
            prescribed = _at_prescribed_scale(ctx, small)
            if prescribed:
                advice = (" The weights already have the prescribed scale: the signal narrows through "
                          f"{kind}'s curvature (its gain is exact only for small inputs)"
                          + ("; see the depth findings." if sev == "warning" else "; no action needed."))
            elif any(a.layer is None for a in small):
                advice = (" Usual with PyTorch's default recurrent init; if training stalls, re-initialize "
                          "with Xavier input weights and orthogonal recurrent weights, as `--fix` does for "
                          "a sick recurrent layer.")
            else:  # the plan's own call for these layers, so that advice and plan agree
                by_name = {lay.name: lay for lay in ctx.stats.layers}
                feeding = [by_name[a.layer] for a in small if a.layer in by_name]
                calls = sorted({init_call(*ctx.cure.recommend(lay)[:2], lay, ctx.cure) for lay in feeding})
                advice = (f" Grow the weights to Xavier's scale: {'; '.join(calls[:2])} (see the plan)." if calls
                          else " Grow the weights to Xavier's scale (see the plan).")
            gates = all(a.layer is None for a in small)
            what = (f"{len(small)} of {len(acts)} {kind} {'gates' if gates else 'layers'} see inputs with a "
                    f"per-unit std of about {med:.2g} (below {limit}), where {kind} is nearly a straight line")
            what += (": the gates barely respond to their input." if gates else
                     ": the stack behaves like one linear map"
                     + (" and the signal or gradient dies with depth." if sev == "warning" else "."))
            out.append(self.finding(
                sev, _module_paths([(None, a) for a in small]), what + advice,
                preact_std={a.name: a.preact_std for a in small}, limit=limit, prescribed_scale=prescribed))
        return out


def _at_prescribed_scale(ctx: Context, acts) -> bool:
    """Whether every layer feeding these activations is drawn at its prescribed scale."""
    return all(a.layer and ctx.cure.at_prescribed_scale(ctx.stats.layer(a.layer)) for a in acts)


@register
class DeadUnits(Rule):
    code = "ID303"

    def judge(self, ctx: Context) -> list[Finding]:
        stats = ctx.stats
        hits, sloped, pooled = [], [], []
        by_name = {lay.name: lay for lay in stats.layers}
        for a in stats.activations:
            if a.dead is None:
                continue
            sev = "error" if a.dead >= T.DEAD_ERROR else "warning" if a.dead > T.DEAD_WARN else None
            if sev is None:
                continue
            if a.kind not in vocab.ZERO_GRADIENT:
                sloped.append((sev, a))  # never positive, but their slope below zero keeps a gradient
                continue
            lay = by_name.get(a.layer)
            if lay is not None and lay.r is not None and lay.r < T.POOLED_R and not _biased_off(lay):
                p = chance_of_dead(a.units, round(a.dead * a.units))
                if p >= T.DEAD_CHANCE:
                    pooled.append((a, lay.r, p))
                    continue
            hits.append((sev, a))
        out = []
        if hits:
            worst = max(hits, key=lambda h: h[1].dead)[1]
            out.append(self.finding(
                _worst([h[0] for h in hits]), _module_paths(hits),
                f"{len(hits)} {worst.kind} layer(s) have mostly dead units: at {worst.layer or worst.name} "
                f"{worst.dead:.0%} of units output zero for every example, so they get no gradient and never "
                f"recover. Use He init with zero biases (negative biases or too-large weights kill units).",
                dead={h[1].name: round(h[1].dead, 4) for h in hits}))
        if pooled:
            a, r, p = max(pooled, key=lambda h: h[0].dead)
            out.append(self.finding(
                "info", _module_paths([(None, h[0]) for h in pooled]),
                f"{len(pooled)} layer(s) see almost no input-dependent variation (at {a.layer}, r = {r:.2g}: "
                f"pooled inputs, as in squeeze-excitation), so each unit is on or off for the whole batch by "
                f"the sign of its mean; {a.dead:.0%} of {a.units} units off is what chance gives (P = {p:.2g}), "
                f"not a sign of bad initialization.",
                dead={h[0].name: round(h[0].dead, 4) for h in pooled}, chance={h[0].name: h[2] for h in pooled}))
        if sloped:
            a = max(sloped, key=lambda h: h[1].dead)[1]
            out.append(self.finding(
                "info", _module_paths(sloped),
                f"{len(sloped)} {a.kind} layer(s) have units that are never positive (at {a.layer or a.name} "
                f"{a.dead:.0%}); unlike ReLU's, their slope below zero is not zero, so they still get a "
                f"gradient and can recover.",
                never_positive={h[1].name: round(h[1].dead, 4) for h in sloped}))
        return out


def _biased_off(lay) -> bool:
    """Whether the layer's biases are negative as a whole and make up most of its output's second
    moment: then its units are switched off on purpose or by a bad init, not by a coin flip (biases
    drawn symmetric about zero, as by default, switch half of them off when the signal is gone)."""
    if lay.bias_mean is None or not lay.q:
        return False
    return lay.bias_mean < 0 and lay.bias_mean ** 2 >= 0.5 * lay.q


def chance_of_dead(units: int, dead: int) -> float:
    """P(Binomial(units, 1/2) >= dead): how often dead units this many arise by a coin flip each."""
    if units <= 0 or dead <= 0:
        return 1.0
    if 2 * dead <= units:  # P(X >= d) = 1 - P(X >= units - d + 1), by the coin's symmetry
        return max(0.0, 1.0 - _upper_tail(units, units - dead + 1))
    return min(1.0, _upper_tail(units, dead))


def _upper_tail(n: int, k0: int) -> float:
    """P(Binomial(n, 1/2) >= k0) for k0 above n / 2, where the terms only fall: summed from the
    first, each from the one before, until they no longer change the sum."""
    if k0 > n:
        return 0.0
    first = math.lgamma(n + 1) - math.lgamma(k0 + 1) - math.lgamma(n - k0 + 1) - n * math.log(2.0)
    term, total = 1.0, 0.0
    for k in range(k0, n + 1):
        total += term
        term *= (n - k) / (k + 1)
        if term < total * 1e-17:
            break
    return math.exp(first) * total
