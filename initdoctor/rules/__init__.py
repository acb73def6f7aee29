"""Rules: one class per code, each a pure function of the statistics; rules never print.

A rule judges a `Context`: the statistics, the depth trends (computed once per examination and
shared), and the cure as far as advice needs to quote it (`Cure`, implemented by
`schemes.Prescriber`), so no rule imports the planner or the probe.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Protocol

from ..codes import CODES, SEVERITY_RANK, matches
from ..depth import Trend
from ..stats import LayerStats, ModelStats


@dataclass
class Finding:
    code: str
    severity: str
    layers: list[str]
    message: str
    evidence: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return CODES[self.code].name

    @property
    def fired(self) -> bool:
        return self.severity in ("warning", "error")

    def to_dict(self) -> dict:
        d = asdict(self)
        return {"code": d["code"], "name": self.name, "severity": d["severity"], "layers": d["layers"],
                "message": d["message"], "evidence": d["evidence"]}


class Cure(Protocol):
    """What the rules may ask of the prescription, to quote it in their advice."""

    def recommend(self, lay: LayerStats) -> tuple[str, float, str, str]: ...  # scheme, gain, mode, reason
    def prescribed_std(self, lay: LayerStats) -> tuple[str, float] | None: ...
    def at_prescribed_scale(self, lay: LayerStats) -> bool: ...
    def centre_bias(self, lay: LayerStats) -> bool: ...
    def looks_default(self, lay: LayerStats) -> bool: ...
    def slope_factor(self, activation: str | None, param: float | None = None) -> float: ...


@dataclass(frozen=True)
class FixOutcome:
    """What `fix` achieved, for the rules that conclude on it (ID906)."""

    cured: bool
    kept: tuple[str, ...] = ()  # layers the plan was told to leave alone (--keep)


@dataclass(frozen=True)
class Context:
    stats: ModelStats
    trends: list[Trend]
    cure: Cure
    findings: list[Finding] = field(default_factory=list)  # the examination's, for concluding rules
    outcome: FixOutcome | None = None  # set by `fix` only


class Rule:
    code: str = ""
    concludes = False  # judges the other rules' findings after a fix, rather than the statistics

    def judge(self, ctx: Context) -> list[Finding]:  # pragma: no cover - interface
        raise NotImplementedError

    def finding(self, severity: str, layers: list[str], message: str, **evidence) -> Finding:
        return Finding(self.code, severity, list(layers), message, evidence)


RULES: dict[str, type[Rule]] = {}


def register(cls: type[Rule]) -> type[Rule]:
    if cls.code not in CODES:
        raise ValueError(f"rule {cls.__name__} has unknown code {cls.code!r}")
    RULES[cls.code] = cls
    return cls


def _wanted(code: str, select: list[str] | None, ignore: list[str] | None) -> bool:
    return (not select or matches(code, select)) and not (ignore and matches(code, ignore))


def run_rules(stats: ModelStats, trends: list[Trend], cure: Cure, select: list[str] | None = None,
              ignore: list[str] | None = None) -> list[Finding]:
    """All findings of one examination, errors first; `select`/`ignore` match code prefixes."""
    ctx = Context(stats, trends, cure)
    out: list[Finding] = []
    for code, cls in sorted(RULES.items()):
        if not cls.concludes and _wanted(code, select, ignore):
            out.extend(cls().judge(ctx))
    out.sort(key=lambda f: (-SEVERITY_RANK[f.severity], f.code))
    return out


def conclude(ctx: Context, select: list[str] | None = None, ignore: list[str] | None = None) -> list[Finding]:
    """The examination's findings followed by what the concluding rules say of the fix's outcome."""
    out = list(ctx.findings)
    for code, cls in sorted(RULES.items()):
        if cls.concludes and _wanted(code, select, ignore):
            out.extend(cls().judge(ctx))
    return out


def init_call(scheme: str, gain_: float, lay, cure: Cure) -> str:
    """The torch.nn.init call that draws what the plan prescribes."""
    act, param = lay.activation, lay.activation_param
    if scheme.startswith("kaiming"):
        if act == "leaky_relu":
            return f"{scheme}_(w, a={param:g}, nonlinearity='leaky_relu')"
        return f"{scheme}_(w, nonlinearity='relu')"
    if scheme == "lecun_normal":
        return "kaiming_normal_(w, nonlinearity='linear')"
    call = f"{scheme}_(w, gain={gain_:.3g})"
    return call + (" with bias = -0.5 * rowsum(W)" if cure.centre_bias(lay) else "")


MAX_NAMED = 4  # layers a merged finding names in its message (all are in its `layers`)


def compact(findings: list[Finding], key) -> list[Finding]:
    """One finding per `key(finding)` for rules that speak of one tensor at a time, so that a big model
    gets one line for 32 alike layers: the first one's message, then the others named briefly."""
    groups: dict = {}
    for f in findings:
        groups.setdefault(key(f), []).append(f)
    out = []
    for same in groups.values():
        first = same[0]
        if len(same) == 1:
            out.append(first)
            continue
        others = [n for f in same[1:] for n in f.layers]
        named = ", ".join(others[:MAX_NAMED]) + (f" and {len(others) - MAX_NAMED} more" if len(others) > MAX_NAMED else "")
        out.append(Finding(first.code, first.severity, first.layers + others,
                           f"{first.message} The same holds for {len(others)} more: {named}.",
                           {**first.evidence, "also": {n: f.evidence for f in same[1:] for n in f.layers}}))
    return out


def architectural(findings: list[Finding]) -> list[Finding]:
    """Fired findings that no initialization can cure (gradient growth through normalized stacks)."""
    return [f for f in findings if f.fired and f.code == "ID204" and f.evidence.get("relative_to") == "output"]


from . import coverage, nonfinite, regime, scale, signal, symmetry  # noqa: E402,F401  (registration)
