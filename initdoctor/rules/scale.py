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
        worst = max(off.items(), key=lambda kv: abs(math.log(kv[1]["ratio"])))
        msg = (f"{len(off)} layer(s) are drawn at a scale far from variance-preserving; worst {worst[0]}: std "
               f"{worst[1]['std']:.3g} vs {worst[1]['expected']:.3g} for {worst[1]['scheme']} "
               f"({worst[1]['ratio']:.2g}x).")
        if default:
            msg += (f" {len(default)} of them use PyTorch's default U(+-1/sqrt(fan_in)), which is a sixth of "
                    f"He's variance: fine when shallow, it compounds with depth.")
        return [self.finding("info", list(off), msg, scales=off, pytorch_default=default)]
