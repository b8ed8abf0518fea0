"""``Evaluator``: runs the compiled eval step over a dataset every N steps and/or N epochs.

It lives beside the engine (``callbacks`` re-exports it) because ``fit(eval_data=...)`` is sugar
for ``Evaluator(eval_data)``, and the trainer runs every due epoch evaluation *before*
``on_epoch_end``, so that every callback's ``on_epoch_end`` sees the epoch's eval metrics.

Example::

    Trainer(model, tx, max_epochs=10,  # Evaluator is importable from callbacks too
            callbacks=[Evaluator(val_loader, every_n_steps=500, every_n_epochs=None)])
"""

from __future__ import annotations

import collections.abc
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from trainer.data import check_batch_source, warn_if_rows_left_out
from trainer.events import Callback

if TYPE_CHECKING:  # pragma: no cover
    from trainer.trainer import Trainer


class Evaluator(Callback):
    """Evaluates ``data`` on a cadence; metrics go to ``on_eval_end`` and ``trainer.eval_metrics``.

    Args:
      data: an iterable of batches (an ``ArrayLoader(..., shuffle=False, drop_remainder=False)``);
        the last, smaller batch is padded and masked, so every example counts exactly once.
      every_n_steps: also evaluate after every N-th optimizer step (``None``: never by steps).
      every_n_epochs: evaluate at the end of every N-th epoch (``None``: never by epochs).
      prefix: put before every metric name (``eval/loss``).

    ``last_metrics`` holds the newest result, ``history`` every ``(step, metrics)``. Its checkpointed
    state is keyed by ``prefix`` (``state_key``): a second evaluator (``prefix="test/"``) keeps its own.
    """

    step_interval_attributes = ("every_n_steps",)

    @property
    def state_key(self) -> str:
        """The key of its checkpointed state: class and prefix, so two evaluators keep their own."""
        return f"{type(self).__name__}[{self.prefix}]"

    def __init__(self, data: Iterable[Any], *, every_n_steps: int | None = None,
                 every_n_epochs: int | None = 1, prefix: str = "eval/"):
        for name, value in (("every_n_steps", every_n_steps), ("every_n_epochs", every_n_epochs)):
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name}={value!r} must be a positive integer or None.")
        if every_n_steps is None and every_n_epochs is None:
            raise ValueError("Evaluator needs every_n_steps or every_n_epochs; both are None.")
        if data is None or not hasattr(data, "__iter__"):
            raise TypeError(f"Evaluator needs data, an iterable of batches (an ArrayLoader); got {type(data).__name__}.")
        check_batch_source(data, "Evaluator's data")
        warn_if_rows_left_out(data, "Evaluator's data")
        if isinstance(data, collections.abc.Iterator):  # a generator: used up by the first evaluation
            raise TypeError(f"Evaluator's data is a one-pass {type(data).__name__}, but every evaluation iterates "
                            "it again; pass a list of batches or an ArrayLoader.")
        if not isinstance(prefix, str):
            raise TypeError(f"prefix={prefix!r} must be a string (such as 'eval/').")
        self.data = data
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs
        self.prefix = prefix
        self.last_metrics: dict[str, float] = {}
        self.last_step: int | None = None
        self.history: list[tuple[int, dict[str, float]]] = []
        self._redo = False  # the evaluation due at a restored step had not finished (a preemption inside it)

    def run(self, trainer: "Trainer") -> dict[str, float]:
        """Evaluates now and records the result."""
        self.last_metrics = trainer.evaluate(self.data, prefix=self.prefix)
        self.last_step = trainer.step
        self.history.append((trainer.step, dict(self.last_metrics)))
        return self.last_metrics

    def due_at_epoch_end(self, epoch: int) -> bool:
        """Whether an evaluation is due at the end of epoch ``epoch`` (``every_n_epochs``)."""
        return self.every_n_epochs is not None and (epoch + 1) % self.every_n_epochs == 0

    def on_step_end(self, trainer: "Trainer", step: int, metrics: Mapping[str, Any]) -> None:
        if self.every_n_steps is not None and step % self.every_n_steps == 0:
            self.run(trainer)

    def on_fit_start(self, trainer: "Trainer") -> None:
        if trainer.step == 0:  # a fresh run (a sweep reusing it; a resume restores after this): the last run's
            self.last_metrics, self.last_step, self.history = {}, None, []  # step-4 result is not this one's

    def on_checkpoint_restore(self, trainer: "Trainer", checkpoint: dict) -> None:
        step = trainer.step  # a checkpoint taken while the step's evaluation ran (a preemption) holds no result
        self._redo = (bool(self.every_n_steps) and step > 0 and step % self.every_n_steps == 0
                      and self.last_step != step and all(at != step for at, _ in self.history))  # (redone already)

    def on_epoch_start(self, trainer: "Trainer", epoch: int) -> None:
        if self._redo:  # before the resumed run's first step, as the run never stopped would have
            self._redo = False
            self.run(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step, "last_metrics": dict(self.last_metrics)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.last_step = state.get("last_step")
        self.last_metrics = dict(state.get("last_metrics", {}))


def refuse_shared_prefixes(evaluators: list[Evaluator], from_fit: Evaluator | None) -> None:
    """Two evaluators of one ``prefix`` wrote the same metric names: the epoch's row kept one's numbers
    and the logs had both at one step. Refused when ``fit`` starts, naming them."""
    seen: dict[str, Evaluator] = {}
    for evaluator in evaluators:
        first = seen.setdefault(evaluator.prefix, evaluator)
        if first is not evaluator:
            def name(e: Evaluator) -> str:
                return "fit(eval_data=...)" if e is from_fit else f"Evaluator({type(e.data).__name__})"
            raise ValueError(f"{name(first)} and {name(evaluator)} both report under prefix {evaluator.prefix!r}: "
                             "their metrics would overwrite each other in history and the logs. Give one another "
                             "prefix, e.g. Evaluator(test_data, prefix='test/').")
