"""ID401: NaN or Inf anywhere; named where it first appears."""

from __future__ import annotations

from . import Context, Finding, Rule, register


@register
class NonFinite(Rule):
    code = "ID401"

    def judge(self, ctx: Context) -> list[Finding]:
        stats = ctx.stats
        weights = [lay for lay in stats.layers if lay.weight_nonfinite]
        outputs = [lay for lay in stats.ran() if lay.output_nonfinite]
        grads = [lay for lay in stats.ran() if lay.grad_nonfinite]
        params = stats.nonfinite_params
        if not (weights or outputs or grads or params or stats.output_nonfinite):
            return []
        if weights:
            first = weights[0]
            origin = f"{first.name}.weight holds {first.weight_nonfinite} non-finite value(s)"
        elif params:
            origin = f"{params[0][0]} holds {params[0][1]} non-finite value(s)"
        elif outputs:
            origin = f"the output of {outputs[0].name} is the first that is not finite"
        elif grads:
            origin = f"the gradient at {grads[-1].name} is the first that is not finite"
        else:
            origin = "the model's output is not finite"
        layers = sorted({lay.name for lay in weights + outputs + grads} | {p for p, _ in params},
                        key=lambda n: n)
        return [self.finding(
            "error", layers,
            f"NaN or Inf: {origin}; it spreads to {len(outputs)} layer output(s) and {len(grads)} gradient(s). "
            f"Training cannot start. Re-initialize or repair that tensor.",
            weights={lay.name: lay.weight_nonfinite for lay in weights},
            parameters=dict(params),
            outputs={lay.name: lay.output_nonfinite for lay in outputs},
            gradients={lay.name: lay.grad_nonfinite for lay in grads},
            model_output=stats.output_nonfinite)]
