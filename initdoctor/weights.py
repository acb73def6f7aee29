"""What a weight layer is: its main weight, kind, fans, unit rows and their symmetry.

Pure tensor -> numbers: nothing here registers a hook or writes a parameter. A layer's anatomy is
read from its module (what the weight does), and every tensor may be a DTensor shard (FSDP2).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from . import vocab
from .stats import SymmetryStats, as_float

NORM_MODULES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def parametrization(m: nn.Module) -> str | None:
    """The parametrizations that compute `m.weight` (e.g. "spectral_norm"), or None for a plain weight."""
    if _hooked_weight_norm(m):
        return "weight_norm"
    plist = getattr(getattr(m, "parametrizations", None), "weight", None)
    if plist is None:
        return None
    names = [type(p).__name__.strip("_") for p in plist]
    return "+".join(_SNAKE.get(n, n) for n in names)


_SNAKE = {"SpectralNorm": "spectral_norm", "WeightNorm": "weight_norm", "Orthogonal": "orthogonal"}


def _hooked_weight_norm(m: nn.Module) -> bool:
    """The older `torch.nn.utils.weight_norm`: parameters weight_g and weight_v, and `m.weight` a plain
    tensor that a forward pre-hook recomputes from them."""
    p = m._parameters
    return "weight" not in p and "weight_g" in p and "weight_v" in p and isinstance(
        m.__dict__.get("weight"), torch.Tensor)


def effective_weight(m: nn.Module) -> torch.Tensor:
    """The weight the layer computes with. A parametrized one is computed with its parametrizations
    in eval mode, so that reading it never advances state (spectral norm's power iteration)."""
    if parametrization(m) is None:
        return m._parameters["weight"]
    if _hooked_weight_norm(m):
        return m.__dict__["weight"].detach()
    plist = m.parametrizations.weight
    modes = [(p, p.training) for p in plist]
    try:
        for p, _ in modes:
            p.train(False)
        with torch.no_grad():
            return m.weight.detach()
    finally:
        for p, mode in modes:
            p.train(mode)


def is_weight_layer(m: nn.Module) -> bool:
    if isinstance(m, (nn.MultiheadAttention, nn.RNNBase)):
        return True
    if isinstance(m, NORM_MODULES):
        return False  # a LayerNorm over 2-D shapes has a 2-D weight, but no units to tell apart
    if parametrization(m) is not None:
        return effective_weight(m).dim() >= 2
    w = m._parameters.get("weight")
    return w is not None and w.dim() >= 2


def kind(m: nn.Module) -> str:
    """The layer's kind (vocab.KINDS): how its weight maps inputs to units."""
    if isinstance(m, nn.MultiheadAttention):
        return vocab.ATTENTION
    if isinstance(m, nn.RNNBase):
        return vocab.RECURRENT
    if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
        return vocab.EMBEDDING
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        return vocab.CONV_TRANSPOSE
    if isinstance(m, nn.modules.conv._ConvNd):
        return vocab.CONV
    return vocab.LINEAR


def main_weight(m: nn.Module) -> torch.Tensor | None:
    """The tensor whose statistics stand for the layer's weights (computed, if parametrized)."""
    if isinstance(m, nn.MultiheadAttention):
        return m.in_proj_weight if m.in_proj_weight is not None else m.q_proj_weight
    if isinstance(m, nn.RNNBase):
        return m._parameters.get("weight_ih_l0")
    if parametrization(m) is not None:
        return effective_weight(m)
    return m._parameters.get("weight")


def trained_weight(m: nn.Module) -> torch.Tensor | None:
    """The parameter that training updates for the main weight: itself, or a parametrization's
    `original` (several originals, as weight norm's g and v, have no one answer: None)."""
    if parametrization(m) is None:
        return main_weight(m)
    plist = getattr(getattr(m, "parametrizations", None), "weight", None)
    return getattr(plist, "original", None)


def unit_dim(m: nn.Module, out: torch.Tensor) -> int:
    if isinstance(m, (nn.modules.conv._ConvNd,)):
        spatial = len(m.kernel_size)
        return 1 if out.dim() == spatial + 2 else 0
    return -1


def fans(m: nn.Module, transposed: bool = False) -> tuple[int | None, int | None]:
    """Forward fan-in and fan-out; ConvTranspose's weight stores them the other way round, and so
    does a matrix the model multiplies from the right (`x @ W`, Hugging Face's Conv1D): `transposed`."""
    if isinstance(m, nn.MultiheadAttention):
        return m.embed_dim, m.embed_dim
    if isinstance(m, nn.RNNBase):
        return m.input_size, m.hidden_size
    if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
        return None, m.embedding_dim
    w = main_weight(m)
    fi, fo = nn.init._calculate_fan_in_and_fan_out(w)
    if isinstance(m, nn.modules.conv._ConvTransposeNd) or transposed:
        fi, fo = fo, fi
    elif isinstance(m, nn.modules.conv._ConvNd):
        fo = conv_fan_out(m)
    return fi, fo


def conv_fan_out(m: nn.modules.conv._ConvNd) -> int | float:
    """How many outputs each input element of a convolution reaches: (out / groups) * prod(k_i / s_i).

    torch counts out * prod(k_i), true at stride 1 with one group. At stride s each input position is
    covered by k/s kernel positions per dimension on average (exactly 1 where stride = kernel, as in a
    ViT's patchify conv: 768x3x16x16 at stride 16 reaches 768 outputs, not 196608), and it reaches only
    the out / groups channels of its own group. Borders aside, the variance of the gradient that reaches
    the input is this times Var(W) times that of the output's gradient (tests/test_weights.py measures it).
    """
    k = math.prod(m.kernel_size)
    s = math.prod(m.stride)
    fo = m.out_channels // m.groups * k
    return fo // s if fo % s == 0 else fo / s


def layout_known(m: nn.Module) -> bool:
    """Whether torch defines how the layer's weight maps inputs to units (its own weight layers), so
    that its fans can be read off the tensor without watching the layer run. Any other module's 2-D
    weight may be used as F.linear(x, W) (out, in) or as x @ W (in, out), as Hugging Face's Conv1D
    does: only the operation tells (lineage.Graph.transposed)."""
    return isinstance(m, (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd, nn.Embedding, nn.EmbeddingBag,
                          nn.RNNBase, nn.MultiheadAttention))


def sharded(t: Any) -> bool:
    """A DTensor (FSDP2's sharded parameters and gradients)."""
    return hasattr(t, "placements") and hasattr(t, "to_local")


def local(t: torch.Tensor) -> torch.Tensor:
    """The part of a tensor this process holds."""
    return t.to_local() if sharded(t) else t


def full(t: torch.Tensor | None) -> torch.Tensor | None:
    """The whole tensor (a collective for a sharded one: every rank must ask in the same order)."""
    return t.full_tensor() if t is not None and sharded(t) else t


@dataclasses.dataclass
class Rows:
    """One row per output unit: its weights, and its bias as one more column, kept apart (no copy)."""

    w: torch.Tensor  # (units, fan)
    b: torch.Tensor | None = None  # (units,)

    @staticmethod
    def of(w: torch.Tensor, b: torch.Tensor | None = None) -> Rows:
        w = w.detach()
        w = as_float(w)
        if b is not None:
            b = b.detach().to(w.dtype)
        return Rows(w, b)

    def __len__(self) -> int:
        return self.w.shape[0]

    def norms(self) -> torch.Tensor:
        n = torch.linalg.vector_norm(self.w, dim=1)
        return n if self.b is None else torch.sqrt(n.square() + self.b.square())

    def project(self, v: torch.Tensor) -> torch.Tensor:
        """Rows @ v for v of shape (fan + 1, k); the last row of v multiplies the bias. Computed as
        (v^T W^T)^T: a product with k = 3 columns on the right takes a slow path of the CPU's BLAS
        (4x here), one with 3 rows on the left does not."""
        vt = v[: self.w.shape[1]].t().contiguous()
        p = vt @ self.w.t() if self.b is None else torch.addmm(torch.outer(v[-1], self.b), vt, self.w.t())
        return p.t()

    def distance(self, idx: torch.Tensor, ref: int) -> torch.Tensor:
        d = torch.linalg.vector_norm(self.w[idx] - self.w[ref], dim=1)
        return d if self.b is None else torch.sqrt(d.square() + (self.b[idx] - self.b[ref]).square())


def weight_rows(m: nn.Module, grads: dict[int, torch.Tensor] | None,
                transposed: bool = False) -> Iterator[tuple[str, Rows, Rows | None]]:
    """(label, rows, gradient rows) per unit-matrix of a layer: one row per output unit.

    `transposed`: the weight is stored (in, out), so units are its columns.
    """

    def g(p: torch.Tensor | None) -> torch.Tensor | None:
        if p is None or grads is None:
            return None
        return full(grads.get(id(p)))

    def rows(w, b, gw, gb, transpose=False):
        w, b = full(w), full(b)
        w2 = (w.transpose(0, 1) if transpose else w).detach().reshape(w.shape[1] if transpose else w.shape[0], -1)
        gw2 = None if gw is None else (gw.transpose(0, 1) if transpose else gw).reshape(w2.shape)
        if b is None or b.numel() != w2.shape[0]:
            b = gb = None
        elif gw2 is not None and gb is None:
            gb = torch.zeros_like(b)
        return Rows.of(w2, b), None if gw2 is None else Rows.of(gw2, gb)

    if isinstance(m, nn.MultiheadAttention):
        e = m.embed_dim
        if m.in_proj_weight is not None:
            w, b = full(m.in_proj_weight), full(m.in_proj_bias)
            gw, gb = g(m.in_proj_weight), g(m.in_proj_bias)
            for i, part in enumerate("qkv"):
                sl = slice(i * e, (i + 1) * e)
                yield (f"in_proj_weight[{part}]",) + rows(
                    w[sl], None if b is None else b[sl],
                    None if gw is None else gw[sl], None if gb is None else gb[sl])
        else:
            for part in "qkv":
                w = getattr(m, f"{part}_proj_weight")
                yield (f"{part}_proj_weight",) + rows(w, None, g(w), None)
        return
    if isinstance(m, nn.RNNBase):
        for pname, p in m._parameters.items():
            if p is None or not pname.startswith("weight_") or p.dim() < 2:
                continue
            bias = m._parameters.get(pname.replace("weight_", "bias_"))
            yield (pname,) + rows(p, bias, g(p), g(bias))
        return
    if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
        return  # rows are tokens, not units
    w = main_weight(m)
    b = m._parameters.get("bias")
    transpose = transposed or (isinstance(m, nn.modules.conv._ConvTransposeNd) and m.groups == 1)
    # a parametrized weight's gradient rows are not the original's: its symmetry is judged on weights
    gw = g(w) if parametrization(m) is None else None
    yield ("weight",) + rows(w, b, gw, g(b) if gw is not None else None, transpose=transpose)


def _directions(fan: int, k: int, like: torch.Tensor) -> torch.Tensor:
    """k fixed random unit directions in the row space (fan weights + the bias); shared, never
    written to."""
    return _directions_on(fan, k, like.dtype, like.device)


@functools.lru_cache(maxsize=64)
def _directions_on(fan: int, k: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # kept: a generator seeded, a draw and a normalization cost ~0.1 ms a call, which a check of a
    # few small layers pays several times (one screen per shape, one more per layer screened alone)
    gen = torch.Generator(device="cpu").manual_seed(0)
    with torch.inference_mode(False), torch.no_grad():
        v = torch.randn(fan + 1, k, generator=gen, dtype=torch.float32)
        return (v / v.norm(dim=0)).to(device=device, dtype=dtype)


_LOOKAHEAD = 3  # neighbours compared in sorted order: tolerates two rows whose projection falls between twins


def duplicate_groups(rows: torch.Tensor | Rows, tol_rel: float) -> list[list[int]]:
    """Groups of rows equal within tol_rel * (largest row norm), in O(n log n).

    Rows are projected on three fixed random unit directions and sorted by the first. Rows within
    the tolerance of each other are within it on every projection (|v.(a - b)| <= |a - b|), so only
    near neighbours in that order that are close on all three projections are candidates; their
    distances are checked in one batch and the confirmed pairs joined into groups.
    """
    rows = rows if isinstance(rows, Rows) else Rows.of(rows)
    n = len(rows)
    if n < 2:
        return []
    scale = float(rows.norms().max())
    if not math.isfinite(scale):
        return []
    if scale == 0.0:
        return [list(range(n))]
    tol = tol_rel * scale
    proj = rows.project(_directions(rows.w.shape[1], 3, rows.w))
    if float((proj.amax(0) - proj.amin(0)).max()) <= tol:
        # every projection agrees: most likely one group (a constant tensor); settle it in one pass
        if bool((rows.distance(torch.arange(n, device=rows.w.device), 0) <= tol).all()):
            return [list(range(n))]
    order = torch.argsort(proj[:, 0])
    ps = proj[order]
    left, right = [], []
    for k in range(1, min(_LOOKAHEAD, n - 1) + 1):
        i = torch.nonzero(((ps[k:] - ps[:-k]).abs() <= tol).all(1)).flatten()
        left.append(order[i])
        right.append(order[i + k])
    a, b = torch.cat(left), torch.cat(right)
    if a.numel() == 0:
        return []
    d = torch.linalg.vector_norm(rows.w[a] - rows.w[b], dim=1)
    if rows.b is not None:
        d = torch.sqrt(d.square() + (rows.b[a] - rows.b[b]).square())
    keep = d <= tol
    parent = {}

    def root(i: int) -> int:
        while parent.get(i, i) != i:
            parent[i] = parent.get(parent[i], parent[i])
            i = parent[i]
        return i

    for i, j in zip(a[keep].tolist(), b[keep].tolist()):
        parent.setdefault(i, i)
        parent.setdefault(j, j)
        ri, rj = root(i), root(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    groups: dict[int, list[int]] = {}
    for i in list(parent):
        groups.setdefault(root(i), []).append(i)
    return sorted((sorted(g) for g in groups.values() if len(g) > 1), key=lambda g: g[0])


def _rows_differ(rows: Rows, tol: float) -> bool:
    """Whether any row differs from the first by more than tol; one projection settles most cases."""
    if len(rows) < 2:
        return False
    p = rows.project(_directions(rows.w.shape[1], 1, rows.w))[:, 0]
    if float((p - p[0]).abs().max()) > tol:
        return True
    return bool(rows.distance(torch.arange(len(rows), device=rows.w.device), 0).max() > tol)


def symmetry_of(label: str, rows: Rows, grows: Rows | None, tol_rel: float) -> SymmetryStats:
    """Constant/zero (weights alone, bias excluded) and duplicate rows (weights with bias)."""
    w = rows.w
    lo, hi = (float(v) for v in torch.aminmax(w)) if w.numel() else (0.0, 0.0)
    finite = math.isfinite(lo) and math.isfinite(hi)
    constant = finite and w.numel() > 1 and hi - lo <= tol_rel * max(abs(lo), abs(hi), 1e-30)
    zero = finite and lo == 0.0 and hi == 0.0
    groups = duplicate_groups(rows, tol_rel) if finite else []
    grad_constant = grad_differ = None
    frozen: list[list[int]] = []
    if grows is not None:
        gtol = tol_rel * max(float(grows.norms().max()) if grows.w.numel() else 0.0, 1e-30)
        glo, ghi = (float(v) for v in torch.aminmax(grows.w)) if grows.w.numel() else (0.0, 0.0)
        gwmax = max(abs(glo), abs(ghi))
        grad_constant = gwmax == 0.0 or ghi - glo <= tol_rel * gwmax
        grad_differ = _rows_differ(grows, gtol)
        for grp in groups:
            idx = torch.tensor(grp, device=grows.w.device)
            if float(grows.distance(idx, grp[0]).max()) <= gtol:
                frozen.append(grp)
    return SymmetryStats(label, len(rows), constant, zero, grad_constant, grad_differ, groups, frozen,
                         value=lo if constant else None, shape=list(rows.w.shape))




@dataclasses.dataclass(frozen=True)
class Extremes:
    """What the host copy already knows of a plain weight: its smallest and largest entry, its bias's
    sum of squares, and its gradient's sum of squares (the bias's gradient excluded)."""

    lo: float
    hi: float
    bias_sumsq: float
    grad_sumsq: float


def symmetry_all(items: list[tuple]) -> list[SymmetryStats]:
    """`symmetry_of` for many (label, rows, gradient rows, tol_rel[, Extremes | None]), with the same results.

    Deep stacks of small layers spend most of their symmetry time in per-call overhead. Matrices of
    one shape are screened together: one batched projection and sort find every layer with no
    candidate twins, no constant tensor and gradient rows that differ, which is nearly every layer
    of a healthy model; only the others go through `symmetry_of`.
    """
    out: list[SymmetryStats | None] = [None] * len(items)
    groups: dict[tuple, list[int]] = {}
    for i, (_, rows, grows, tol, *_) in enumerate(items):
        if len(rows) >= 2 and grows is not None:
            key = (tuple(rows.w.shape), rows.b is not None, rows.w.dtype, rows.w.device, tol,
                   grows.b is not None, grows.w.dtype)
            groups.setdefault(key, []).append(i)
    for idx in groups.values():
        if len(idx) < 2:
            continue
        for i, verdict in zip(idx, _screen([items[i] for i in idx])):
            if verdict is not None:
                label, rows = items[i][:2]
                still = verdict == STILL  # a zero gradient: constant, its rows all equal
                out[i] = SymmetryStats(label, len(rows), False, False, still, not still, [], [],
                                       shape=list(rows.w.shape))
    return [s if s is not None else symmetry_of(*items[i][:4]) for i, s in enumerate(out)]


PLAIN, STILL = "plain", "still"  # what the screen settles: see _screen


def _any_close(proj: torch.Tensor, tol: torch.Tensor) -> torch.Tensor:
    """(L,) bool: whether matrix i has two rows within tol[i] on all three projections, among rows
    up to _LOOKAHEAD apart in the order of the first projection (proj: (L, rows, 3))."""
    return _any_close_numpy(proj, tol) if proj.device.type == "cpu" else _any_close_torch(proj, tol)


def _any_close_torch(proj: torch.Tensor, tol: torch.Tensor) -> torch.Tensor:
    n = proj.shape[1]
    order = torch.argsort(proj[:, :, 0], dim=1)
    ps = torch.gather(proj, 1, order[:, :, None].expand(-1, -1, 3))
    close = torch.zeros(proj.shape[0], dtype=torch.bool, device=proj.device)
    for k in range(1, min(_LOOKAHEAD, n - 1) + 1):
        close |= ((ps[:, k:] - ps[:, :-k]).abs() <= tol[:, None, None]).all(2).any(1)
    return close


def _any_close_numpy(proj: torch.Tensor, tol: torch.Tensor) -> torch.Tensor:
    n = proj.shape[1]
    # on the CPU NumPy sorts many short rows 7x faster than torch (64 x 256: 80 against 550 µs), and
    # the comparisons run on each projection as a contiguous (L, rows) array (64 x 256: 0.36 ms for
    # the whole, 1.2 with torch; sorted, the first projection's differences need no abs)
    p, t = proj.numpy(), tol.numpy()[:, None]
    order = np.argsort(p[:, :, 0], axis=1)
    s0, s1, s2 = (np.take_along_axis(np.ascontiguousarray(p[:, :, j]), order, axis=1) for j in range(3))
    close = np.zeros(p.shape[0], dtype=bool)
    for k in range(1, min(_LOOKAHEAD, n - 1) + 1):
        close |= ((s0[:, k:] - s0[:, :-k] <= t) & (np.abs(s1[:, k:] - s1[:, :-k]) <= t)
                  & (np.abs(s2[:, k:] - s2[:, :-k]) <= t)).any(1)
    return torch.from_numpy(close)


def _screen(items: list[tuple]) -> list[str | None]:
    """Per item, PLAIN where it is certainly plain: finite, not constant, no two rows within the
    tolerance (no neighbours close on three projections), gradient rows that differ; STILL where the
    weights are so and the gradient (bias included) is exactly zero (a layer no signal reaches: most
    layers of a deep stack whose activations vanish); None where `symmetry_of` must decide.

    Each matrix is read once (its projections; the gradient's on one direction). Extremes and norms
    come from the host copy where known (`Extremes`), else from one more read. Tolerances are upper
    bounds of tol_rel * (largest row norm): sqrt(fan + 1) * max|w|, and the gradient's whole norm;
    larger tolerances only make the screen more cautious: what it does not pass goes through
    `symmetry_of`. A constant gradient has equal rows, so `differ` fails for it too.
    """
    tol_rel = items[0][3]
    rows0 = items[0][1]
    fan = rows0.w.shape[1]
    v = _directions(fan, 3, rows0.w)
    vt = v[:fan].t().contiguous()  # (3, fan): the projections as (v^T W^T), see Rows.project
    vw0 = vt[0].contiguous()
    # per layer only the two products; biases, extremes and norms are gathered and combined at once
    # (a deep stack of small layers spends its time in per-call overhead here)
    proj, g1, biases, gbiases, known, unknown = [], [], [], [], [], []
    for i, (_, rows, grows, _, *rest) in enumerate(items):
        proj.append(vt @ rows.w.t())
        g1.append(grows.w @ vw0)
        biases.append(rows.b)
        gbiases.append(grows.b)
        k = rest[0] if rest else None
        if k is not None:
            known.append((k.lo, k.hi, math.sqrt(max(k.bias_sumsq, 0.0)), k.grad_sumsq))
        else:
            known.append(None)
            unknown.append(i)
    proj, g1 = torch.stack(proj), torch.stack(g1)  # (L, 3, n), (L, n)
    # all or none: the items of one screen share their shapes and whether they have biases
    if biases[0] is not None:
        proj += v[-1][None, :, None] * torch.stack(biases)[:, None, :]
    proj = proj.transpose(1, 2)  # (L, n, 3)
    gb2 = torch.zeros(len(items), dtype=torch.float64, device=v.device)
    if gbiases[0] is not None:
        gb = torch.stack(gbiases)  # (L, n)
        g1 += v[-1][0] * gb
        gb2 = gb.double().square().sum(1)
    facts = torch.tensor([k if k is not None else (0.0, 0.0, 0.0, 0.0) for k in known],
                         dtype=torch.float64, device=v.device)
    lo, hi, bmax = facts[:, :3].to(proj.dtype, copy=True).unbind(1)
    g2 = facts[:, 3]  # the gradient's sum of squares, in float64 from here on
    for i in unknown:  # extremes and norms not in the host copy: one more read of those tensors
        rows, grows = items[i][1], items[i][2]
        lo[i], hi[i] = torch.aminmax(rows.w)
        bmax[i] = rows.b.abs().amax() if rows.b is not None else 0.0
        g2[i] = torch.dot(grows.w.reshape(-1), grows.w.reshape(-1))
    # a float32 sum of squares is 0 for a zero gradient and for one below ~1e-23 alike: those few
    # are summed again in float64, where neither underflows
    for i in torch.nonzero(g2 == 0).flatten().tolist():
        g2[i] = torch.linalg.vector_norm(items[i][2].w, dtype=torch.float64).square()
    gnorm = torch.sqrt(g2 + gb2)
    wmax = torch.maximum(lo.abs(), hi.abs())
    tol = tol_rel * math.sqrt(fan + 1) * torch.maximum(wmax, bmax)  # (L,)
    finite = torch.isfinite(lo) & torch.isfinite(hi) & torch.isfinite(tol)
    not_constant = (hi - lo) > tol_rel * wmax.clamp_min(1e-30)
    close = _any_close(proj, tol)
    gtol = tol_rel * gnorm
    differ = (g1 - g1[:, :1]).abs().amax(1) > gtol
    weights_plain = finite & not_constant & ~close
    # a zero weight gradient is constant whatever the bias's gradient does: not plain
    plain = weights_plain & differ & torch.isfinite(gtol) & (g2 > 0)
    still = weights_plain & (gnorm == 0)
    return [PLAIN if p else STILL if z else None for p, z in zip(plain.tolist(), still.tolist())]

