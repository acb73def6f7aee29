"""ID9xx: what the tool could not see or had to assume, and what initialization cannot cure."""

from __future__ import annotations

import fnmatch

from .. import thresholds as T
from .. import vocab
from . import Context, Finding, Rule, architectural, compact, register


@register
class LayerNotRun(Rule):
    code = "ID901"

    def judge(self, ctx: Context) -> list[Finding]:
        stats = ctx.stats
        ran = {lay.name for lay in stats.ran()}
        # a layer whose tied twin ran was measured through it (T5's `shared` via `embed_tokens`)
        idle = [lay.name for lay in stats.layers if lay.index < 0 and not ran.intersection(lay.tied)]
        if not idle:
            return []
        text = (f"{len(idle)} layer(s) with weights never ran in the probe pass (first: {idle[0]}); only their "
                f"weights were examined.")
        unknown = [lay.name for lay in stats.layers if lay.name in idle and lay.transposed is None]
        if unknown:
            text += (f" {len(unknown)} of them ({unknown[0]}{', ...' if len(unknown) > 1 else ''}) are not torch "
                     f"layers: their weight may be used as F.linear(x, W) or as x @ W, which only a run shows, so "
                     f"their fans are unknown and the plan leaves them as they are.")
        return [self.finding("info", idle, text, unknown_layout=unknown)]


@register
class ActivationUnknown(Rule):
    code = "ID902"

    def judge(self, ctx: Context) -> list[Finding]:
        found = [self.finding("info", [layer], f"the output of {layer} goes into `{op}`, which initdoctor does "
                              f"not know as a nonlinearity; the plan treats it as linear.", op=op)
                 for layer, op in ctx.stats.unknown_ops]
        return compact(found, lambda f: f.evidence["op"])


@register
class GradientBlocked(Rule):
    code = "ID903"

    def judge(self, ctx: Context) -> list[Finding]:
        stats = ctx.stats
        if not stats.backward:
            return []
        zeros = [lay for lay in stats.ran() if lay.weight_rms == 0]
        blocked = [lay for lay in stats.ran() if lay.grad_q == 0 and lay.weight_rms
                   and any(z.index > lay.index for z in zeros)]
        if not blocked:
            return []
        first = next(z for z in zeros if z.index > blocked[0].index)
        return [self.finding("info", [b.name for b in blocked],
                             f"{len(blocked)} layer(s) see exactly zero gradient because zero-initialized "
                             f"{first.name} lies downstream; it opens after one step.",
                             zero_layers=[z.name for z in zeros])]


@register
class NoBackward(Rule):
    code = "ID904"

    def judge(self, ctx: Context) -> list[Finding]:
        stats = ctx.stats
        if stats.backward:
            return []
        return [self.finding("info", [], "no backward pass was possible (no trainable parameter reaches the "
                             "output), so gradient rules did not run.")]


@register
class RnnInternals(Rule):
    code = "ID905"

    def judge(self, ctx: Context) -> list[Finding]:
        stats = ctx.stats
        rnns = [lay.name for lay in stats.ran() if lay.kind == vocab.RECURRENT]
        if not rnns:
            return []
        rebuilt = {a.module for a in stats.activations if a.gate}
        seen = [n for n in rnns if n in rebuilt]
        unseen = [n for n in rnns if n not in rebuilt]
        msg = "recurrent layers compute their gates inside one fused op."
        if seen:
            msg += (f" Rebuilt from the weights, the input and the output sequence, and checked for saturation: "
                    f"{', '.join(seen)}.")
        if unseen:
            msg += (f" Not rebuilt (plain RNN, several layers or projections; only outputs and weights are "
                    f"examined): {', '.join(unseen)}.")
        return [self.finding("info", rnns, msg, rebuilt=seen, not_rebuilt=unseen)]


@register
class DeepPlainStack(Rule):
    code = "ID907"

    def judge(self, ctx: Context) -> list[Finding]:
        stats = ctx.stats
        layers = [lay for lay in stats.ran() if lay.kind != vocab.EMBEDDING]
        if len(layers) < T.PLAIN_DEPTH or stats.residual_adds or any(lay.normalized for lay in layers):
            return []
        return [self.finding(
            "info", [layers[0].name, layers[-1].name],
            f"{len(layers)} weight layers in a plain stack, without normalization or skip connections: even "
            f"correctly initialized, such nets train slowly and only at small learning rates (He et al.; "
            f"examples/train_digits.py shows a 30-layer He-initialized ReLU MLP that fails at the learning "
            f"rate the shallower nets use). Add residual connections or BatchNorm/LayerNorm, or lower the "
            f"learning rate.",
            depth=len(layers))]


@register
class InitCannotCure(Rule):
    code = "ID906"
    concludes = True

    def judge(self, ctx: Context) -> list[Finding]:
        if ctx.outcome is None:
            return []
        arch = architectural(ctx.findings)
        remaining = [f for f in ctx.findings if f.fired and f.code.startswith(("ID2", "ID3"))]
        if not (arch or (remaining and not ctx.outcome.cured)):
            return []
        why = arch or remaining
        order = {lay.name: lay.index for lay in ctx.stats.layers}
        names = sorted({n for f in why for n in f.layers}, key=lambda n: order.get(n, 1 << 30))
        codes = sorted({f.code for f in why})
        return [self.finding("info", names[:8], "initialization alone cannot cure " + ", ".join(codes) + ": "
                             + _what_it_lacks(ctx, names, bool(arch)), remaining=codes)]


def _what_it_lacks(ctx: Context, names: list[str], arch: bool) -> str:
    """The architectural change to name, from what the network has and has not."""
    kept = [n for n in names if any(fnmatch.fnmatchcase(n, pat) for pat in ctx.outcome.kept)]
    if kept:
        return (f"{', '.join(kept[:4])} carry the problem but were excluded with --keep; the plan would "
                f"re-draw them.")
    layers = [lay for lay in ctx.stats.layers if lay.name in names]
    fixed = sorted({lay.parametrization for lay in layers if lay.parametrization})
    if fixed:
        return (f"the weights are computed by {', '.join(fixed)}, which sets their scale whatever they "
                f"start from; remove the parametrization, or rescale the layers' outputs (a gain after "
                f"each layer).")
    if arch:
        return ("the layers are followed by normalization, which undoes any init scale, yet gradients still "
                "grow through the plain stack; add residual connections (or use fewer layers).")
    ran = ctx.stats.ran()
    lacks = []
    if not any(lay.normalized for lay in ran) and not ctx.stats.norms:
        lacks.append("normalization (BatchNorm/LayerNorm)")
    if not ctx.stats.residual_adds:
        lacks.append("residual connections")
    if lacks:
        return "the network has no " + " and no ".join(lacks) + "; add them, or use another activation."
    return "it already has normalization and residual connections; try another activation or fewer layers."
