"""ID501: a weight's scale against the variance-preserving scale for its fan and nonlinearity."""

from __future__ import annotations

import math

from .. import thresholds as T
from . import Context, Finding, Rule, register


@register
class InitScaleMismatch(Rule):
    code = "ID501"

    def judge(self, ctx: Context) -> list[Finding]:
        stats = ctx.stats
        off = {}
        default = []
        for lay in stats.ran():
            prescribed = ctx.cure.prescribed_std(lay)
            if prescribed is None:
                continue
            scheme, want = prescribed
            ratio = lay.weight_std / want
            if ratio > T.SCALE_NOTE or ratio < 1.0 / T.SCALE_NOTE:
                off[lay.name] = {"std": lay.weight_std, "expected": want, "ratio": ratio, "scheme": scheme}
                if ctx.cure.looks_default(lay):
                    default.append(lay.name)
        if not off:
            return []
        big = {n: v for n, v in off.items() if v["ratio"] >= T.SCALE_WARN}
        out = [self._too_large(big)] if big else []
        off = {n: v for n, v in off.items() if n not in big}
        default = [n for n in default if n in off]
        if not off:
            return out
        worst = max(off.items(), key=lambda kv: abs(math.log(kv[1]["ratio"])))
        msg = (f"{len(off)} layer(s) are drawn at a scale far from variance-preserving; worst {worst[0]}: std "
               f"{worst[1]['std']:.3g} vs {worst[1]['expected']:.3g} for {worst[1]['scheme']} "
               f"({worst[1]['ratio']:.2g}x).")
        if default:
            msg += (f" {len(default)} of them use PyTorch's default U(+-1/sqrt(fan_in)), which is a sixth of "
                    f"He's variance: fine when shallow, it compounds with depth.")
        return out + [self.finding("info", list(off), msg, scales=off, pytorch_default=default)]

    def _too_large(self, big: dict) -> Finding:
        worst = max(big.items(), key=lambda kv: kv[1]["ratio"])
        factor = worst[1]["ratio"] ** 2
        return self.finding(
            "warning", list(big),
            f"{len(big)} layer(s) are drawn at {T.SCALE_WARN:g}x or more of the variance-preserving scale; worst "
            f"{worst[0]}: std {worst[1]['std']:.3g} vs {worst[1]['expected']:.3g} for {worst[1]['scheme']}, so it "
            f"multiplies the variance it receives by about {factor:.3g} in one step. Norms after such layers "
            f"hide it from the depth trends, but the signal they add (a residual branch) swamps the rest and "
            f"their own gradients shrink by the same factor. Re-draw them (see the plan).",
            scales=big)
