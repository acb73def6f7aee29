"""Shared tiny model builders and checks for the examination-core tests.

The helpers live on one session-scoped fixture, `tiny`, so that hypothesis tests (which refuse
function-scoped fixtures) can use them as well as ordinary tests.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

os.environ.setdefault("MPLBACKEND", "Agg")

# The models here are tiny: one intra-op thread is fastest, and on a busy 2-core machine extra threads
# spin against each other (a 16-layer 64-wide check measured 30 ms on one thread, 100-600 ms on two).
torch.set_num_threads(1)

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU, "leaky_relu": nn.LeakyReLU,
}


def init_fn(init: str | Callable | None, act: str = "relu", sigma: float = 1.0,
            gain: float | None = None) -> Callable[[torch.Tensor], object] | None:
    """A weight initializer by name: he, xavier (gain defaults to the activation's), normal, uniform, default."""
    if init is None or init == "default":
        return None
    if callable(init):
        return init
    if init == "he":
        nl = "leaky_relu" if act == "leaky_relu" else "relu"
        return lambda w: nn.init.kaiming_normal_(w, nonlinearity=nl)
    if init == "xavier":
        g = gain if gain is not None else (nn.init.calculate_gain(act) if act in ("tanh", "sigmoid", "relu")
                                           else 1.0)
        return lambda w: nn.init.xavier_uniform_(w, gain=g)
    if init == "normal":
        return lambda w: nn.init.normal_(w, 0.0, sigma)
    if init == "uniform":
        return lambda w: nn.init.uniform_(w, -sigma, sigma)
    if init == "constant":
        return lambda w: nn.init.constant_(w, sigma)
    raise ValueError(init)


def mlp(depth: int, width: int, act: str = "relu", init: str | Callable | None = "he", *, din: int | None = None,
        dout: int = 10, sigma: float = 1.0, gain: float | None = None, bias: float | None = 0.0,
        seed: int = 0) -> nn.Sequential:
    """Linear(din, width) act [Linear(width, width) act] * (depth - 1) Linear(width, dout).

    Hidden layers are drawn by `init`; biases are set to `bias` (None leaves PyTorch's default). The
    readout keeps PyTorch's default init. Module names: hidden layers 0, 2, ..., readout 2*depth.
    """
    torch.manual_seed(seed)
    fn = init_fn(init, act, sigma, gain)
    dims = [din or width] + [width] * depth
    layers: list[nn.Module] = []
    for a, b in zip(dims[:-1], dims[1:]):
        lin = nn.Linear(a, b)
        if fn is not None:
            fn(lin.weight)
        if bias is not None:
            nn.init.constant_(lin.bias, bias)
        layers += [lin, ACTIVATIONS[act]()]
    layers.append(nn.Linear(width, dout))
    return nn.Sequential(*layers)


def batch(n: int, *shape: int, seed: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A standard-normal batch from its own generator (the global RNG is left alone)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((n, *shape), generator=gen).to(dtype)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Clones of every parameter and buffer."""
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


def assert_unchanged(model: nn.Module, snap: dict[str, torch.Tensor]) -> None:
    now = model.state_dict(keep_vars=True)
    assert set(now) == set(snap)
    for k, v in snap.items():
        assert torch.equal(now[k].detach(), v) or (
            v.is_floating_point() and torch.equal(now[k].detach().isnan(), v.isnan())
            and torch.equal(now[k].detach().nan_to_num(), v.nan_to_num())), f"{k} changed"


HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
              "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
              "_state_dict_hooks", "_load_state_dict_pre_hooks")


def hooks_of(model: nn.Module) -> dict[tuple[str, str], int]:
    """How many hooks of each kind every module holds (only non-empty entries)."""
    out = {}
    for name, m in model.named_modules():
        for attr in HOOK_DICTS:
            d = getattr(m, attr, None)
            if d:
                out[(name, attr)] = len(d)
    return out


def global_hooks() -> int:
    from torch.nn.modules import module as mod

    return sum(len(getattr(mod, n, {}) or {}) for n in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
        "_global_backward_pre_hooks"))


def assert_no_hooks(model: nn.Module, allowed: dict | None = None) -> None:
    assert hooks_of(model) == (allowed or {})
    assert global_hooks() == 0
    assert not torch._C._is_torch_function_mode_enabled()


def write(tmp_path: Path, name: str, source: str) -> str:
    """Write a model file into tmp_path and return its path as a string."""
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return str(path)


def codes(diag, at_least: str = "warning") -> set[str]:
    rank = {"info": 0, "warning": 1, "error": 2}
    return {f.code for f in diag.findings if rank[f.severity] >= rank[at_least]}


def severity(diag, code: str) -> str | None:
    """The worst severity reported for `code`, or None."""
    rank = {"info": 0, "warning": 1, "error": 2}
    sevs = [f.severity for f in diag.findings if f.code == code]
    return max(sevs, key=rank.__getitem__) if sevs else None


@pytest.fixture(scope="session")
def tiny() -> SimpleNamespace:
    return SimpleNamespace(mlp=mlp, batch=batch, init_fn=init_fn, snapshot=snapshot,
                           assert_unchanged=assert_unchanged, hooks_of=hooks_of, assert_no_hooks=assert_no_hooks,
                           write=write, codes=codes, severity=severity, ACTIVATIONS=ACTIVATIONS)



def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", help="rewrite tests/golden/* from the current output")
