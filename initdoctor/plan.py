"""Findings + statistics -> a prescription per weight layer (DESIGN section 4, "The fix")."""

from __future__ import annotations

import fnmatch
import math
from dataclasses import asdict, dataclass, replace

from . import vocab
from .depth import residual_scales, tanh_depth
from .rules import Finding, architectural
from .schemes import centre_bias, recommend, std_of
from .stats import LayerStats, ModelStats
from .vocab import FORCEABLE, SCHEMES

# Families that a new initialization can cure; ID4 is included because a re-drawn tensor is finite.
CURABLE = ("ID1", "ID2", "ID3", "ID4")
# Findings about single layers whose cure is re-drawing those layers alone.
LOCAL = ("ID501",)


@dataclass(frozen=True)
class Prescription:
    layer: str
    scheme: str
    gain: float
    mode: str
    bias: str  # "zeros", "centred" (-0.5 * rowsum(W), for layers fed by a sigmoid), "keep" or "none"
    reason: str
    apply: bool = True
    recommended: str = ""  # the textbook scheme, also when the entry says keep
    transposed: bool = False  # the weight is stored (in, out): drawn as (out, in), then transposed
    # the forward fans the scale is computed from, where torch.nn.init would read others off the tensor
    # (a strided or grouped convolution's fan-out: weights.conv_fan_out); None: torch's are right
    fans: tuple[float, float] | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["gain"] = round(self.gain, 4)
        return d


def _own_fans(lay: LayerStats) -> tuple[float, float] | None:
    """The layer's forward fans where torch.nn.init would read different ones off its weight."""
    if lay.kind != vocab.CONV or not (lay.fan_in and lay.fan_out) or len(lay.weight_shape) < 3:
        return None
    torch_out = lay.weight_shape[0] * math.prod(lay.weight_shape[2:])
    return None if lay.fan_out == torch_out else (lay.fan_in, lay.fan_out)


def _deliberate_zero(lay: LayerStats) -> bool:
    return any(s.zero and s.grad_rows_differ for s in lay.symmetry)


def _why_keep(lay: LayerStats, scheme: str, keep: tuple[str, ...], sick: bool, arch: bool, textbook: str,
              gain: float) -> str | None:
    """Why a layer is kept as it is ("" keeps the recommendation's own reason), or None to re-draw it."""
    if scheme == "keep":
        return ""
    if lay.frozen:
        return "frozen parameters are not trained"
    if any(fnmatch.fnmatchcase(lay.name, pat) for pat in keep):
        return "excluded by --keep"
    if lay.transposed is None:
        return ("never ran, and it is not a torch layer: whether its weight is stored (out, in) or (in, out) "
                "shows only in its operation, so it is not re-drawn")
    if _deliberate_zero(lay):
        return "deliberate zero-init: its gradient rows differ, so it moves on the first step"
    if not sick:
        return (f"no curable finding: kept (the textbook choice would be {textbook}, gain {gain:.3g})"
                if not arch else "initialization cannot cure this model; see ID906")
    return None


_GENERIC_KEEP = ("kept: only the layers drawn far too large", "no curable finding")


def _residual_scaled(stats: ModelStats, plan: list[Prescription]) -> list[Prescription]:
    """Residual projections that are re-drawn keep the model's own 1/sqrt(N) of their branch: drawn at
    that ratio of what their branch's input layers will have (as planned), so that the re-examination
    recognises the scale again (depth.residual_scales) instead of re-drawing it at the textbook scale."""
    scales = residual_scales(stats)
    if not scales:
        return plan
    by_entry = {p.layer: p for p in plan}
    out = []
    for entry in plan:
        rs = scales.get(entry.layer)
        if rs is not None and rs.deliberate and not entry.apply and entry.reason.startswith(_GENERIC_KEEP):
            entry = replace(entry, reason=(
                f"kept: drawn at {rs.ratio:.3g} of its branch's input ({', '.join(rs.mates)}), the model's "
                f"deliberate 1/sqrt(N) for N = {rs.residual_layers} residual layers"))
        if rs is None or not entry.apply or entry.scheme not in ("xavier_uniform", "xavier_normal",
                                                                  "kaiming_normal", "kaiming_uniform"):
            out.append(entry)
            continue
        lay = stats.layer(entry.layer)
        mates = [stats.layer(m) for m in rs.mates]
        planned = [_planned_std(m, by_entry.get(m.name)) for m in mates]
        if rs.per_fan:
            target = rs.ratio * sum(s * math.sqrt(m.fan_in) for s, m in zip(planned, mates)) / len(mates) \
                / math.sqrt(lay.fan_in)
        else:
            target = rs.ratio * sum(planned) / len(planned)
        unit = std_of(entry.scheme, 1.0, *(entry.fans or (lay.fan_in, lay.fan_out)))
        how = "the model's own" if rs.deliberate else "as the model's other residual projections are"
        out.append(replace(entry, gain=target / unit, reason=(
            f"residual projection: drawn at {rs.ratio:.3g} of its branch's input "
            f"{'(per sqrt(fan_in)) ' if rs.per_fan else ''}({', '.join(rs.mates)}), {how} 1/sqrt(N) for "
            f"N = {rs.residual_layers} residual layers; {entry.reason}")))
    return out


