"""The terminal report: a per-layer table, the findings with what to do, the plan. Reads, never computes."""

from __future__ import annotations

import math
import os
import re
import sys
import textwrap
from typing import Any

WIDTH = 100
MAX_ROWS = 60
_COLORS = {"error": "31;1", "warning": "33;1", "info": "36", "ok": "32;1", "dim": "2", "bold": "1"}


def use_color(stream: Any = None) -> bool:
    stream = stream or sys.stdout
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    return bool(getattr(stream, "isatty", lambda: False)())


def _paint(text: str, style: str, color: bool) -> str:
    return f"\033[{_COLORS[style]}m{text}\033[0m" if color else text


def num(x: float | None) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if x == 0:
        return "0"
    if 1e-2 <= abs(x) < 1e4:
        return f"{x:.3g}"
    return f"{x:.1e}"


def pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def _short(name: str, width: int) -> str:
    name = name or "(root)"
    return name if len(name) <= width else "…" + name[-(width - 1):]


def short_names(names: list[str], width: int) -> dict[str, str]:
    """Each name shortened from the left, a dotted component at a time, only as far as it needs to
    fit `width` and stay told apart from the others (`model.transformer.h.11.attn.c_attn` ->
    `…h.11.attn.c_attn`, never `…11.attn.c_attn` when `…1.attn.c_attn` would then be ambiguous)."""
    out: dict[str, str] = {}
    for name in names:
        parts = (name or "(root)").split(".")
        short = ".".join(parts)
        for k in range(1, len(parts)):
            if len(short) <= width:
                break
            tail = ".".join(parts[k:])
            clash = any(o != name and (o == tail or o.endswith("." + tail)) for o in names)
            if clash:
                break
            short = "…" + tail
        out[name] = short
    return out


NAME_MIN, NAME_MAX = 22, 40  # the layer column: as wide as the shortened names, within these


