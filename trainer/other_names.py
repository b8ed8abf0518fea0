"""Keras's and Lightning's argument names met in ``Trainer``, ``fit``, ``evaluate`` and ``predict``: a clear
``TypeError`` saying what this library calls them, where Python's own says only "unexpected keyword"."""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Mapping

ARRAYS = "ArrayLoader({'x': x, 'label': y}, batch_size=32)"
POSITIONAL = "(positional)"  # the hint for more positional arguments than the method takes

TRAINER = {
    "epochs": "max_epochs=N (Keras's epochs)",
    "steps": "max_steps=N",
    "max_iters": "max_steps=N",
    "loss": "loss_fn=... (a function (model, batch) -> loss, e.g. losses.supervised(losses.mse))",
    "metrics": "loss_fn=... returning (loss, {name: value}), or an override of Trainer.compute_metrics",
    "lr": "the optimizer's learning rate: OptimConfig(learning_rate=...).build(total_steps) or optax.adam(lr)",
    "learning_rate": "the optimizer's learning rate: OptimConfig(learning_rate=...).build(total_steps) or optax.adam(lr)",
    "batch_size": f"the data's batch size: {ARRAYS}",
    "validation_data": "fit(train_data, eval_data=...)",
    "eval_data": "fit(train_data, eval_data=...)",
}
FIT = {
    "epochs": "Trainer(..., max_epochs=N) (or trainer.max_epochs = N before fit)",
    "max_epochs": "Trainer(..., max_epochs=N) (or trainer.max_epochs = N before fit)",
    "validation_data": "eval_data=...",
    "val_dataloaders": "eval_data=...",
    "val_data": "eval_data=...",
    "batch_size": f"the data's batch size: fit({ARRAYS})",
    "x": f"fit takes batches: fit({ARRAYS})",
    "y": f"fit takes batches: fit({ARRAYS})",
    "ckpt_path": "resume=<the checkpoint's path>",
    "callbacks": "Trainer(..., callbacks=[...])",
    "verbose": "callbacks: ProgressBar(), MetricsLogger([ConsoleWriter()])",
    "steps_per_epoch": "max_steps=N on the Trainer (an epoch is one pass over the data)",
    POSITIONAL: f"fit takes batches, and the evaluation data as eval_data: fit({ARRAYS}, eval_data=...)",
}
EVALUATE = {
    "x": "the data as one argument: (x, y), {'x': x, 'label': y}, or x",
    "y": "the data as one argument: (x, y), {'x': x, 'label': y}, or x",
    "verbose": "callbacks (on_eval_end), or print the returned dict",
    "steps": "a list of the batches to use, or a shorter ArrayLoader",
    "return_dict": "nothing: evaluate returns a dict",
    POSITIONAL: "pass the data as one argument ((x, y), {'x': x, 'label': y}, or x) and batch_size by name",
}
PREDICT = {
    "x": "the inputs as the one argument: predict(x, batch_size=32)",
    "verbose": "nothing: predict prints nothing",
    "steps": "a list of the batches to use, or a shorter ArrayLoader",
    POSITIONAL: "pass the inputs as one argument and batch_size by name: predict(x, batch_size=32)",
}


def other_names(hints: Mapping[str, str]) -> Callable[[Callable], Callable]:
    """Decorates a method so that a keyword it lacks which ``hints`` knows, or data passed as two
    positional arguments (Keras's ``evaluate(x, y)``), fails with what to write instead."""
    def wrap(method: Callable) -> Callable:
        params = inspect.signature(method).parameters
        positional = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params.values())
        where = method.__qualname__.replace(".__init__", "")

        @functools.wraps(method)
        def checked(*args: Any, **kwargs: Any) -> Any:
            for name in kwargs:
                if name not in params and name in hints:
                    raise TypeError(f"{where}() got an unexpected keyword argument {name!r}: here it is "
                                    f"{_sentence(hints[name])}")
            if len(args) > positional and POSITIONAL in hints:
                raise TypeError(f"{where}() takes {positional - 1} positional argument(s) but got {len(args) - 1}: "
                                f"{_sentence(hints[POSITIONAL])}")
            return method(*args, **kwargs)

        return checked

    return wrap


def _sentence(text: str) -> str:
    return text if text.endswith(".") else text + "."
