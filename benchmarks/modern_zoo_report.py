"""What today's initdoctor says about the modern zoo (issue 13), with the numbers behind each verdict.

    PYTHONPATH=. .venv/bin/python benchmarks/modern_zoo_report.py [--quick] [--only NAME ...]

Per model: the findings (code, severity, layer count, message head) and
- every gradient trend: per layer G (mean dL/dy^2 at its output), q_out (its output's second moment),
  q_in (second moment of the stream entering the last normalization run before the layer) and the
  ratios of G, G*q_out (what `graph._trends` compares when `normalized`) and G*q_in (the invariant);
- every dying-kind activation (ReLU/SiLU/GELU) with dead units: the dead share, the unit count, the
  input-dependent share r of the layer feeding it, and the chance level P(Binom(n, 1/2) >= dead);
- Conv1D layers: the fans initdoctor reports against the weight's (in, out) layout;
- ID901 / ID902 counts.
Needs `transformers` for the Hugging Face models (skipped with a note where it does not import).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import initdoctor  # noqa: E402
from initdoctor.graph import trends  # noqa: E402
from tests.models import modern as Z  # noqa: E402

warnings.filterwarnings("ignore")


def is_norm(m: nn.Module) -> bool:
    """Norm-like module (for this measurement only): a leaf whose class name says norm."""
    return "norm" in type(m).__name__.lower() and not list(m.children())


def stream_q(model: nn.Module, x) -> dict[str, float]:
    """Weight layer name -> second moment of the input of the last norm module run before it."""
    last = {"q": float("nan")}
    out: dict[str, float] = {}
    handles = []
    for name, m in model.named_modules():
        if is_norm(m):
            def pre(mod, args, name=name):
                last["q"] = float(args[0].detach().float().pow(2).mean())
            handles.append(m.register_forward_pre_hook(pre))
        elif not list(m.children()):
            def pre2(mod, args, name=name):
                out.setdefault(name, last["q"])
            handles.append(m.register_forward_pre_hook(pre2))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(*(x if isinstance(x, tuple) else (x,)))
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return out


def stream_qeff(model: nn.Module, x, seed: int = 0) -> dict[str, tuple[float, float]]:
    """Weight layer -> (q_eff of the last norm input before it, q_eff of the first norm input after it).

    q_eff = sum_rows |dL/dx_row|^2 q_row / sum_rows |dL/dx_row|^2 at a norm's input x (the stream): the
    stream's second moment weighted by where the gradient flows. A norm divides each row's gradient by
    that row's RMS, so G * q_eff is the invariant; the weighting matters when rows differ (a ViT class
    token whose stream starts 30x smaller than the patches' and receives all of the head's gradient).
    """
    from initdoctor.probe import cotangent_loss

    calls: list[list[float | None]] = []  # per norm call: [q_eff, plain q]
    before: dict[str, int] = {}
    after: dict[str, int] = {}
    waiting: list[str] = []
    handles = []
    for name, m in model.named_modules():
        if is_norm(m):
            def pre(mod, args):
                t = args[0]
                q = t.detach().float().pow(2).mean(-1).reshape(-1)
                i = len(calls)
                calls.append([None, float(q.mean())])
                for n in waiting:
                    after.setdefault(n, i)
                waiting.clear()
                if t.requires_grad:
                    def gh(g, i=i, q=q):
                        w = g.detach().float().pow(2).mean(-1).reshape(-1)
                        calls[i][0] = float((w * q).sum() / w.sum().clamp_min(1e-300))
                    t.register_hook(gh)
            handles.append(m.register_forward_pre_hook(pre))
        elif not list(m.children()) and isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() >= 2:
            def pre2(mod, args, name=name):
                if calls and name not in before:
                    before[name] = len(calls) - 1
                    waiting.append(name)
            handles.append(m.register_forward_pre_hook(pre2))
    was = model.training
    model.eval()
    try:
        out = model(*(x if isinstance(x, tuple) else (x,)))
        cotangent_loss(out, seed).backward()
        model.zero_grad(set_to_none=True)
    finally:
        model.train(was)
        for h in handles:
            h.remove()

    def qe(i):
        return float("nan") if i is None or calls[i][0] is None else calls[i][0]
    return {n: (qe(before.get(n)), qe(after.get(n))) for n in before}


def binom_tail(n: int, k: int) -> float:
    """P(Binom(n, 1/2) >= k): the chance that k of n units are off when each is a coin flip."""
    return sum(math.comb(n, i) for i in range(k, n + 1)) / 2 ** n


def per_unit_preacts(model: nn.Module, x, names: list[str]) -> dict[str, torch.Tensor]:
    """Per-unit (mean, std, max) of the given layers' outputs, over every sample and position."""
    mods = dict(model.named_modules())
    res: dict[str, torch.Tensor] = {}
    handles = []
    for n in names:
        if n not in mods:
            continue

        def hook(mod, args, y, n=n):
            y = y.detach()
            ud = 1 if y.dim() == 4 else -1
            v = y.movedim(ud, -1).reshape(-1, y.shape[ud])
            res[n] = torch.stack([v.mean(0), v.std(0), v.amax(0)])
        handles.append(mods[n].register_forward_hook(hook))
    was = model.training
    model.train()  # BatchNorm in training mode, as the probe runs it
    try:
        with torch.no_grad():
            model(*(x if isinstance(x, tuple) else (x,)))
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    # the probe restores running stats; do the same here
    return res


