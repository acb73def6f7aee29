"""Prescription -> weights. The only module that writes to a model's parameters.

Everything is drawn in float32 on the CPU from its own generator, then copied into the existing
parameter: dtype, device, parameter identity and weight tying are kept, the global RNG is not used.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .plan import Prescription

_INIT_STREAM = 0x1D0C_7011  # offsets the weight stream from every seed-derived batch


def _draw(shape: torch.Size, scheme: str, gain: float, mode: str, gen: torch.Generator) -> torch.Tensor:
    t = torch.empty(shape, dtype=torch.float32)
    if scheme == "xavier_uniform":
        nn.init.xavier_uniform_(t, gain=gain, generator=gen)
    elif scheme == "xavier_normal":
        nn.init.xavier_normal_(t, gain=gain, generator=gen)
    elif scheme in ("kaiming_normal", "kaiming_uniform", "lecun_normal"):
        init = nn.init.kaiming_uniform_ if scheme == "kaiming_uniform" else nn.init.kaiming_normal_
        # nonlinearity='linear' is gain 1, so the prescribed gain (e.g. an LSUV-adjusted one) multiplies in.
        init(t, mode=mode if mode in ("fan_in", "fan_out") else "fan_in", nonlinearity="linear", generator=gen)
        t.mul_(gain)
    elif scheme == "orthogonal":
        nn.init.orthogonal_(t, gain=gain, generator=gen)
    elif scheme == "zeros":
        nn.init.zeros_(t)
    elif scheme == "ones":
        nn.init.ones_(t)
    else:
        raise ValueError(f"cannot draw scheme {scheme!r}")
    return t


def _put(p: torch.Tensor, value: torch.Tensor) -> None:
    p.copy_(value.to(device=p.device, dtype=p.dtype))


def centred_bias(w: torch.Tensor) -> torch.Tensor:
    """rowsum(W), so that bias = -0.5 * rowsum(W) cancels the 0.5 mean of the sigmoid feeding the layer."""
    return w.detach().float().reshape(w.shape[0], -1).sum(1).cpu()


def centre(module: nn.Module) -> None:
    """Re-centre a layer's bias after its weights were rescaled."""
    w, b = module._parameters.get("weight"), module._parameters.get("bias")
    if w is not None and b is not None:
        _put(b, -0.5 * centred_bias(w))


def apply_plan(model: nn.Module, plan: list[Prescription], seed: int = 0) -> list[str]:
    """Apply every entry with apply=True, in place under no_grad. Returns the parameters written."""
    # Not `seed` itself: the CLI draws the example batch from it, and the weights must not copy it.
    gen = torch.Generator().manual_seed(_INIT_STREAM + seed)
    modules = dict(model.named_modules())
    done: set[int] = set()  # tied parameters are drawn once
    written: list[str] = []
    for entry in plan:  # a kept layer's parameters stay as they are, also through a layer tied to them
        if (not entry.apply or entry.scheme == "keep") and entry.layer in modules:
            done.update(id(p) for p in modules[entry.layer].parameters(recurse=False))

    def write(prefix: str, pname: str, p: torch.Tensor | None, value: torch.Tensor) -> None:
        if p is None or id(p) in done:
            return
        done.add(id(p))
        _put(p, value)
        written.append(f"{prefix}.{pname}" if prefix else pname)

    with torch.no_grad():
        for entry in plan:
            if not entry.apply or entry.scheme == "keep":
                continue
            m = modules[entry.layer]
            params = m._parameters
            if entry.scheme == "ones":  # norm layer
                write(entry.layer, "weight", params.get("weight"), torch.ones(params["weight"].shape))
                if params.get("bias") is not None:
                    write(entry.layer, "bias", params["bias"], torch.zeros(params["bias"].shape))
                continue
            if isinstance(m, nn.RNNBase):
                gates = 4 if isinstance(m, nn.LSTM) else 3 if isinstance(m, nn.GRU) else 1
                for pname, p in params.items():
                    if p is None:
                        continue
                    if pname.startswith("weight_"):
                        parts_n = 1 if pname.startswith("weight_hr") else gates  # LSTM projections: no gates
                        rows = p.shape[0] // parts_n
                        scheme = "orthogonal" if pname.startswith("weight_hh") else entry.scheme
                        parts = [_draw(torch.Size((rows, p.shape[1])), scheme, entry.gain, entry.mode, gen)
                                 for _ in range(parts_n)]
                        write(entry.layer, pname, p, torch.cat(parts, 0))
                    elif pname.startswith("bias_"):
                        b = torch.zeros(p.shape)
                        if isinstance(m, nn.LSTM) and pname.startswith("bias_ih"):
                            b[p.shape[0] // 4: p.shape[0] // 2] = 1.0  # forget gate open at the start
                        write(entry.layer, pname, p, b)
                continue
            if isinstance(m, nn.MultiheadAttention):
                for pname in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
                    p = params.get(pname)
                    if p is not None:
                        write(entry.layer, pname, p, _draw(p.shape, entry.scheme, entry.gain, entry.mode, gen))
                if params.get("in_proj_bias") is not None:
                    write(entry.layer, "in_proj_bias", params["in_proj_bias"], torch.zeros(params["in_proj_bias"].shape))
                continue
            w = params.get("weight")
            if entry.transposed:  # stored (in, out): torch.nn.init reads fans from (out, in)
                drawn = _draw(torch.Size((w.shape[1], w.shape[0])), entry.scheme, entry.gain, entry.mode, gen).T
            else:
                drawn = _draw(w.shape, entry.scheme, entry.gain, entry.mode, gen)
                if entry.fans is not None and entry.scheme.startswith("xavier"):
                    # torch.nn.init read the fans off the tensor; the plan's are the convolution's own
                    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(drawn)
                    drawn.mul_(math.sqrt((fan_in + fan_out) / sum(entry.fans)))
            write(entry.layer, "weight", w, drawn)
            b = params.get("bias")
            if b is not None and entry.bias in ("zeros", "centred"):
                write(entry.layer, "bias", b, -0.5 * centred_bias(w.T if entry.transposed else w)
                      if entry.bias == "centred" else
                      torch.zeros(b.shape))
    return written


def scale_layer(model: nn.Module, name: str, factor: float, recentre: bool) -> None:
    """Multiply a layer's weights by `factor` (LSUV-style adjustment), re-centring its bias if needed."""
    m = dict(model.named_modules())[name]
    with torch.no_grad():
        for p in m._parameters.values():
            if p is not None and p.dim() >= 2:
                p.mul_(factor)
        if recentre:
            centre(m)


Snapshot = list[tuple[torch.Tensor, torch.Tensor]]


def snapshot(model: nn.Module) -> Snapshot:
    """A copy of every parameter, to `restore` when a cure is undone."""
    return [(p, p.detach().clone()) for p in {id(p): p for p in model.parameters()}.values()]


def restore(saved: Snapshot) -> None:
    """Put back the parameters a `snapshot` copied, in place (identity, dtype and device kept)."""
    with torch.no_grad():
        for p, v in saved:
            p.copy_(v)
