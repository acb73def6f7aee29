"""Markdown: the findings table (also TensorBoard's text panel) and a per-layer table."""

from __future__ import annotations

from .text import num, pct


def _cell(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def findings_table(findings) -> str:
    if not findings:
        return "No findings."
    rows = ["| severity | code | name | layers | message |", "|---|---|---|---|---|"]
    for f in findings:
        layers = ", ".join(f.layers[:6]) + (f" (+{len(f.layers) - 6})" if len(f.layers) > 6 else "")
        rows.append(f"| {f.severity} | {f.code} | {f.name} | {_cell(layers)} | {_cell(f.message)} |")
    return "\n".join(rows)


def layers_table(diag) -> str:
    rows = ["| layer | type | fan in/out | activation | signal | q | grad G | saturated | dead |",
            "|---|---|---|---|---|---|---|---|---|"]
    for lay in diag.stats.ran():
        rows.append(f"| {_cell(lay.name)} | {lay.type} | {lay.fan_in}/{lay.fan_out} | {lay.activation} | "
                    f"{num(lay.signal)} | {num(lay.q)} | {num(lay.grad_q)} | {pct(lay.saturated)} | {pct(lay.dead)} |")
    return "\n".join(rows)


def plan_table(plan) -> str:
    rows = ["| layer | scheme | gain | mode | bias | reason |", "|---|---|---|---|---|---|"]
    for p in plan:
        rows.append(f"| {_cell(p.layer)} | {p.scheme} | {p.gain:.3g} | {p.mode} | {p.bias} | {_cell(p.reason)} |")
    return "\n".join(rows)


def render(diag) -> str:
    inp = diag.input or {}
    parts = [f"# initdoctor: {diag.target}", "",
             f"Input `{inp.get('shape')}` {inp.get('dtype', '')}" + (" (inferred)" if inp.get("inferred") else ""), "",
             "## Findings", "", findings_table(diag.findings), "", "## Layers", "", layers_table(diag), "",
             "## Plan", "", plan_table(diag.plan), ""]
    if diag.after is not None:
        parts += ["## After the fix", "", findings_table(diag.after.findings), "", layers_table(diag.after), ""]
    return "\n".join(parts)