def report(name: str, model: nn.Module, x, seed: int = 0, detail: bool = True) -> dict:
    bufs = [(b, b.clone()) for b in model.buffers()]
    t = time.time()
    d = initdoctor.check(model, x, seed=seed)
    dt = time.time() - t
    for b, v in bufs:
        b.copy_(v)
    s = d.stats
    print(f"\n=== {name} (seed {seed}) check {dt:.2f}s, {len(s.layers)} weight layers, "
          f"{sum(1 for lay in s.layers if lay.index >= 0)} ran")
    counts: dict[str, int] = {}
    for f in d.findings:
        counts[f.code] = counts.get(f.code, 0) + 1
    for f in d.findings:
        if f.code in ("ID902", "ID501") and counts[f.code] > 1 and f is not next(g for g in d.findings if g.code == f.code):
            continue
        print(f"  {f.code} {f.severity:7s} layers={len(f.layers):3d} x{counts[f.code]} | {f.message[:120]}")
    if "ID902" in counts:
        ops = sorted({f.evidence.get("op") for f in d.findings if f.code == "ID902"})
        print(f"  ID902 count {counts['ID902']} ops {ops}")
    if "ID901" in counts:
        f = next(f for f in d.findings if f.code == "ID901")
        print(f"  ID901 layers never run: {len(f.layers)} e.g. {f.layers[:3]}")
    if not detail:
        return counts
    sq = stream_q(model, x)
    qeff = stream_qeff(model, x, seed) if any(is_norm(m) for m in model.modules()) else {}
    for tr in trends(s):
        if tr.metric != "gradient":
            continue
        g = tr.values if not tr.normalized else [s.layer(n).grad_q for n in tr.layers]
        lays = [s.layer(n) for n in tr.layers]
        gq_out = [lay.grad_q * lay.q for lay in lays]
        qin = [sq.get(n, float("nan")) for n in tr.layers]
        gq_in = [gi * qi for gi, qi in zip(g, qin)]
        r = (g[0] / g[-1], gq_out[0] / gq_out[-1], gq_in[0] / gq_in[-1] if all(map(math.isfinite, qin)) else float("nan"))
        nan2 = (float("nan"), float("nan"))
        own = [gi * qeff.get(n, nan2)[0] for n, gi in zip(tr.layers, g)]
        nxt = [gi * qeff.get(n, nan2)[1] for n, gi in zip(tr.layers, g)]
        rr, rx = own[0] / own[-1], nxt[0] / nxt[-1]
        flag = " <-- fires" if tr.ratio > 100 or tr.ratio < 1e-2 else ""
        print(f"  grad trend {Z_short(tr.layers[0])} x{len(lays)} normalized={tr.normalized}: "
              f"ratio G {r[0]:.3g}  G*q_out {r[1]:.3g}  G*q_in {r[2]:.3g}  G*qeff {rr:.3g}  G*qeff(next norm) {rx:.3g}{flag}")
        if flag or detail == "full":
            for n, gi, qo, qi, gq in zip(tr.layers, g, [lay.q for lay in lays], qin, own):
                print(f"      {Z_short(n):40s} G {gi:.3e}  q_out {qo:.3e}  q_in {qi:.3e}  G*q_in {gi * qi:.3e}"
                      f"  G*qeff {gq:.3e}")
    dying = [a for a in s.activations if a.dead]
    if dying:
        names = [a.layer for a in dying if a.layer]
        pu = per_unit_preacts(model, x, names)
        for a in dying:
            lay = s.layer(a.layer) if a.layer else None
            n = a.units
            k = round(a.dead * n)
            extra = ""
            if a.layer in pu:
                mean, std, mx = pu[a.layer]
                ru = std.square() / (std.square() + mean.square()).clamp_min(1e-30)
                extra = (f" per-unit r median {float(ru.median()):.3g} max {float(ru.max()):.3g};"
                         f" |mean|/std median {float((mean.abs() / std.clamp_min(1e-30)).median()):.3g}")
            print(f"  dead {a.kind:5s} {Z_short(a.name):38s} {a.dead:.2f} of {n:4d} units, r(layer)="
                  f"{(lay.r if lay and lay.r is not None else float('nan')):.3g}, samples/unit "
                  f"{lay.samples if lay else 0}, P(Binom(n,.5)>={k})={binom_tail(n, k):.3g}{extra}")
    for lay in s.layers:
        if lay.type == "Conv1D":
            ws = lay.weight_shape
            print(f"  Conv1D {Z_short(lay.name):38s} weight {ws} fans reported in/out {lay.fan_in}/{lay.fan_out}; "
                  f"true {ws[0]}/{ws[1]}; fan_in*Var(W) reported {lay.fan_in * lay.weight_std ** 2:.3g} "
                  f"true {ws[0] * lay.weight_std ** 2:.3g}")
            break
    return counts


