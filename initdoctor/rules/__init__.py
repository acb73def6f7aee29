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


def architectural(findings: list[Finding]) -> list[Finding]:
    """Fired findings that no initialization can cure (gradient growth through normalized stacks)."""
    return [f for f in findings if f.fired and f.code == "ID204" and f.evidence.get("relative_to") == "output"]


from . import coverage, nonfinite, regime, scale, signal, symmetry  # noqa: E402,F401  (registration)
