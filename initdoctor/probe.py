"""The only place that registers hooks.

`Recorder` attaches forward hooks to every module, tensor hooks to every weight layer's output (the
gradient dL/dy, which survives in-place activations where module backward hooks do not), and a
`TorchFunctionMode` that sees functional calls (`torch.relu(x)`, `x.sigmoid()`) so that the
nonlinearity following each layer is known (lineage.py). What flows is reduced at once
(accumulators.py). Everything it attaches is removed on every exit path.

`examine` runs one forward and one backward pass of a model under a Recorder without changing the
model: train/eval modes, buffers (BatchNorm running statistics), parameters, `.grad` and the global
RNG are all as they were afterwards.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .accumulators import Accumulators, Key, build_stats, norm_layers, other_params, to_host
from .lineage import DROPOUTS, Graph, first_tensor, function_name, tensors
from .stats import ModelStats
from .vocab import EMBEDDING
from .weights import is_weight_layer, kind, main_weight, unit_dim

# Calls that take a layer's weight as an argument: (function name, position of the weight).
# linear/conv read W as (out, in); matmul-like calls with W on the right read it as (in, out).
WEIGHT_ARG = {"linear": 1, "conv1d": 1, "conv2d": 1, "conv3d": 1}
RIGHT_OPERAND = {"matmul": 1, "mm": 1, "addmm": 2}


def call_args(inputs: Any) -> tuple[tuple, dict]:
    """How an example input is passed to the model: positional arguments and keyword arguments.

    A tuple is the positional arguments; a dict (`{"input_ids": ids}`) the keyword arguments; a pair
    `(args, kwargs)` of a tuple or list and a dict both; anything else is the one argument.
    """
    if isinstance(inputs, dict):
        return (), dict(inputs)
    if (isinstance(inputs, tuple) and len(inputs) == 2 and isinstance(inputs[0], (tuple, list))
            and isinstance(inputs[1], dict)):
        return tuple(inputs[0]), dict(inputs[1])
    return (inputs if isinstance(inputs, tuple) else (inputs,)), {}


def eager(model: Any) -> nn.Module:
    """The module itself; a `torch.compile`d model is examined through the module it wraps."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"initdoctor needs an nn.Module, got {type(model).__name__}")
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else model


class _FunctionWatch(TorchFunctionMode):
    def __init__(self, rec: Recorder) -> None:
        super().__init__()
        self.rec = rec

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = function_name(func)
        if self.rec.dropout_off and name in DROPOUTS:
            out = args[0] if args else kwargs["input"]
        else:
            out = func(*args, **kwargs)
        self.rec._on_function(name, args, kwargs, out)
        return out


class Structure:
    """What a Recorder needs to know of a model's modules, read once (a `watch` reuses it while the
    model's modules stay the same objects: `matches`)."""

    def __init__(self, model: nn.Module) -> None:
        self.modules: dict[str, nn.Module] = dict(model.named_modules())  # shared modules appear once
        self.ids = _fingerprint(model)
        self.weight_layers = [n for n, m in self.modules.items() if is_weight_layer(m)]
        # the layers measured: weight layers, and the out_proj whose weight MultiheadAttention uses
        self.layers: dict[str, nn.Module] = {n: self.modules[n] for n in self.weight_layers}
        for n in self.weight_layers:
            if isinstance(self.modules[n], nn.MultiheadAttention):
                child = f"{n}.out_proj" if n else "out_proj"
                if child in self.modules:
                    self.layers.setdefault(child, self.modules[child])
        weight = set(self.weight_layers)
        self.leaves = [n for n, m in self.modules.items() if n not in weight and not list(m.children())]
        # id(weight) -> the layers that own it (tied weights have several), to attribute functional uses
        self.owners: dict[int, list[str]] = {}
        for n, m in self.layers.items():
            w = m._parameters.get("weight")
            if isinstance(w, torch.Tensor) and kind(m) != EMBEDDING and main_weight(m) is w:
                self.owners.setdefault(id(w), []).append(n)
        self.others = other_params(model, self.layers)
        self.norms = norm_layers(model, self.layers)
        self.static: dict = {}  # build_stats' cache of what each layer's module alone decides

    @classmethod
    def of(cls, model: nn.Module) -> Structure:
        return cls(model)

    def matches(self, model: nn.Module) -> bool:
        """Whether the model still has these module and parameter objects."""
        return _fingerprint(model) == self.ids


def _fingerprint(model: nn.Module) -> tuple:
    return tuple(id(m) for m in model.modules()) + tuple(id(p) for p in model.parameters())


