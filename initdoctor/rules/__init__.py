"""Rules: one class per code, each a pure function of `ModelStats`; rules never print."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..codes import CODES, SEVERITY_RANK, matches
from ..stats import ModelStats


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


class Rule:
    code: str = ""

    def check(self, stats: ModelStats) -> list[Finding]:  # pragma: no cover - interface
        raise NotImplementedError

    def finding(self, severity: str, layers: list[str], message: str, **evidence) -> Finding:
        return Finding(self.code, severity, list(layers), message, evidence)


RULES: dict[str, type[Rule]] = {}


def register(cls: type[Rule]) -> type[Rule]:
    if cls.code not in CODES:
        raise ValueError(f"rule {cls.__name__} has unknown code {cls.code!r}")
    RULES[cls.code] = cls
    return cls


def run_rules(stats: ModelStats, select: list[str] | None = None, ignore: list[str] | None = None) -> list[Finding]:
    """All findings for `stats`, errors first; `select`/`ignore` match code prefixes."""
    out: list[Finding] = []
    stats.__dict__["_trends"] = None  # the rules share one computation of the depth trends
    try:
        for code, cls in sorted(RULES.items()):
            if select and not matches(code, select):
                continue
            if ignore and matches(code, ignore):
                continue
            out.extend(cls().check(stats))
    finally:
        stats.__dict__.pop("_trends", None)
    out.sort(key=lambda f: (-SEVERITY_RANK[f.severity], f.code))
    return out


from . import nonfinite, notes, regime, scale, signal, symmetry  # noqa: E402,F401  (registration)
