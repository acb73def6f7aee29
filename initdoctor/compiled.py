"""Watching a `torch.compile`d model: the sampled step is replayed through the eager module.

Hooks inside a compiled graph are traced away (or force recompilation), so nothing is attached to
the modules the graph runs. On a sampled step two hooks sit on the compiled wrapper itself, outside
the graph: one keeps each training forward's arguments and the RNG state, the other registers a
tensor hook on every output that keeps the gradient the user's backward sends into it. When the
step closes (or, at the latest, just before an optimizer's step changes the weights) each kept call
runs again through the original module (`_orig_mod`) under a `Recorder`, and its outputs are
back-propagated with those same output gradients: so the activations and the gradients dL/dy of
every layer are those of the step's batch, its weights and its loss, computed eagerly. Weights,
weight gradients and their symmetry are read from the parameters themselves, which the compiled and
eager modules share. The replay leaves RNG, buffers and modes as they were and adds nothing to
`.grad`; unsampled steps run the compiled graph with no hook at all.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .lineage import tensors
from .probe import Recorder, preserved
from .stats import ModelStats

SOURCES = (
    "torch.compile: weights, weight gradients and their symmetry are read from the parameters after the "
    "compiled backward",
    "torch.compile: activations (signal, scale, saturation, dead units) and layer-output gradients G come "
    "from replaying the step's batch through the eager module (_orig_mod), back-propagating the gradients "
    "the compiled outputs received; dropout masks of the replay are drawn afresh",
)


class _NoAcc:
    grad: dict = {}


_NO_ACC = _NoAcc()


def compiled_parts(model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """(the module to observe, the compiled wrapper or None)."""
    inner = getattr(model, "_orig_mod", None)
    if isinstance(inner, nn.Module):
        return inner, model
    return model, None


class _Call:
    __slots__ = ("args", "kwargs", "rng", "grads", "versions")

    def __init__(self, args: tuple, kwargs: dict, versions: list[int]) -> None:
        self.args, self.kwargs = args, kwargs
        self.rng = torch.get_rng_state()
        self.grads: list[torch.Tensor | None] = []
        self.versions = versions


class CompiledRecorder:
    """A `Recorder` for one sampled step of a compiled model; `replay()` before `finish()`."""

    def __init__(self, wrapper: nn.Module, module: nn.Module, keep_values: int = 0) -> None:
        self.wrapper, self.module, self.keep_values = wrapper, module, keep_values
        self.calls: list[_Call] = []
        self._handles: list[Any] = []
        self._rec: Recorder | None = None
        self.sources: list[str] = list(SOURCES)
        self._params = [p for p in dict.fromkeys(module.parameters()) if p.requires_grad]

    @property
    def acc(self):
        """The replay's accumulators (empty before the first replay)."""
        return self._rec.acc if self._rec is not None else _NO_ACC

    def __enter__(self) -> CompiledRecorder:
        try:
            self._handles.append(self.wrapper.register_forward_pre_hook(self._pre, with_kwargs=True))
            self._handles.append(self.wrapper.register_forward_hook(self._post))
            # the weights must still be those of the forward when the replay runs
            self._handles.append(register_optimizer_step_pre_hook(self._before_update))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._rec is not None:
            self._rec.close()

    def _pre(self, module, args, kwargs) -> None:
        if torch.is_grad_enabled():  # evaluation forwards are no part of the training step
            self.calls.append(_Call(args, kwargs, [p._version for p in self._params]))

    def _post(self, module, args, output) -> None:
        if not self.calls or not torch.is_grad_enabled() or self.calls[-1].grads:
            return
        call = self.calls[-1]
        outs = [t for t in tensors(output) if t.requires_grad]
        call.grads = [None] * len(outs)
        for i, t in enumerate(outs):
            def keep(g, i=i, call=call):
                call.grads[i] = g if call.grads[i] is None else call.grads[i] + g
            t.register_hook(keep)

    def _before_update(self, optimizer, args, kwargs) -> None:
        self.replay()

    def replay(self) -> None:
        """Run every kept call again through the eager module; idempotent."""
        if not self.calls:
            return
        calls, self.calls = self.calls, []
        for h in self._handles[2:]:  # the optimizer hook has done its job
            h.remove()
        del self._handles[2:]
        if self._rec is None:
            self._rec = Recorder(self.module, keep_values=self.keep_values)
        self._rec.__enter__()  # the accumulators carry over from an earlier replay of this step
        try:
            for call in calls:
                if [p._version for p in self._params] != call.versions:
                    note = ("torch.compile: the weights changed between the forward and the replay (an update "
                            "outside torch.optim); the replay used the updated weights")
                    if note not in self.sources:
                        self.sources.append(note)
                try:
                    self._replay_one(call)
                except Exception as e:  # an observer must not stop training: say so, keep what the parameters tell
                    self.sources.append(f"torch.compile: the eager replay raised {type(e).__name__}: {e}; activations "
                                      "and layer-output gradients of this sample are missing")
        finally:
            self._rec.close()  # hooks off the module before anything else runs it

    def _replay_one(self, call: _Call) -> None:
        devices = sorted({p.device.index or 0 for p in self._params if p.device.type == "cuda"})
        # a compiled DDP model: its replay must not arm DDP's gradient reduction for a backward that
        # goes through autograd.grad and never reaches .grad
        no_sync = getattr(self.module, "no_sync", None)
        quiet = no_sync() if callable(no_sync) else contextlib.nullcontext()
        with preserved(self.module, devices), torch.enable_grad(), quiet:
            torch.set_rng_state(call.rng)
            out = self.module(*call.args, **call.kwargs)
            pairs = [(o, g) for o, g in zip([t for t in tensors(out) if t.requires_grad], call.grads)
                     if g is not None]
            if pairs and self._params:
                # autograd.grad, not backward: the gradients go to the Recorder's hooks, never to .grad
                torch.autograd.grad([o for o, _ in pairs], self._params, [g for _, g in pairs],
                                    allow_unused=True)

    def finish(self, grads: dict[int, torch.Tensor] | None = None, backward: bool = True, reduce=None,
               symmetry: bool = True) -> ModelStats:
        self.replay()
        rec = self._rec or Recorder(self.module, keep_values=self.keep_values)
        return rec.finish(grads, backward and bool(rec.acc.grad), reduce=reduce, symmetry=symmetry)