class Recorder:
    """Hooks on a model that reduce what flows through it to per-layer accumulators.

    Use as a context manager; on exit every hook and the function mode are gone, whatever happened.
    `dropout_off` neutralizes dropout (functional calls included) for the duration; `keep_values`
    keeps that many values of each layer's output and weights for histograms.
    """

    def __init__(self, model: nn.Module, *, dropout_off: bool = False, functions: bool = True,
                 gradients: bool = True, keep_values: int = 0, structure: Structure | None = None) -> None:
        self.model = model
        self.dropout_off = dropout_off
        self.functions = functions
        self.gradients = gradients
        self.keep_values = keep_values
        self.structure = structure if structure is not None else Structure.of(model)
        self.modules, self.layers, self._owners = self.structure.modules, self.structure.layers, self.structure.owners
        self._module_handles: list[Any] = []
        self._tensor_handles: list[Any] = []
        self._stack: list[str] = []
        self._mode: _FunctionWatch | None = None
        self.reset()

    # -- lifecycle --
    def reset(self) -> None:
        """A fresh pass: new accumulators and graph (a pass handed off keeps the old ones)."""
        self.acc = Accumulators(self.keep_values)
        self.graph = Graph(set(self.structure.weight_layers), set(self.structure.leaves))
        self._stack.clear()
        self._remove_tensor_hooks()

    def handoff(self) -> Recorder:
        """The pass recorded so far, as a Recorder of its own with no hooks (to copy and build from),
        while this one keeps its module hooks and starts the next pass afresh: a watch that samples
        consecutive steps does not take its hooks off and put them back in between (~0.3 ms a step,
        6% of a small transformer's). As after `close()`, the pass's tensor hooks and function mode
        are gone."""
        self._exit_functions()
        done = copy.copy(self)
        done._module_handles, done._tensor_handles, done._stack = [], [], []
        self.reset()  # removes the pass's tensor hooks
        return done

    def __enter__(self) -> Recorder:
        try:
            for name, m in self.modules.items():
                self._module_handles.append(m.register_forward_pre_hook(self._pre_hook(name), with_kwargs=True))
                # always_call: after a forward that raises, the root hook still leaves the function mode
                self._module_handles.append(m.register_forward_hook(self._post_hook(name), always_call=name == ""))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._mode is not None:
            mode, self._mode = self._mode, None
            with contextlib.suppress(Exception):
                mode.__exit__(None, None, None)
        for h in self._module_handles:
            h.remove()
        self._module_handles.clear()
        self._remove_tensor_hooks()
        self._stack.clear()

    def _remove_tensor_hooks(self) -> None:
        # a tensor kept by the user (an output, a cached activation) would otherwise carry our hook
        for h in self._tensor_handles:
            h.remove()
        self._tensor_handles.clear()

    def _enter_functions(self) -> None:
        # The mode lives for the model's forward only: backward, the loss and the optimizer step run
        # without it, so steps that are not observed pay nothing.
        if self.functions and self._mode is None:
            self._mode = _FunctionWatch(self)
            self._mode.__enter__()

    def _exit_functions(self) -> None:
        if self._mode is not None:
            mode, self._mode = self._mode, None
            mode.__exit__(None, None, None)

    # -- module hooks --
    def _pre_hook(self, name: str):
        root = name == ""

        def hook(module, args, kwargs):
            if root:
                self._enter_functions()
                self.graph.mark_inputs((args, kwargs))
            self._stack.append(name)
        return hook

    def _post_hook(self, name: str):
        root = name == ""

        def hook(module, args, output):
            if self._stack and self._stack[-1] == name:
                self._stack.pop()
            if root and output is None:  # the forward raised (or returned nothing)
                self._stack.clear()
                self._exit_functions()
                return
            if name in self.graph.weight_layers:
                # our own reductions are not the model's operations: keep them out of the mode
                with torch._C.DisableTorchFunction():
                    self._record_layer(name, module, output)
                    if isinstance(module, (nn.LSTM, nn.GRU)):
                        self._record_gates(name, module, args, output)
            if root:
                with torch._C.DisableTorchFunction():
                    self.graph.mark_outputs(output)
                    for t in tensors(output):
                        self.acc.model_output(t)
                self._exit_functions()
        return hook

    def _record_layer(self, name: str, module: nn.Module, output: Any) -> None:
        self.acc.called(name)
        y = first_tensor(output)
        if y is None or not y.is_floating_point():
            return
        target = name
        if isinstance(module, nn.MultiheadAttention):
            # F.multi_head_attention_forward uses out_proj's weight without calling it: the
            # attention output is out_proj's output.
            target = f"{name}.out_proj" if name else "out_proj"
            self.acc.called(target)
        ud = unit_dim(module, y)
        self.acc.layer_output(target, y, ud)
        self.graph.layer_output(target, y)
        if self.gradients and y.requires_grad:
            def grad_hook(g, target=target, ud=ud):
                self.acc.gradient(target, g, ud)
            self._tensor_handles.append(y.register_hook(grad_hook))

    def _record_gates(self, name: str, m: nn.RNNBase, args: tuple, output: Any) -> None:
        """Rebuild LSTM/GRU gate pre-activations from the weights, the input and the output sequence.

        The fused op hides the gates; the previous hidden state is the previous output step, so the
        pre-activations follow without re-running the recurrence (single-layer modules; deeper
        layers' inputs are not returned and are noted instead).
        """
        x = args[0] if args else None
        out = output[0] if isinstance(output, tuple) else output
        if (not isinstance(x, torch.Tensor) or not isinstance(out, torch.Tensor) or m.num_layers != 1
                or getattr(m, "proj_size", 0) or x.dim() != 3):
            return  # ID905 says which recurrent layers were not rebuilt
        with torch.no_grad():
            if not m.batch_first:
                x, out = x.transpose(0, 1), out.transpose(0, 1)
            h0 = args[1] if len(args) > 1 else None
            if isinstance(h0, tuple):
                h0 = h0[0]
            hid = m.hidden_size
            gate_names = ("i", "f", "g", "o") if isinstance(m, nn.LSTM) else ("r", "z", "n")
            kinds = {"g": "tanh", "n": "tanh"}
            for d, suffix in enumerate([""] + (["_reverse"] if m.bidirectional else [])):
                w_ih, w_hh = getattr(m, f"weight_ih_l0{suffix}"), getattr(m, f"weight_hh_l0{suffix}")
                b_ih = getattr(m, f"bias_ih_l0{suffix}", None) if m.bias else None
                b_hh = getattr(m, f"bias_hh_l0{suffix}", None) if m.bias else None
                hs = out[..., d * hid:(d + 1) * hid]
                start = h0[d].unsqueeze(1) if isinstance(h0, torch.Tensor) else torch.zeros_like(hs[:, :1])
                if d == 0:
                    prev = torch.cat([start, hs[:, :-1]], 1)
                else:  # the reverse direction runs from the last step back
                    prev = torch.cat([hs[:, 1:], start], 1)
                gi = nn.functional.linear(x, w_ih, b_ih)
                gh = nn.functional.linear(prev, w_hh, b_hh)
                gi_parts, gh_parts = gi.chunk(len(gate_names), -1), gh.chunk(len(gate_names), -1)
                for k, gname in enumerate(gate_names):
                    if gname == "n":  # GRU: n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
                        r = torch.sigmoid(gi_parts[0] + gh_parts[0])
                        pre = gi_parts[k] + r * gh_parts[k]
                    else:
                        pre = gi_parts[k] + gh_parts[k]
                    kind = kinds.get(gname, "sigmoid")
                    post = torch.tanh(pre) if kind == "tanh" else torch.sigmoid(pre)
                    self.acc.gate(f"{name}:{gname}{suffix}", name, gname + suffix, kind, pre, post)


    def _record_stream(self, index: int, x: torch.Tensor) -> None:
        """A stream norm's input: per-row scale now, per-row gradient in the backward pass."""
        if not x.is_floating_point():
            return
        self.acc.stream_input(index, x)
        if self.gradients and x.requires_grad:
            def grad_hook(g, index=index):
                self.acc.stream_gradient(index, g)
            self._tensor_handles.append(x.register_hook(grad_hook))

    # -- functional calls --
    def _on_function(self, name: str, args: tuple, kwargs: dict, out: Any) -> None:
        inner = self._stack[-1] if self._stack else None
        borrowed = self._weight_use(name, args, kwargs) if self._owners else None
        call, norm = self.graph.on_function(name, args, kwargs, out, borrowed or inner)
        if call is not None:
            self.acc.activation(call)
        if norm is not None:
            with torch._C.DisableTorchFunction():
                self._record_stream(norm.index, norm.x)
        if borrowed is not None:
            # the layer's weight used outside its own forward (`F.linear(x, self.qkv.weight)`):
            # its output is the layer's output
            with torch._C.DisableTorchFunction():
                self._record_layer(borrowed, self.modules[borrowed], out)

    def _weight_use(self, name: str, args: tuple, kwargs: dict) -> str | None:
        """Note how a layer's weight is used; the layer, when it is used outside its own forward."""
        pos = WEIGHT_ARG.get(name, RIGHT_OPERAND.get(name))
        if pos is None:
            return None
        w = args[pos] if len(args) > pos else kwargs.get("weight" if name in WEIGHT_ARG else "mat2")
        if not isinstance(w, torch.Tensor):
            return None
        owners = self._owners.get(id(w))
        if not owners:
            return None
        running = [o for o in owners if o in self._stack]
        if name in RIGHT_OPERAND:
            # x @ W inside the layer's own forward (HF's Conv1D): its weight is stored (in, out). Outside
            # it (a decoder tied to an encoder) the product has other units: not the layer's output.
            self.graph.transposed.update(running)
            return None
        return None if running else owners[0]

    # -- results --
    def finish(self, grads: dict[int, torch.Tensor] | None = None, backward: bool = True,
               reduce: Callable[[list], list] | None = None, symmetry: bool = True) -> ModelStats:
        """Turn the accumulators into statistics. `grads` maps id(parameter) -> its gradient.

        All accumulators go to the host in one flat buffer (one synchronization); `reduce`, when
        given, combines that buffer across processes first (see distributed.py).
        """
        return self.build(self.host_copy(grads, reduce), grads, backward, symmetry)

    def host_copy(self, grads: dict[int, torch.Tensor] | None = None,
                  reduce: Callable[[list], list] | None = None) -> dict[Key, torch.Tensor]:
        """The first half of `finish`: tensor hooks off, the buffer reduced on the device (and across
        processes) and copied to the host. It reads the weights and `grads` as they are now."""
        self._remove_tensor_hooks()
        items = self.acc.buffer(self.model, self.layers, grads, self.structure.others, self.structure.norms)
        if reduce is not None:
            items = reduce(items)
        return to_host(items)

    def build(self, host: dict[Key, torch.Tensor], grads: dict[int, torch.Tensor] | None = None,
              backward: bool = True, symmetry: bool = True) -> ModelStats:
        """The second half of `finish`: `ModelStats` from the host copy (see `build_stats` for what
        it still reads from the live model)."""
        st = self.structure
        return build_stats(self.model, self.layers, self.graph, self.acc, host, grads, backward, symmetry,
                           others=st.others, norms=st.norms, static=st.static)