def layer_table(diag, color: bool) -> list[str]:
    names = short_names([lay.name for lay in diag.stats.layers], NAME_MAX)
    nw = max([NAME_MIN] + [len(n) for n in names.values()])
    head = (f"{'layer':<{nw}} {'type':<10} {'fan in/out':>11} {'act':<9} {'signal':>8} {'q':>8} {'grad G':>8} "
            f"{'sat':>5} {'dead':>5}")
    lines = [_paint(head, "bold", color)]
    rows = sorted(diag.stats.layers, key=lambda lay: (lay.index < 0, lay.index))
    hidden = 0
    if len(rows) > MAX_ROWS:  # the terminal shows both ends; JSON has every layer
        hidden = len(rows) - MAX_ROWS
        rows = rows[: MAX_ROWS // 2] + [None] + rows[-MAX_ROWS // 2:]
    for lay in rows:
        if lay is None:
            lines.append(_paint(f"… {hidden} more layer(s); --format json lists them all", "dim", color))
            continue
        fans = f"{lay.fan_in if lay.fan_in is not None else '-'}/{lay.fan_out if lay.fan_out is not None else '-'}"
        act = (lay.activation or "-")[:9]
        row = (f"{_short(names[lay.name], nw):<{nw}} {lay.type[:10]:<10} {fans:>11} {act:<9} {num(lay.signal):>8} "
               f"{num(lay.q):>8} {num(lay.grad_q):>8} {pct(lay.saturated):>5} {pct(lay.dead):>5}")
        lines.append(row if lay.index >= 0 else _paint(row + "  (never ran)", "dim", color))
    return lines


def findings_block(findings, color: bool, title: str = "Findings") -> list[str]:
    if not findings:
        return [_paint(f"{title}: none — nothing at any severity.", "ok", color)]
    counts = {s: sum(1 for f in findings if f.severity == s) for s in ("error", "warning", "info")}
    lines = [_paint(f"{title}: {counts['error']} error(s), {counts['warning']} warning(s), {counts['info']} info",
                    "bold", color)]
    for f in findings:
        tag = _paint(f"{f.severity.upper():<7}", f.severity, color)
        where = ", ".join(f.layers[:4]) + (f" (+{len(f.layers) - 4})" if len(f.layers) > 4 else "")
        lines.append(f"{tag} {f.code} {f.name}" + (f" [{where}]" if where else ""))
        lines += textwrap.wrap(f.message, WIDTH - 2, initial_indent="  ", subsequent_indent="  ")
    return lines


def _runs(plan):
    """Consecutive entries with the same prescription, as (first, last, count, entry)."""
    runs: list[list] = []
    for p in plan:
        key = (p.scheme, round(p.gain, 4), p.mode, p.bias, p.reason, p.apply)
        if runs and runs[-1][0] == key:
            runs[-1][2].append(p)
        else:
            runs.append([key, p, [p]])
    return [(r[2][0].layer, r[2][-1].layer, len(r[2]), r[1]) for r in runs]


def plan_block(plan, color: bool) -> list[str]:
    active = [p for p in plan if p.apply]
    if not active:
        # one line per kind of reason (numbers and quoted layers aside), naming whom it is about
        kinds: dict[str, list] = {}
        for p in plan:
            kinds.setdefault(re.sub(r"\([^)]*\)|\d+(\.\d+)?", "#", p.reason), []).append(p)
        names = short_names([p.layer for p in plan], 30)
        lines = [_paint("Plan: keep the current initialization.", "ok", color)]
        for ps in list(kinds.values())[:4]:
            who = _short(names[ps[0].layer], 30) + (f" and {len(ps) - 1} more" if len(ps) > 1 else "")
            lines += textwrap.wrap(f"{who}: {ps[0].reason}", WIDTH - 2, initial_indent="  ",
                                   subsequent_indent="      ")
        if len(kinds) > 4:
            lines.append(f"  ({len(kinds) - 4} other reason(s); --format markdown lists every layer)")
        return lines
    lines = [_paint(f"Plan: re-initialize {len(active)} of {len(plan)} layer(s)", "bold", color)]
    one, two = (short_names([p.layer for p in plan], w) for w in (30, 12))
    for first, last, n, p in _runs(plan):
        where = _short(one[first], 30) if n == 1 else f"{_short(two[first], 12)} … {_short(two[last], 12)} ({n})"
        what = f"{p.scheme}(gain={p.gain:.3g}, {p.mode})" if p.apply else "keep"
        bias = f", bias {p.bias}" if p.apply and p.bias not in ("none", "keep") else ""
        lines.append(f"  {where:<32} {what + bias}")
        lines += textwrap.wrap(p.reason, WIDTH - 6, initial_indent="      ", subsequent_indent="      ")
    return lines


def before_after(before, after, color: bool) -> list[str]:
    lines = [_paint("Before and after the fix", "bold", color),
             f"{'layer':<22} {'signal before':>14} {'after':>9} {'grad before':>12} {'after':>9}"]
    post = {lay.name: lay for lay in after.stats.layers}
    for lay in before.stats.ran():
        a = post.get(lay.name)
        lines.append(f"{_short(lay.name, 22):<22} {num(lay.signal):>14} {num(a.signal if a else None):>9} "
                     f"{num(lay.grad_q):>12} {num(a.grad_q if a else None):>9}")
    b_codes, a_codes = before.codes(), after.codes()
    resolved = sorted(b_codes - a_codes)
    remaining = sorted(a_codes)
    lines.append(_paint(f"resolved: {', '.join(resolved) or 'none'}", "ok" if resolved else "dim", color))
    lines.append(_paint(f"remaining: {', '.join(remaining) or 'none'}", "warning" if remaining else "ok", color))
    for note in after.fix_log:
        lines.append(f"  note: {note}")
    return lines


def render(diag, color: bool = False) -> str:
    inp = diag.input or {}
    shape = "x".join(map(str, inp.get("shape", []))) or "?"
    lines = [_paint(f"initdoctor — {diag.target}", "bold", color),
             f"input {shape} {inp.get('dtype', '')}" + (" (inferred from the first layer)" if inp.get("inferred") else ""),
             ""]
    lines += layer_table(diag, color)
    lines.append("")
    lines += findings_block(diag.findings, color)
    if diag.sources:
        lines += ["", _paint("Where the statistics come from", "bold", color)]
        for src in diag.sources:
            lines += textwrap.wrap(src, WIDTH - 2, initial_indent="- ", subsequent_indent="  ")
    lines.append("")
    lines += plan_block(diag.plan, color)
    if diag.after is not None:
        lines.append("")
        lines += before_after(diag, diag.after, color)
        lines.append("")
        lines += findings_block(diag.after.findings, color, title="After the fix")
    return "\n".join(lines) + "\n"
