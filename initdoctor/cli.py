"""Command line: argument parsing, exit codes, nothing else.

Exit codes: 0 no finding at or above --fail-on; 1 at least one; 2 the command could not do its job.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from ._version import __version__
from .vocab import FORCEABLE

FAIL_ON = ("error", "warning", "info", "never")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2
        sys.stderr.write(f"initdoctor: {message} (see `initdoctor {self.prog.split()[-1]} --help`)\n")
        raise SystemExit(2)


def _codes(text: str | None) -> list[str]:
    return [c.strip().upper() for c in text.split(",") if c.strip()] if text else []


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="initdoctor", description="Diagnose and cure weight-initialization problems in PyTorch models.")
    p.add_argument("--version", action="version", version=f"initdoctor {__version__}")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    c = sub.add_parser("check", help="examine a model, report, optionally fix")
    c.add_argument("target", help="model.py, package.module:attr, or a checkpoint .pt with --arch")
    c.add_argument("--model", help="name of the model (a callable or an nn.Module instance) in the file")
    c.add_argument("--arch", help="file.py:factory that builds the architecture of a checkpoint TARGET")
    c.add_argument("--input-shape", help="example batch shape, e.g. 64,3,32,32")
    c.add_argument("--input-dtype", default=None, help="float32 (default), long, bfloat16, ...")
    c.add_argument("--data", help="a real batch: a .pt tensor (or tuple of tensors) or a .npy array")
    c.add_argument("--batch-size", type=int, default=None, help="batch size when the input is inferred (64)")
    c.add_argument("--seed", type=int, default=0, help="seed for the random batch and cotangent (0)")
    c.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    c.add_argument("--dtype", default=None, help="cast the model to this dtype first (e.g. bfloat16)")
    c.add_argument("--format", choices=("text", "json", "markdown"), default="text")
    c.add_argument("--output", help="write the report here instead of stdout")
    c.add_argument("--fix", action="store_true", help="apply the plan, examine again, show before and after")
    c.add_argument("--scheme", choices=FORCEABLE, help="force an init family for --fix")
    c.add_argument("--keep", action="append", default=[], metavar="PATTERN",
                   help="leave layers matching this glob as they are (repeatable)")
    c.add_argument("--save-fixed", metavar="FILE.pt", help="write the fixed state_dict (implies --fix)")
    c.add_argument("--tensorboard", metavar="DIR", help="write the examination to TensorBoard event files")
    c.add_argument("--plot", metavar="FILE.png", help="write the depth-profile figure (.png/.svg/.pdf)")
    c.add_argument("--select", help="only these code prefixes, e.g. ID2,ID301")
    c.add_argument("--ignore", help="skip these code prefixes")
    c.add_argument("--fail-on", choices=FAIL_ON, default="error", help="exit 1 at this severity or above")
    c.add_argument("--no-color", action="store_true", help="plain text even on a terminal")
    c.add_argument("--debug", action="store_true", help="show tracebacks")
    e = sub.add_parser("explain", help="the rule's page: what, why, example, fix, thresholds")
    e.add_argument("code", help="a code like ID203 or a name like vanishing-gradients")
    return p


def _writable(path: str, flag: str) -> None:
    from .loading import UsageError

    folder = os.path.dirname(os.path.abspath(path)) or "."
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a directory; give a file name")
    if not os.path.isdir(folder):
        raise UsageError(f"{flag} {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"{flag} {path}: folder {folder} is not writable")


def _tensors_to(x, device=None, dtype=None):
    """Move (and cast floating) tensors, in tuples and lists too; leave anything else as it is."""
    import torch

    if isinstance(x, torch.Tensor):
        x = x.to(device) if device is not None else x
        return x.to(dtype) if dtype is not None and x.is_floating_point() else x
    if isinstance(x, (tuple, list)):
        return type(x)(_tensors_to(t, device, dtype) for t in x)
    if isinstance(x, dict):
        return {k: _tensors_to(v, device, dtype) for k, v in x.items()}
    return x


def _check(args) -> int:
    import torch

    from . import diagnosis
    from .loading import UsageError, example_batch, load
    from .probe import eager

    if args.batch_size is not None and args.batch_size <= 0:
        raise UsageError(f"--batch-size {args.batch_size} must be positive")
    for path, flag in ((args.output, "--output"), (args.save_fixed, "--save-fixed"), (args.plot, "--plot")):
        if path:
            _writable(path, flag)
    if args.plot and not args.plot.lower().endswith((".png", ".svg", ".pdf")):
        raise UsageError(f"--plot {args.plot}: use a .png, .svg or .pdf file name")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UsageError(f"--device {args.device!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")
    # The model file runs in this process: seeding here makes unseeded files give the same model
    # (and report) from run to run.
    torch.manual_seed(args.seed)
    loaded = load(args.target, args.model, args.arch)
    model = eager(loaded.model)  # a torch.compile'd model: examine (and save) the module it wraps
    x, inferred = example_batch(loaded, args.input_shape, args.input_dtype, args.batch_size, args.seed, args.data)
    if args.dtype:
        from .loading import parse_dtype

        dt = parse_dtype(args.dtype)
        model = model.to(dt)
        x = _tensors_to(x, dtype=dt)
    model = model.to(device)
    x = _tensors_to(x, device=device)
    loss_fn = getattr(loaded.namespace, "loss_fn", None) if loaded.namespace else None
    kw = dict(select=_codes(args.select), ignore=_codes(args.ignore), keep=tuple(args.keep), scheme=args.scheme,
              target=args.target, histogram_values=4096 if args.tensorboard else 0, inferred=inferred)
    try:
        if args.fix or args.save_fixed:
            result = diagnosis.fix(model, x, loss_fn, args.seed, **kw)
            diag, final = result.before, result.after
        else:
            diag = final = diagnosis.check(model, x, loss_fn, args.seed, **kw)
    except diagnosis.ProbeError as e:
        raise UsageError(f"{e}; check the example input (--input-shape, --input-dtype, example_input()) "
                         f"and that the model runs") from e
    if args.save_fixed:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, args.save_fixed)
    if args.tensorboard:
        from .report.tensorboard import write_diagnosis

        runs = write_diagnosis(diag, args.tensorboard)
        # stderr: stdout may be the JSON report
        sys.stderr.write(f"initdoctor: TensorBoard runs written to {', '.join(runs)}\n"
                         f"  view them with: tensorboard --logdir {args.tensorboard}\n")
    if args.plot:
        from .report.plots import depth_profile

        fig = depth_profile(diag, diag.after)
        fig.savefig(args.plot, dpi=120, bbox_inches="tight")
    out = sys.stdout if not args.output else None
    if args.format == "json":
        from .report import to_json

        text = to_json(diag) + "\n"
    elif args.format == "markdown":
        from .report.markdown import render

        text = render(diag)
    else:
        from .report.text import render, use_color

        text = render(diag, color=out is not None and not args.no_color and use_color(out))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as fh:
            fh.write(text)
    else:
        sys.stdout.write(text)
    if args.fail_on == "never":
        return 0
    return 1 if final.problems(args.fail_on) else 0


def _explain(args) -> int:
    from .codes import page
    from .loading import UsageError

    try:
        sys.stdout.write(page(args.code))
    except KeyError as e:
        raise UsageError(str(e.args[0])) from e
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    debug = getattr(args, "debug", False)
    try:
        return _check(args) if args.command == "check" else _explain(args)
    except KeyboardInterrupt:
        sys.stderr.write("initdoctor: interrupted\n")
        return 2
    except Exception as e:  # every failure is one clear line; --debug shows where
        from .loading import UsageError

        if debug:
            traceback.print_exc()
        if isinstance(e, UsageError):
            msg = str(e)
        elif isinstance(e, OSError):
            msg = f"{e.strerror or e}: {e.filename or ''}".strip(": ")
        else:
            msg = f"internal error {type(e).__name__}: {e}; please report it with --debug output"
        sys.stderr.write(f"initdoctor: {msg.splitlines()[0] if msg else type(e).__name__}\n")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
