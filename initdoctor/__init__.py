"""initdoctor: diagnose weight-initialization problems in PyTorch models, prescribe and verify a cure.

    import initdoctor
    diagnosis = initdoctor.check(model, example_input)   # never mutates the model
    result = initdoctor.fix(model, example_input)        # applies the plan in place
    with initdoctor.watch(model, log_dir="runs/exp1", every=100) as doctor: ...
"""

from __future__ import annotations

from ._version import __version__
from .diagnosis import Diagnosis, FixResult, ProbeError, check, fix  # noqa: E402
from .watcher import InitDoctorWarning, Watch, watch  # noqa: E402

__all__ = ["Diagnosis", "FixResult", "ProbeError", "__version__", "check", "fix", "watch", "Watch", "plot_history", "InitDoctorWarning"]


def __getattr__(name):
    # matplotlib is imported only where a figure is drawn; keep `import initdoctor` light.
    if name == "plot_history":
        from .report.plots import plot_history

        return plot_history
    raise AttributeError(f"module 'initdoctor' has no attribute {name!r}")
