"""What both callbacks share: the example input taken from a batch, and the check at the start."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from torch import nn

from ..diagnosis import Diagnosis, check
from ..watcher import Watch


def first_input(batch: Any) -> Any:
    """The model's input in a batch: a tensor as is, the first item of a tuple or list, else the batch."""
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    return batch


def check_at_start(model: nn.Module, batch: Any, example_input: Callable[[Any], Any] | None,
                   loss_fn: Callable | None, doctor: Watch, log_dir: str | None, step: int,
                   log: logging.Logger) -> Diagnosis | None:
    """`initdoctor.check` on the first batch: logged, warned through the watch (once per finding),
    and written as its own TensorBoard run `<log_dir>/initdoctor_check/before` by the writing rank."""
    inputs = example_input(batch) if example_input is not None else first_input(batch)
    try:
        diag = check(model, inputs, loss_fn=loss_fn)  # a dict batch is passed as keywords: model(**batch)
    except Exception as e:  # the check is advice: a model it cannot run still trains
        log.warning(f"initdoctor: check_at_start skipped ({e}); give example_input=... to pick the model's "
                    "input from a batch")
        return None
    if not doctor._is_writer_rank():
        return diag
    log.info("initdoctor check on the first batch:\n%s", diag)
    doctor._report(diag.findings)
    if log_dir is not None:
        from ..report.tensorboard import write_diagnosis

        write_diagnosis(diag, os.path.join(log_dir, "initdoctor_check"))
    return diag

