"""Model files, `package.module:attr` targets, checkpoints, and the example batch."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import pickle
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


class UsageError(Exception):
    """A problem with what the user gave us; the CLI prints it as one line and exits 2."""


@dataclass
class Loaded:
    model: nn.Module
    namespace: Any  # the imported module (for example_input / loss_fn), or None
    label: str


DTYPES = {
    "float32": torch.float32, "float": torch.float32, "float64": torch.float64, "double": torch.float64,
    "float16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
    "long": torch.long, "int64": torch.long, "int": torch.int32, "int32": torch.int32, "bool": torch.bool,
}


def import_file(path: str) -> Any:
    if not os.path.exists(path):
        raise UsageError(f"{path}: no such file; give the path of a Python file that defines the model")
    if os.path.isdir(path):
        raise UsageError(f"{path} is a directory; give the model's .py file")
    if not path.endswith(".py"):
        raise UsageError(f"{path} is not a .py file; for a checkpoint use --arch file.py:factory")
    name = f"_initdoctor_model_{uuid.uuid4().hex[:8]}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    folder = os.path.dirname(os.path.abspath(path))
    sys.path.insert(0, folder)  # so the file can import its neighbours
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise UsageError(f"{path}:{e.lineno}: syntax error: {e.msg}; fix the file and run again") from e
    except SystemExit as e:
        raise UsageError(f"importing {path} called exit({e.code}); move script code under "
                         f"`if __name__ == '__main__':`") from e
    except Exception as e:
        raise UsageError(f"importing {path} raised {type(e).__name__}: {e}") from e
    finally:
        if sys.path and sys.path[0] == folder:
            sys.path.pop(0)
    return module


def _import_attr(target: str) -> tuple[Any, Any]:
    mod_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise UsageError(f"cannot import {mod_name!r} ({e}); is it installed or on PYTHONPATH?") from e
    except Exception as e:
        raise UsageError(f"importing {mod_name} raised {type(e).__name__}: {e}") from e
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"{mod_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return module, obj


def _instantiate(obj: Any, what: str) -> nn.Module:
    if isinstance(obj, nn.Module):
        return obj
    if not callable(obj):
        raise UsageError(f"{what} is a {type(obj).__name__}, not an nn.Module or a callable returning one")
    try:
        sig = inspect.signature(obj)
        required = [p.name for p in sig.parameters.values()
                    if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    except (TypeError, ValueError):
        required = []
    if required:
        raise UsageError(f"{what} needs arguments ({', '.join(required)}); add a no-argument build_model() "
                         f"to the file or point --model at one")
    try:
        model = obj()
    except Exception as e:
        raise UsageError(f"calling {what}() raised {type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise UsageError(f"{what}() returned a {type(model).__name__}, not an nn.Module")
    return model


def find_model(namespace: Any, label: str, model_name: str | None) -> nn.Module:
    """The discovery order of DESIGN 'Model files'."""
    if model_name:
        if not hasattr(namespace, model_name):
            raise UsageError(f"{label} has no {model_name!r}; candidates: {', '.join(candidates(namespace)) or 'none'}")
        return _instantiate(getattr(namespace, model_name), model_name)
    if callable(getattr(namespace, "build_model", None)):
        return _instantiate(namespace.build_model, "build_model")
    own = {k: v for k, v in vars(namespace).items() if not k.startswith("_")}
    instances = {k: v for k, v in own.items() if isinstance(v, nn.Module)}
    if len(instances) == 1:
        return next(iter(instances.values()))
    if len(instances) > 1:
        raise UsageError(f"{label} defines several nn.Module instances ({', '.join(sorted(instances))}); "
                         f"choose one with --model NAME")
    classes = {k: v for k, v in own.items() if inspect.isclass(v) and issubclass(v, nn.Module)
               and v.__module__ == getattr(namespace, "__name__", None)}
    no_arg = {k: v for k, v in classes.items() if _constructs_without_args(v)}
    if len(no_arg) == 1:
        name, cls = next(iter(no_arg.items()))
        return _instantiate(cls, name)
    if len(no_arg) > 1:
        raise UsageError(f"{label} defines several nn.Module classes ({', '.join(sorted(no_arg))}); "
                         f"choose one with --model NAME")
    if classes:
        raise UsageError(f"{label}: the nn.Module class(es) {', '.join(sorted(classes))} need constructor "
                         f"arguments; add a build_model() that returns an instance")
    raise UsageError(f"no model found in {label}: define build_model(), one nn.Module instance, or one "
                     f"nn.Module class that constructs with no arguments")


def candidates(namespace: Any) -> list[str]:
    return sorted(k for k, v in vars(namespace).items() if not k.startswith("_") and (
        isinstance(v, nn.Module) or (inspect.isclass(v) and issubclass(v, nn.Module)) or k == "build_model"))


def _constructs_without_args(cls: type) -> bool:
    try:
        sig = inspect.signature(cls)  # without the bound first parameter, whatever its name
    except (TypeError, ValueError):
        return False
    return all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
               for p in sig.parameters.values())


def load(target: str, model_name: str | None = None, arch: str | None = None) -> Loaded:
    """A model from a file path, `package.module:attr`, or a checkpoint with --arch."""
    if target.endswith((".pt", ".pth", ".ckpt")):
        if not arch:
            raise UsageError(f"{target} is a checkpoint; say which architecture to load it into with "
                             f"--arch file.py:factory")
        path, _, name = arch.rpartition(":") if ".py:" in arch else (arch, "", "")
        loaded = load(path, name or None)
        load_checkpoint(loaded.model, target)
        return Loaded(loaded.model, loaded.namespace, target)
    if ":" in target and not target.endswith(".py") and not os.path.exists(target):
        module, obj = _import_attr(target)
        return Loaded(_instantiate(obj, target), module, target)
    namespace = import_file(target)
    return Loaded(find_model(namespace, target, model_name), namespace, target)


def load_checkpoint(model: nn.Module, path: str) -> None:
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UsageError(f"{path} needs arbitrary code to unpickle, which initdoctor refuses to run; save a "
                         f"state_dict instead (torch.save(model.state_dict(), path))") from e
    except Exception as e:
        raise UsageError(f"cannot read {path}: {type(e).__name__}: {e}") from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UsageError(f"{path} holds a {type(state).__name__}, not a state_dict")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise UsageError(f"{path} does not fit the architecture: {' '.join(first[:2])[:300]}") from e


# --- the example batch ----------------------------------------------------------------------


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
    except ValueError:
        raise UsageError(f"--input-shape {text!r} is not a list of integers like 64,3,32,32") from None
    if not shape or any(s <= 0 for s in shape):
        raise UsageError(f"--input-shape {text!r} needs positive sizes, like 64,3,32,32")
    return shape


def parse_dtype(text: str) -> torch.dtype:
    if text not in DTYPES:
        raise UsageError(f"--input-dtype {text!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[text]


def make_batch(shape: tuple[int, ...], dtype: torch.dtype, seed: int, high: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    return torch.randint(0, high, shape, generator=gen).to(dtype)


def _candidate(m: nn.Module, batch: int, seed: int) -> torch.Tensor | None:
    """A batch that layer `m` accepts as its input, or None when its type does not tell."""
    if isinstance(m, nn.Linear):
        return make_batch((batch, m.in_features), torch.float32, seed)
    if isinstance(m, (nn.Conv1d, nn.ConvTranspose1d)):
        return make_batch((batch, m.in_channels, 32), torch.float32, seed)
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        return make_batch((batch, m.in_channels, 32, 32), torch.float32, seed)
    if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
        return make_batch((batch, m.in_channels, 8, 16, 16), torch.float32, seed)
    if isinstance(m, nn.Embedding):
        return make_batch((batch, 16), torch.long, seed, high=m.num_embeddings)
    if isinstance(m, nn.RNNBase):
        shape = (batch, 16, m.input_size) if m.batch_first else (16, batch, m.input_size)
        return make_batch(shape, torch.float32, seed)
    return None


def infer_input(model: nn.Module, batch: int, seed: int) -> torch.Tensor:
    """A batch for the first layer that runs: each layer that tells its input size is tried, in
    definition order, until the model accepts the batch (a model may define its head first)."""
    from .probe import preserved

    tried: list[str] = []
    for m in model.modules():
        x = _candidate(m, batch, seed)
        if x is None or any(str(tuple(x.shape)) == t for t in tried):
            continue
        tried.append(str(tuple(x.shape)))
        try:
            with preserved(model), torch.no_grad():
                model(x)
        except Exception:
            continue
        return x
    if tried:
        raise UsageError(f"cannot infer the input: the model accepts none of {', '.join(tried[:4])}; pass "
                         f"--input-shape (e.g. 64,3,32,32) or define example_input() in the file")
    raise UsageError("cannot infer the input from the model's layers; pass --input-shape (e.g. 64,3,32,32) "
                     "or define example_input() in the file")


def load_data(path: str) -> Any:
    """A real batch from a .pt (tensor or tuple of tensors) or .npy file."""
    if not os.path.isfile(path):
        raise UsageError(f"--data {path}: no such file")
    if path.endswith(".npy"):
        import numpy as np

        try:
            return torch.from_numpy(np.load(path, allow_pickle=False))
        except Exception as e:
            raise UsageError(f"--data {path}: cannot read it as .npy ({e})") from e
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"--data {path}: cannot read it as a tensor file ({type(e).__name__}: {e})") from e
    if isinstance(data, list):
        data = tuple(data)
    if not isinstance(data, torch.Tensor) and not (isinstance(data, tuple) and all(
            isinstance(t, torch.Tensor) for t in data)):
        raise UsageError(f"--data {path} holds a {type(data).__name__}; save a tensor or a tuple of tensors")
    return data


def example_batch(loaded: Loaded, shape: str | None, dtype: str | None, batch_size: int | None, seed: int,
                  data: str | None = None) -> tuple[Any, bool]:
    """(batch, inferred) in the order: --data, --input-shape, example_input(), inference."""
    if dtype and not shape:
        parse_dtype(dtype)
        raise UsageError(f"--input-dtype {dtype} needs --input-shape (it sets the dtype of the random batch)")
    if data:
        return load_data(data), False
    if shape:
        return make_batch(parse_shape(shape), parse_dtype(dtype or "float32"), seed,
                          high=_vocab(loaded.model)), False
    fn: Callable | None = getattr(loaded.namespace, "example_input", None) if loaded.namespace else None
    if callable(fn):
        try:
            x = fn()
        except Exception as e:
            raise UsageError(f"example_input() raised {type(e).__name__}: {e}") from e
        if isinstance(x, list):
            x = tuple(x)
        return x, False
    return infer_input(loaded.model, batch_size or 64, seed), True


def _vocab(model: nn.Module) -> int:
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            return m.num_embeddings
    return 2
