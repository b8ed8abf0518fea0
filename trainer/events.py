"""The ``Callback`` base class and the one generic dispatcher that runs callbacks in list order.

Every hook takes the trainer first; callbacks are built without a trainer and can be reused.
A callback steers through the trainer (``trainer.should_stop = True``), never by poking the loop.

Example::

    class StopAtLoss(Callback):
        def on_epoch_end(self, trainer, epoch, logs):
            if logs["loss"] < 0.1:
                trainer.should_stop = True
"""

from __future__ import annotations

import collections.abc
import inspect
import warnings
import weakref
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from trainer.trainer import Trainer

EVENTS = (
    "on_fit_start", "on_epoch_start", "on_step_start", "on_step_end", "on_eval_start",
    "on_eval_end", "on_epoch_end", "on_checkpoint_save", "on_checkpoint_restore",
    "on_exception", "on_fit_end",
)


class DefaultInterval(int):
    """A step interval left at its default: with ``steps_per_execution=K`` the trainer rounds it up
    to the next multiple of ``K`` (``ProgressBar()``'s 10 steps become 32 at ``K=32``), where an
    interval a user set must be a multiple of ``K`` or is refused. An ``int`` everywhere else.

    A callback declares one as the default of its argument: ``every: int = DefaultInterval(100)``.
    """

    base: int  # the default as declared, what every rounding starts from

    def __new__(cls, value: int, base: int | None = None) -> "DefaultInterval":
        interval = super().__new__(cls, value)
        interval.base = int(value) if base is None else base
        return interval

    def fit_to(self, k: int) -> "DefaultInterval":
        """This default rounded up to a multiple of ``k`` (from the declared default, not a past rounding)."""
        return DefaultInterval(-(-self.base // k) * k, base=self.base)


class Callback:
    """Base class with a no-op method for every event; override the ones you need.

    Hooks and what they receive (after the trainer):

    - ``on_fit_start()`` / ``on_fit_end()``: once per ``fit``; ``on_fit_end`` also after a stop
      requested through ``trainer.should_stop`` (not after an exception).
    - ``on_epoch_start(epoch)``: ``epoch`` is 0-based.
    - ``on_step_start(step)`` / ``on_step_end(step, metrics)``: ``step`` is the 1-based number of
      the optimizer step (``trainer.step`` equals it once the step has run); ``metrics`` is a dict
      of *device* scalars: read them on your own cadence (``float()`` blocks on the device). With
      ``Trainer(steps_per_execution=K)`` they run once per chunk: ``on_step_start`` gets the chunk's
      first step, ``on_step_end`` its last, and each metric is an array with one value per step of
      the execution (``trainer.execution_steps`` of them; ``last_value`` reads the final one).
    - ``on_eval_start()`` / ``on_eval_end(metrics)``: ``metrics`` are host floats, prefixed as the
      evaluation was asked (``eval/loss`` inside ``fit``). An epoch's evaluation comes before its
      ``on_epoch_end``.
    - ``on_epoch_end(epoch, logs)``: ``logs`` holds the epoch's mean train metrics and, when an
      evaluation ran, its metrics. What a callback adds to ``metrics`` / ``logs`` (a derived metric)
      later callbacks see, and the evaluation's result and ``history`` keep.
    - ``on_checkpoint_save(checkpoint)`` / ``on_checkpoint_restore(checkpoint)``: the dict written
      or read; a resume that found no checkpoint restores step 0, ``{"step": 0, "fresh_start": True}``
      (forget what a run that left no checkpoint wrote). A save is written afterwards, in the background with ``Checkpoint(async_save=True)``:
      in the dict ``on_checkpoint_save`` gets, the arrays' ``crc32`` are ``None`` (the write computes
      them on its own copy) and the files may not be committed yet.
    - ``on_exception(exception)``: an error escaped ``fit``; it is re-raised after every callback.

    ``state_dict()`` / ``load_state_dict()`` carry a callback's own state through checkpoints, under
    ``state_key``: by default the class name (``#2``, ``#3`` for later ones of the class); a callback
    used more than once (two ``Evaluator``s) names each instance, so that removing one on a resume
    hands no other its state (Lightning's ``Callback.state_key``).

    ``step_interval_attributes`` names the attributes holding step intervals (``("every",)``);
    the trainer refuses intervals that are not multiples of ``steps_per_execution``, and rounds up
    those left at a ``DefaultInterval`` default.
    """

    step_interval_attributes: tuple[str, ...] = ()
    state_key: str | None = None  # None: the class name; a str (a property, say) names this instance's state

    def step_intervals(self) -> dict[str, int]:
        """This callback's step intervals by name (from ``step_interval_attributes``; ``None`` ones left out)."""
        names = self.step_interval_attributes
        if isinstance(names, str) or not all(isinstance(n, str) for n in names):
            example = f", e.g. ({names!r},)" if isinstance(names, str) else ""
            raise TypeError(f"{type(self).__name__}.step_interval_attributes = {names!r} must be a tuple of attribute "
                            f"names{example}.")
        missing = [n for n in names if not hasattr(self, n)]
        if missing:
            raise AttributeError(f"{type(self).__name__}.step_interval_attributes names {missing}, which it does not "
                                 "have: name the attributes that hold its step intervals.")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def on_fit_start(self, trainer: "Trainer") -> None:
        """Before the first step of ``fit`` (a resume restores after it); the workdir exists."""
    def on_epoch_start(self, trainer: "Trainer", epoch: int) -> None:
        """At an epoch's start; ``epoch`` is 0-based."""
    def on_step_start(self, trainer: "Trainer", step: int) -> None:
        """Before an execution (one step, or a chunk of ``steps_per_execution``) is dispatched; ``step`` its first, 1-based."""
    def on_step_end(self, trainer: "Trainer", step: int, metrics: Mapping[str, Any]) -> None:
        """After an execution is dispatched: ``metrics`` are device arrays (stacked over a chunk); read them at an interval."""
    def on_eval_start(self, trainer: "Trainer") -> None:
        """Before an evaluation (``trainer.eval_prefix`` names it)."""
    def on_eval_end(self, trainer: "Trainer", metrics: Mapping[str, float]) -> None:
        """After an evaluation: host floats, prefixed; a metric added here is kept."""
    def on_epoch_end(self, trainer: "Trainer", epoch: int, logs: Mapping[str, float]) -> None:
        """At an epoch's end: the epoch's means and its evaluation's metrics, host floats (``history``'s row)."""
    def on_checkpoint_save(self, trainer: "Trainer", checkpoint: dict) -> None:
        """A checkpoint is being saved: add JSON-able entries to ``checkpoint`` (``state_dict`` is saved already)."""
    def on_checkpoint_restore(self, trainer: "Trainer", checkpoint: dict) -> None:
        """A checkpoint was restored (a resume, a rollback): ``checkpoint`` is what the save held."""
    def on_exception(self, trainer: "Trainer", exception: BaseException) -> None:
        """``fit`` is failing with ``exception`` (re-raised unchanged after every callback saw it)."""
    def on_fit_end(self, trainer: "Trainer") -> None:
        """After the last step of ``fit`` (also after a stop request; not after an exception)."""

    def state_dict(self) -> dict[str, Any]:
        """This callback's state to checkpoint (plain Python / numpy values); empty by default."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""


def last_value(value: Any) -> np.ndarray:
    """The final step's value of a host metric read from ``on_step_end`` (scalar or one per step)."""
    return np.asarray(value).reshape(-1)[-1]


# Hook names of Keras and Lightning, and what they are called here.
OTHER_NAMES = {"on_train_begin": "on_fit_start", "on_train_start": "on_fit_start", "on_train_end": "on_fit_end",
               "on_epoch_begin": "on_epoch_start", "on_train_epoch_start": "on_epoch_start",
               "on_train_epoch_end": "on_epoch_end", "on_batch_begin": "on_step_start",
               "on_train_batch_begin": "on_step_start", "on_train_batch_start": "on_step_start",
               "on_batch_end": "on_step_end", "on_train_batch_end": "on_step_end",
               "on_test_begin": "on_eval_start", "on_validation_start": "on_eval_start",
               "on_test_end": "on_eval_end", "on_validation_end": "on_eval_end",
               "on_validation_epoch_end": "on_eval_end", "on_save_checkpoint": "on_checkpoint_save",
               "on_load_checkpoint": "on_checkpoint_restore"}
_WARNED_CLASSES: "weakref.WeakSet[type]" = weakref.WeakSet()


def warn_unknown_hooks(callback: Callback) -> None:
    """Warns (once per class, and once per instance for functions set on it under another framework's event name,
    or any on a plain ``Callback``) about ``on_*`` methods that are no event here, so never called: a typo or
    another framework's name (``on_train_end``: here ``on_fit_end``)."""
    cls = type(callback)
    unknown = []
    if cls not in _WARNED_CLASSES:
        _WARNED_CLASSES.add(cls)
        unknown = [(cls.__name__, name) for klass in cls.__mro__ if klass is not Callback and klass is not object
                   for name, value in vars(klass).items()
                   if name.startswith("on_") and callable(value) and name not in EVENTS]
    own = sorted(name for name, value in getattr(callback, "__dict__", {}).items()  # another framework's event, or
                 if name.startswith("on_") and callable(value) and name not in EVENTS  # any on a plain Callback (a
                 and (name in OTHER_NAMES or cls is Callback))  # class of one's own may keep a function it calls)
    if own and _warned_instances.get(id(callback)) != own:  # set on this instance (cb.on_batch_end = ...)
        _warned_instances[id(callback)] = own
        try:
            weakref.finalize(callback, _warned_instances.pop, id(callback), None)
        except TypeError:  # a class with __slots__ and no __weakref__: its entry stays
            pass
        unknown += [(f"this {cls.__name__}", name) for name in own]
    for owner, name in dict.fromkeys(sorted(unknown)):
        hint = f"; its event here is {OTHER_NAMES[name]}" if name in OTHER_NAMES else f"; the events are {list(EVENTS)}"
        warnings.warn(f"{owner}.{name} is not a trainer event, so it is never called{hint}.", stacklevel=4)


_warned_instances: dict[int, list[str]] = {}  # id -> the unknown hook names warned about (forgotten with it)


def check_hook_signatures(callback: Callback) -> None:
    """Refuses, when the callback list is built, an event method that cannot take the event's arguments
    (``on_step_end(self, trainer)``, say), instead of failing when the event first fires (an epoch, or a
    whole run, later)."""
    for event in EVENTS:
        if event not in vars(callback) and getattr(type(callback), event) is getattr(Callback, event):
            continue  # the base class's no-op
        hook = getattr(callback, event)
        expected = list(inspect.signature(getattr(Callback, event)).parameters)[1:]  # trainer, then the event's
        try:
            first = next(iter(inspect.signature(hook).parameters), None)
            if first in _NOT_THE_TRAINER:  # Keras's on_epoch_begin(self, epoch, logs=None): it would get the
                raise TypeError(f"its first argument {first!r} would get the trainer (hooks here take the "  # trainer
                                "trainer first, then the event's arguments)")
            inspect.signature(hook).bind(*expected)
        except TypeError as err:
            raise TypeError(f"{type(callback).__name__}.{event}{inspect.signature(hook)} cannot be called as "
                            f"{event}({', '.join(expected)}): {err}.") from None
        except ValueError:  # a builtin or C function without a signature: called as it is
            continue


_NOT_THE_TRAINER = {"epoch", "batch", "logs", "step", "metrics", "checkpoint", "exception"}  # other events' arguments


class CallbackList:
    """Runs one event on every callback that defines it, in list order.

    Which callbacks define an event (override the base class's no-op, on the class or the instance)
    is worked out once per event and list of callbacks: a step's two events then cost a call per
    callback that does something, not one per callback (on a GPU the loop's host time is the step's).
    """

    def __init__(self, callbacks: Iterable[Callback] | Callback = ()):
        if isinstance(callbacks, Callback):
            callbacks = [callbacks]
        elif not isinstance(callbacks, collections.abc.Iterable):
            raise TypeError(f"callbacks must be a list of Callback instances; got {type(callbacks).__name__}.")
        self.callbacks = list(callbacks)
        self._listeners: dict[str, list[Callback]] = {}
        self._listeners_of: tuple[Callback, ...] = ()
        self.check()

    def check(self) -> None:
        """Refuses what is no callback or has an event method that cannot take its event's arguments, warns
        of methods that are no event, and forgets which callbacks define each event. Run when the list is
        built and when ``fit`` starts: callbacks appended since, and hooks set on an instance since, count."""
        for cb in self.callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(
                    f"callbacks must be Callback instances; got {type(cb).__name__}. "
                    "Subclass callbacks.Callback (and pass an instance, not the class)."
                )
            warn_unknown_hooks(cb)
            check_hook_signatures(cb)
        self._listeners, self._listeners_of = {}, tuple(self.callbacks)

    def dispatch(self, event: str, trainer: "Trainer", *args: Any) -> None:
        """Calls ``event`` on every callback that defines it, in list order."""
        for cb in self.listeners(event):
            getattr(cb, event)(trainer, *args)

    def dispatch_all(self, event: str, trainer: "Trainer", *args: Any) -> list[Exception]:
        """Calls ``event`` on every callback that defines it even when one raises; returns the errors
        (for the events that end a run: one failing plot must not skip the final checkpoint)."""
        errors = []
        for cb in self.listeners(event):
            try:
                getattr(cb, event)(trainer, *args)
            except Exception as err:  # noqa: BLE001 - raised again by the caller, after the others ran
                errors.append(err)
        return errors

    def listeners(self, event: str) -> list[Callback]:
        """The callbacks that define ``event``, in list order (recomputed when the list changes)."""
        current = tuple(self.callbacks)
        if len(current) != len(self._listeners_of) or any(a is not b for a, b in zip(current, self._listeners_of)):
            self._listeners, self._listeners_of = {}, current  # by identity: equal callbacks (dataclasses) may differ
        found = self._listeners.get(event)
        if found is None:
            base = getattr(Callback, event)
            found = self._listeners[event] = [cb for cb in current
                                              if event in getattr(cb, "__dict__", ()) or getattr(type(cb), event) is not base]
        return found