def _planned_std(lay: LayerStats, entry: Prescription | None) -> float:
    """The std a layer will have once the plan is applied."""
    if entry is None or not entry.apply or entry.scheme in ("keep", "zeros", "ones"):
        return lay.weight_std
    return std_of(entry.scheme, entry.gain, *(entry.fans or (lay.fan_in, lay.fan_out)))


def _redrawn_embedding(emb: LayerStats, std: float, entry: Prescription) -> Prescription:
    """An embedding a finding names as the cause, re-drawn N(0, std^2) (xavier_normal, its gain from the
    fans torch reads off the (rows, dim) table); a head tied to it is drawn with it, once."""
    rows, dim = emb.weight_shape[0], emb.weight_shape[-1]
    gain = std / std_of("xavier_normal", 1.0, dim, rows)
    why = (f"named by ID301 as the cause of a tied head's pinned softmax: drawn at std {emb.weight_std:.2g}, "
           f"re-drawn N(0, {std:.2g}^2) at the model's own scale (embeddings added into one stream keep their "
           f"shares)" if entry.layer == emb.name else f"tied to {emb.name}, which is re-drawn (it is drawn once)")
    return replace(entry, scheme="xavier_normal", gain=gain, mode="fan_in", apply=True, reason=why,
                   bias="keep" if entry.bias != "none" else "none", transposed=False, fans=None)


def make_plan(stats: ModelStats, findings: list[Finding], keep: tuple[str, ...] = (),
              scheme: str | None = None) -> list[Prescription]:
    """One prescription per weight layer (and per norm layer that is off its identity).

    Layers are prescribed for only when the model has a curable finding; a healthy model is kept as
    it is, since re-drawing correct weights gains nothing and loses deliberate schemes.
    """
    if scheme is not None and scheme not in FORCEABLE:
        raise ValueError(f"unknown scheme {scheme!r}; choose one of {', '.join(FORCEABLE)}")
    # embeddings a finding names as its cause (a tied head's pinned softmax, ID301): name -> std to draw
    redraw = {n: std for f in findings if f.fired for n, std in f.evidence.get("redraw", {}).items()}
    cure = [f for f in findings if f.fired and f.code.startswith(CURABLE) and not f.evidence.get("redraw")]
    arch = architectural(findings)
    sick = bool(cure) and len(arch) < len(cure)
    # weights drawn far too large, and nothing else: re-draw those layers alone, keep the rest
    local = {n for f in findings if f.fired and f.code in LOCAL for n in f.layers} | set(redraw)
    only = local if not sick and local else None
    depth = tanh_depth(stats)
    plan: list[Prescription] = []
    for lay in stats.layers:
        sch, gain, mode, reason = recommend(lay, depth)
        textbook = sch
        if scheme is not None and sch != "keep":
            sch = "orthogonal" if scheme == "lsuv" else scheme
            reason = f"forced {scheme} (textbook: {textbook}); gain {gain:.3g} from the nonlinearity"
        bias = ("centred" if centre_bias(lay) else "zeros") if lay.has_bias else "none"
        entry = Prescription(lay.name, sch, gain, mode, bias, reason, recommended=textbook,
                             transposed=bool(lay.transposed), fans=_own_fans(lay))
        why_keep = _why_keep(lay, sch, keep, sick or only is not None, bool(arch), textbook, gain)
        if why_keep is None and only is not None and lay.name not in only:
            why_keep = "kept: only the layers drawn far too large (ID501) are re-drawn"
        if why_keep is not None:
            entry = replace(entry, scheme="keep", apply=False, reason=why_keep or entry.reason,
                            bias="keep" if lay.has_bias else "none")
        cause = lay.name if lay.name in redraw else lay.tied_embedding if lay.tied_embedding in redraw else None
        if cause and not lay.frozen and not any(fnmatch.fnmatchcase(lay.name, pat) for pat in keep):
            entry = _redrawn_embedding(stats.layer(cause), redraw[cause], entry)
        plan.append(entry)
    if scheme is None:
        plan = _residual_scaled(stats, plan)
    if sick:
        for name in stats.norms:
            if name in stats.trained_norms and scheme is None:  # a checkpoint's gains: DESIGN keeps them
                plan.append(Prescription(name, "keep", 1.0, "-", "keep", "trained norm gains (they differ "
                                         "across channels) are kept; --scheme resets them", apply=False,
                                         recommended="ones"))
            else:
                plan.append(Prescription(name, "ones", 1.0, "-", "zeros", "norm layers start as the identity",
                                         apply=True, recommended="ones"))
    assert all(p.scheme in SCHEMES for p in plan)
    return plan
