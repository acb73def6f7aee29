"""Findings + statistics -> a prescription per weight layer (DESIGN section 4, "The fix")."""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass

from .rules import Finding
from .rules.scale import tanh_depth
from .schemes import SCHEMES, centre_bias, recommend
from .stats import LayerStats, ModelStats

FORCEABLE = ("xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal", "orthogonal", "lsuv")
# Families that a new initialization can cure; ID4 is included because a re-drawn tensor is finite.
CURABLE = ("ID1", "ID2", "ID3", "ID4")


@dataclass
class Prescription:
    layer: str
    scheme: str
    gain: float
    mode: str
    bias: str  # "zeros", "centred" (-0.5 * rowsum(W), for layers fed by a sigmoid), "keep" or "none"
    reason: str
    apply: bool = True
    recommended: str = ""  # the textbook scheme, also when the entry says keep

    def to_dict(self) -> dict:
        d = asdict(self)
        d["gain"] = round(self.gain, 4)
        return d


def _deliberate_zero(lay: LayerStats) -> bool:
    return any(s.zero and s.grad_rows_differ for s in lay.symmetry)


def architectural(findings: list[Finding]) -> list[Finding]:
    """Fired findings that no initialization can cure (gradient growth through normalized stacks)."""
    return [f for f in findings if f.fired and f.code == "ID204" and f.evidence.get("normalized")]


def make_plan(stats: ModelStats, findings: list[Finding], keep: tuple[str, ...] = (),
              scheme: str | None = None) -> list[Prescription]:
    """One prescription per weight layer (and per norm layer that is off its identity).

    Layers are prescribed for only when the model has a curable finding; a healthy model is kept as
    it is, since re-drawing correct weights gains nothing and loses deliberate schemes.
    """
    if scheme is not None and scheme not in FORCEABLE:
        raise ValueError(f"unknown scheme {scheme!r}; choose one of {', '.join(FORCEABLE)}")
    cure = [f for f in findings if f.fired and f.code.startswith(CURABLE)]
    arch = architectural(findings)
    sick = bool(cure) and len(arch) < len(cure)
    depth = tanh_depth(stats)
    plan: list[Prescription] = []
    for lay in stats.layers:
        sch, gain, mode, reason = recommend(lay, depth)
        textbook = sch
        if scheme is not None and sch != "keep":
            sch = "orthogonal" if scheme == "lsuv" else scheme
            reason = f"forced {scheme} (textbook: {textbook}); gain {gain:.3g} from the nonlinearity"
        has_bias = lay.has_bias
        bias = ("centred" if centre_bias(lay) else "zeros") if has_bias else "none"
        entry = Prescription(lay.name, sch, gain, mode, bias, reason, recommended=textbook)
        if sch == "keep":
            entry.bias, entry.apply = ("keep" if has_bias else "none"), False
        elif lay.frozen:
            entry.scheme, entry.apply, entry.reason = "keep", False, "frozen parameters are not trained"
        elif any(fnmatch.fnmatchcase(lay.name, pat) for pat in keep):
            entry.scheme, entry.apply, entry.reason = "keep", False, "excluded by --keep"
        elif _deliberate_zero(lay):
            entry.scheme, entry.apply = "keep", False
            entry.reason = "deliberate zero-init: its gradient rows differ, so it moves on the first step"
        elif not sick:
            entry.scheme, entry.apply = "keep", False
            entry.reason = (f"no curable finding: kept (the textbook choice would be {textbook}, gain {gain:.3g})"
                            if not arch else "initialization cannot cure this model; see ID906")
        if not entry.apply and has_bias:
            entry.bias = "keep"
        plan.append(entry)
    if sick:
        for name in stats.norms:
            plan.append(Prescription(name, "ones", 1.0, "-", "zeros", "norm layers start as the identity",
                                     apply=True, recommended="ones"))
    assert all(p.scheme in SCHEMES for p in plan)
    return plan