# --- one examination ------------------------------------------------------------------------


def cotangent_loss(output: Any, seed: int) -> torch.Tensor:
    """L = <y, eps> summed over every floating output, eps ~ N(0, I) from its own generator."""
    total = None
    gens: dict[str, torch.Generator] = {}
    for t in tensors(output):
        if not t.is_floating_point() or not t.requires_grad:
            continue
        key = str(t.device)
        if key not in gens:
            gens[key] = torch.Generator(device=t.device).manual_seed(seed)
        eps = torch.randn(t.shape, generator=gens[key], device=t.device, dtype=torch.float32).to(t.dtype)
        term = (t * eps).sum()
        total = term if total is None else total + term
    return total


@contextlib.contextmanager
def preserved(model: nn.Module, devices: list | None = None) -> Iterator[None]:
    """Put back train/eval modes, norm-layer running statistics and the global RNG afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    # every buffer: BatchNorm's running statistics, spectral norm's power-iteration vectors, ... by
    # binding too: a forward may assign a new tensor to a buffer (`self.steps = self.steps + 1`)
    buffers = [(m, name, b, b.detach().clone()) for m in model.modules()
               for name, b in m._buffers.items() if b is not None]
    try:
        with torch.random.fork_rng(devices=devices or [], enabled=True):
            yield
    finally:
        for m, mode in modes:
            m.training = mode
        with torch.no_grad():
            for m, name, buf, saved in buffers:
                buf.copy_(saved)
                m._buffers[name] = buf


def examine(model: nn.Module, inputs: Any, loss_fn: Callable | None = None, seed: int = 0,
            keep_values: int = 0, backward: bool = True) -> ModelStats:
    """One forward and one backward pass under a Recorder; the model is left exactly as it was.

    backward=False measures the forward pass alone (no gradients, no symmetry checks).
    """
    params = []
    seen: set[int] = set()
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    args, kwargs = call_args(inputs)
    # enable_grad: a caller inside torch.no_grad() still gets the backward pass it asked for.
    with preserved(model, devices), torch.set_grad_enabled(backward), \
            Recorder(model, dropout_off=True, keep_values=keep_values, gradients=backward) as rec:
        model.train()
        for m in model.modules():
            if isinstance(m, nn.modules.dropout._DropoutNd):
                m.eval()
        output = model(*args, **kwargs)
        if not backward:
            del output
            return rec.finish(None, False, symmetry=False)
        loss = loss_fn(output, inputs) if loss_fn is not None else cotangent_loss(output, seed)
        grads: dict[int, torch.Tensor] = {}
        backward = isinstance(loss, torch.Tensor) and loss.requires_grad and bool(params)
        if backward:
            got = torch.autograd.grad(loss, params, allow_unused=True)
            grads = {id(p): g for p, g in zip(params, got) if g is not None}
        del output, loss
        return rec.finish(grads if backward else None, backward)
