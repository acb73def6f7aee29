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

from .accumulators import Buffer, combine, pack, unpack


def active(group=None) -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def rank(group=None) -> int:
    import torch.distributed as dist

    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def reducer(group=None) -> Callable[[Buffer], Buffer]:
    """A `reduce` for `Recorder.finish`: one all_gather of the packed buffer, then `combine`."""
    import torch.distributed as dist

    def reduce(items: Buffer) -> Buffer:
        if not items:
            return items
        flat = pack(items)
        gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, flat, group=group)
        copies = [unpack(g, items) for g in gathered]
        return combine([(key, [c[i][1] for c in copies]) for i, (key, _) in enumerate(items)])

    return reduce