def Z_short(n: str, k: int = 38) -> str:
    return n if len(n) <= k else "…" + n[-(k - 1):]


def embed_rescaled(builder, **kw):
    """The model with its embeddings scaled so the stream entering the first norm has RMS 1."""
    model, x = builder(**kw)
    q0 = next(v for v in stream_q(model, x).values() if math.isfinite(v))
    emb = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    with torch.no_grad():
        for e in emb:
            e.weight.mul_(q0 ** -0.5)
    return model, x


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--quick", action="store_true", help="skip the width sweeps and the seed sweeps")
    a = ap.parse_args()
    try:
        import transformers  # noqa: F401
        hf = True
    except Exception as e:  # pragma: no cover
        print(f"transformers does not import ({e}): Hugging Face models skipped")
        hf = False
    zoo = {**Z.LIBRARY, **Z.PROBLEMS}
    for name, fn in zoo.items():
        if a.only and name not in a.only:
            continue
        if name in Z.HF and not hf:
            continue
        model, x = fn()
        report(name, model, x)
    if a.quick:
        return
    sweep = {
        "gpt2 12x768": (Z.gpt2, dict(n_layer=12, n_embd=768, n_head=12)),
        "gpt2 12x512": (Z.gpt2, dict(n_layer=12, n_embd=512, n_head=8)),
        "gpt2 12x256": (Z.gpt2, dict(n_layer=12, n_embd=256, n_head=4)),
        "llama 8x512": (Z.llama, dict(n_layer=8, hidden=512, heads=8)),
        "vit-s 12x384": (Z.vit, dict(dim=384, depth=12, heads=6)),
        "bert 12x768": (Z.bert, dict(n_layer=12, hidden=768, heads=12)),
        "t5 6x512": (Z.t5, dict(n_layer=6, d_model=512, heads=8)),
    }
    for label, (fn, kw) in sweep.items():
        if a.only and label.split()[0].split("-")[0] not in a.only:
            continue
        if fn in (Z.gpt2, Z.llama, Z.bert, Z.t5) and not hf:
            continue
        model, x = fn(**kw)
        report(label, model, x)
        if fn in (Z.gpt2, Z.llama):
            model, x = embed_rescaled(fn, **kw)
            report(label + " embeddings rescaled to stream RMS 1", model, x, detail=True)
    for name in ("efficientnet", "regnet_y"):
        if a.only and name not in a.only:
            continue
        for seed in range(4):
            model, x = zoo[name](seed=seed)
            report(f"{name} init seed", model, x, seed=seed)


if __name__ == "__main__":
    main()
