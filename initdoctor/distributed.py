"""Reducing a sampled step's statistics across ranks with one collective.

Each rank packs its accumulators (counts, per-unit means, centred sums of squares, maxima, counts
of saturated samples) into one flat float64 buffer; one `all_gather` brings every rank's buffer to
every rank, and Chan's parallel formula combines the moments, so tiny variances survive and the
result equals one process that saw the concatenated batch. Weights and weight gradients are
replicated under DDP, so rank 0's copy is used; under FSDP2 each rank holds a shard (a DTensor) and
their sums add up. Every rank must run the same modules.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .stats import Moments

_SUM = {"sat", "outbad", "actn"}
_MAX = {"maxv", "pbad"}  # per-parameter non-finite counts: replicated under DDP


def active(group=None) -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def rank(group=None) -> int:
    import torch.distributed as dist

    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def combine(items: list[tuple[tuple, list[torch.Tensor]]]) -> list[tuple[tuple, torch.Tensor]]:
    """Per key, one tensor from every rank's copy."""
    parts = dict(items)
    out: list[tuple[tuple, torch.Tensor]] = []
    done: set[tuple] = set()
    for key, copies in items:
        if key in done:
            continue
        if len(key) == 3 and key[2] in ("n", "mean", "m2"):
            base = key[:2]
            merged = Moments()
            for r in range(len(copies)):
                merged = merged.merge(Moments(float(parts[base + ("n",)][r][0]), parts[base + ("mean",)][r],
                                              parts[base + ("m2",)][r]))
            dev = copies[0].device
            for field, value in (("n", torch.tensor([merged.n], dtype=torch.float64, device=dev)),
                                 ("mean", merged.mean), ("m2", merged.m2)):
                out.append((base + (field,), value))
                done.add(base + (field,))
            continue
        if key[-1] == "sum":  # shards of a sharded parameter (FSDP): their parts add up
            out.append((key[:-1], torch.stack(copies).sum(0)))
            done.add(key)
            continue
        if key[0] in _SUM:
            value = torch.stack(copies).sum(0)
        elif key[0] in _MAX:
            value = torch.stack(copies).amax(0)
        else:
            value = copies[0]
        out.append((key, value))
        done.add(key)
    return out


def reducer(group=None) -> Callable[[list], list]:
    """A `reduce` for `Recorder.finish`: one all_gather of the flat buffer, then `combine`."""
    import torch.distributed as dist

    def reduce(items: list[tuple[tuple, torch.Tensor]]) -> list[tuple[tuple, torch.Tensor]]:
        if not items:
            return items
        dev = items[0][1].device
        flat = torch.cat([t.reshape(-1).double().to(dev) for _, t in items])
        gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, flat, group=group)
        split = []
        pos = 0
        for key, t in items:
            n = t.numel()
            split.append((key, [g[pos:pos + n].reshape(t.shape) for g in gathered]))
            pos += n
        return combine(split)

    return reduce
