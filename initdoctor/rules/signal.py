"""ID201-ID204: the signal and the gradient along depth, within homologous groups."""

from __future__ import annotations

from .. import thresholds as T
from .. import vocab
from ..depth import Trend, severity_for_ratio
from . import Context, Finding, Rule, init_call, register


def _advice(ctx: Context, trend: Trend) -> tuple[str, dict]:
    """What the group's weights predict per layer, and the call that fixes them (as the plan does)."""
    # a member from inside the stack: the first layer is often fed by the input, not by its peers
    lay = ctx.stats.layer(trend.layers[len(trend.layers) // 2])
    ev: dict = {}
    if not (lay.fan_in and lay.weight_std):
        return "", ev
    act, param = lay.activation, lay.activation_param
    factor = lay.fan_in * lay.weight_std ** 2 * ctx.cure.slope_factor(act, param)
    ev["predicted_factor_per_layer"] = factor
    frac = f"about 1/{1 / factor:.0f}" if factor < 0.5 else f"{factor:.2g}x"
    passes = (f"keeps about 1/{1 / factor:.0f} of the variance it receives" if factor < 0.5 else
              f"multiplies the variance it receives by about {factor:.2g}")
    text = f" fan_in * Var(W) * slope^2 = {factor:.3g}: each {act or 'linear'} layer {passes} (small inputs)."
    if lay.parametrization:
        ev["parametrization"] = lay.parametrization
        return text + (f" The weights are computed by {lay.parametrization}, which sets their scale: no "
                       f"initialization can change it; remove the parametrization or rescale what it "
                       f"feeds."), ev
    if ctx.cure.at_prescribed_scale(lay):
        text += " The weights already have the prescribed scale"
        if lay.bias_mean is not None and abs(lay.bias_mean) > 0.1:
            text += f"; the biases (mean {lay.bias_mean:.2g}) shift every unit: start them at zero."
        else:
            text += ": the cause is elsewhere (biases, normalization, the architecture)."
        return text, ev
    if ctx.cure.looks_default(lay):
        text += (" These are PyTorch's default weights U(+-1/sqrt(fan_in)), which keep "
                 f"{'about a sixth' if act == 'relu' else frac} of the signal per layer.")
        ev["pytorch_default"] = True
    scheme, g, _, _ = ctx.cure.recommend(lay)
    text += f" Use {init_call(scheme, g, lay, ctx.cure)} (see the plan)."
    return text, ev


def _message(what: str, trend: Trend, extra: str) -> str:
    return (f"{what} from {trend.layers[0]} to {trend.layers[-1]} ({len(trend.layers)} comparable layers): "
            f"ratio {trend.ratio:.2g}, x{trend.per_layer:.3g} per layer, starting after {trend.start()}."
            + extra)


def _evidence(trend: Trend) -> dict:
    return {"metric": trend.metric, "ratio": trend.ratio, "per_layer": trend.per_layer,
            "first": trend.values[0], "last": trend.values[-1], "members": len(trend.layers),
            "normalized": trend.normalized, "relative_to": trend.relative_to,
            "raw_ratio": trend.raw_ratio, "stream_rms": list(trend.stream_rms) if trend.stream_rms else None}


class _TrendRule(Rule):
    metrics: tuple[str, ...] = ()
    low = True  # the trouble is a ratio below the band (vanishing) rather than above it

    def judge(self, ctx: Context) -> list[Finding]:
        stats = ctx.stats
        out = []
        for trend in ctx.trends:
            if trend.metric not in self.metrics:
                continue
            warn, err = ((T.COLLAPSE_WARN, T.COLLAPSE_ERROR) if trend.metric == "collapse"
                         else (T.TREND_WARN, T.TREND_ERROR))
            sev = severity_for_ratio(trend.ratio, warn, err, self.low)
            if sev is None:
                continue
            # behind normalization the init scale is undone: advice on it would mislead (ID204 says why)
            extra, ev = ("", {}) if trend.normalized else _advice(ctx, trend)
            if trend.metric == "gradient":
                # weight-gradient RMS relative to weight scale, for reference: it misleads on its own
                # (Glorot's cancellation keeps it flat in a deep Xavier ReLU net whose G falls 1e9)
                ratios = [stats.layer(n).weight_grad_ratio for n in (trend.layers[0], trend.layers[-1])]
                ev["weight_grad_ratio_first_last"] = ratios
            out.append(self.finding(sev, trend.layers, _message(self.describe(trend), trend, extra)
                                    + self.behind_norms(trend), **_evidence(trend), **ev))
        return out

    def describe(self, trend: Trend) -> str:
        raise NotImplementedError

    def behind_norms(self, trend: Trend) -> str:
        """What normalization means for this trend's cure (nothing to add by default)."""
        return ""


@register
class VanishingActivations(_TrendRule):
    code = "ID201"
    metrics = ("signal", "collapse")

    def describe(self, trend: Trend) -> str:
        if trend.metric == "collapse":
            return ("the input-dependent share of the signal collapses (the output stops depending on "
                    "the input while biases hold its scale)")
        return "the signal's second moment shrinks"


@register
class ExplodingActivations(_TrendRule):
    code = "ID202"
    metrics = ("signal",)
    low = False

    def describe(self, trend: Trend) -> str:
        return "the signal's second moment grows"


@register
class VanishingGradients(_TrendRule):
    code = "ID203"
    metrics = ("gradient",)

    def describe(self, trend: Trend) -> str:
        return "back-propagated gradients shrink toward the input" + _relative(trend)


@register
class ExplodingGradients(_TrendRule):
    code = "ID204"
    metrics = ("gradient",)
    low = False

    def describe(self, trend: Trend) -> str:
        return "back-propagated gradients grow toward the input" + _relative(trend)

    def behind_norms(self, trend: Trend) -> str:
        if trend.relative_to == "output":
            return (" The layers are followed by normalization, which undoes any init scale: "
                    "initialization cannot cure this; add residual connections (or fewer layers).")
        return ""

    def judge(self, ctx: Context) -> list[Finding]:
        return super().judge(ctx) + [self._stream_note(ctx, t) for t in ctx.trends if _only_raw_grows(t)]

    def _stream_note(self, ctx: Context, trend: Trend) -> Finding:
        """Raw gradients that grow only because the stream they flow back through grows: not a fault."""
        a, b = trend.stream_rms
        text = (f"back-propagated gradients grow x{trend.raw_ratio:.3g} toward the input from {trend.layers[0]} "
                f"to {trend.layers[-1]}, but only x{trend.ratio:.2g} relative to the residual stream they flow "
                f"back through: the stream's RMS grows from {a:.2g} to {b:.2g} along these layers, and the "
                f"norm in front of each rescales its gradient by 1/RMS. No weight is at fault.")
        emb = [lay for lay in ctx.stats.layers if lay.kind == vocab.EMBEDDING and lay.weight_std]
        if emb:
            std = max(lay.weight_std for lay in emb)
            text += (f" The stream starts at RMS {a:.2g} because it starts from the embeddings "
                     f"({', '.join(lay.name for lay in emb[:3])}, std {std:.2g}); drawing them so that the "
                     f"stream starts near RMS 1 levels the raw gradients. The plan keeps embeddings as they "
                     f"are: their scale is the model's choice.")
        else:
            text += (f" Whatever is added to the stream first (embeddings, a class or position token) sets "
                     f"its starting RMS of {a:.2g}.")
        return self.finding("info", trend.layers, text, **_evidence(trend))


def _relative(trend: Trend) -> str:
    return {"output": " (G*q, normalized)", "stream": " (G*q of the residual stream)"}.get(trend.relative_to, "")


def _only_raw_grows(trend: Trend) -> bool:
    return (trend.metric == "gradient" and trend.relative_to == "stream" and trend.raw_ratio is not None
            and severity_for_ratio(trend.ratio, T.TREND_WARN, T.TREND_ERROR, False) is None
            and severity_for_ratio(trend.raw_ratio, T.TREND_WARN, T.TREND_ERROR, False) is not None)
