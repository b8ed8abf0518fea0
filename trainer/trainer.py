"""``Trainer``: owns the split state, the compiled steps and the epoch loop, and dispatches events.

Example::

    trainer = Trainer(model, optax.adamw(1e-3), max_epochs=3)
    trainer.fit(ArrayLoader({"image": x, "label": y}, 128), eval_data=test_loader)
    trainer.evaluate(test_loader)   # {"loss": ..., "accuracy": ...}
"""

from __future__ import annotations

import collections.abc
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import jax
import optax
from flax import nnx

from trainer import losses
from trainer import checkpoint as checkpointing, resume as resuming
from trainer import export
from trainer.build import check_intervals, check_labels
from trainer.carry import Carry
from trainer.checkpoint import Checkpoint
from trainer.evaluation import Evaluator
from trainer.events import Callback, CallbackList
from trainer.data import batches_of
from trainer.example_means import library_loss
from trainer.inference import check_eval_data_fits, run_evaluation, run_prediction
from trainer.feed import CompiledShapes
from trainer.loop import EPOCH_SUMS, end_fit, finish_partial_epoch, has_partial_row, run_epoch
from trainer.module_link import ModuleLink, before_another_trainer, lend_model
from trainer.other_names import EVALUATE, FIT, PREDICT, TRAINER, OtherAttributeNames, other_names
from trainer.options import check_fit_inputs, check_options, prefetch_setting, recorded_number, warn_if_loss_fn_unused
from trainer.optim import current_learning_rate
from trainer.packing import Packed
from trainer.preemption import PreemptionHandler, Preempted
from trainer.state import TrainState, reseed_streams, zeros_like_tree
from trainer.step import Probe, init_guard, per_example_metrics
from trainer.sums import Sums, empty_sums, sums_snapshot
from trainer.user_warnings import warn


class Trainer(OtherAttributeNames):
    """Trains an ``nnx.Module`` with an optax optimizer; callbacks react to its events.

    Args:
      model: the ``nnx.Module`` to train. It is updated in place: after ``fit`` (or when
        ``trainer.model`` is read) it holds the trained state.
      optimizer: an ``optax.GradientTransformation`` (see ``trainer.optim`` to build one); ``None``: a Trainer
        that only evaluates and predicts (``fit`` refused; no ``max_epochs`` / ``max_steps`` needed).
      loss_fn: ``(model, batch) -> loss`` or ``-> (loss, metrics)``, a scalar batch mean. Default:
        cross-entropy on integer labels plus accuracy (``losses.default_loss``). Or override
        ``compute_loss``.
      callbacks: ``Callback`` instances (a list, or one), run in this order for every event.
      max_epochs: stop after this many epochs in total (counting earlier ``fit`` calls).
      max_steps: stop after this many optimizer steps in total. At least one limit is required to train.
      seed: reseeds every RNG stream of the model (dropout, augmentation) with ``nnx.reseed``, so the
        training randomness is the trainer's: the same seed gives the same run.
      workdir: folder for run outputs (logs, checkpoints, plots); ``None`` writes nothing.
      config: plain values describing the run (hyperparameters), handed to writers and checkpoints.
      steps_per_execution: run this many steps per dispatch: ``K`` batches stacked and scanned in one
        compiled program (``lax.scan``), bitwise the same parameters and optimizer state as ``K`` single
        steps (a step's reported loss may differ in its last bit). Hooks run at
        chunk boundaries (``on_step_start`` gets a chunk's first step, ``on_step_end`` its last, with
        every metric stacked: one value per step), so every callback step interval must be a multiple
        of ``K`` (checked here). Chunks start at steps that are multiples of ``K``; batches left over
        at an epoch's end (or before ``max_steps``) run as single steps.
      prefetch: batches (or chunks) a background thread keeps ready on the device; 0 loads them in
        the loop's own thread (dispatch is asynchronous, so that overlaps with the device's work
        already, and no thread competes for the GIL). ``"auto"``: the loop's thread, moving to a thread
        of depth 2 if the loop sat blocked waiting for data more than 30% of its first 0.25 s (a disk,
        a sleep; ``prefetch_in_use`` says which once decided).
      ragged_batches: a batch smaller than the first (an epoch's last) is ``"drop"``-ped (with a
        warning), or ``"pad"``-ded to full size with a boolean ``batch["mask"]`` of real rows, which
        the built-in losses (``trainer.losses.supervised``) honour; a custom loss must weight by it.
        Either way the step compiles once.
      cpu_tuning: on CPU, build the step as measured fastest there (``benchmarks/HISTORY.md``): kernel
        gradients of convolutions and of dense layers on sequences as matrix products, large dropout
        draws hashed with JAX's unrolled threefry (the same bits), convolutional chunks unrolled, a
        small model's chunk checked for non-finite steps once. Each is announced once on stderr and
        listed in ``cpu_settings``; ``False`` builds XLA's and JAX's own forms.
      dispatch_ahead: executions (steps, or chunks) the loop may have dispatched and not yet seen
        finished; past that it waits until half as many are. Without a bound the loop runs up to
        JAX's own queue (~32 executions on CPU) ahead of the device: progress and hooks report steps
        not yet run, a stop waits for the whole queue, each queued step holds its batch. ``None``: no
        bound of the trainer's own.

    Attributes:
      step: optimizer steps completed. ``epoch``: index of the current epoch (= epochs completed
      once it ended). ``should_stop``: set it (or call ``request_stop``) in any hook to end ``fit``
      after the current step. ``history``: one dict of metrics per epoch; an epoch that ``fit`` left
      unfinished (``max_steps``, a stop) has its means so far and ``partial_epoch: True`` until it ends.
      ``eval_metrics``: the last evaluation's metrics. ``execution_steps``: steps the last dispatch
      ran (1, or ``steps_per_execution`` for a chunk). ``last_batch_size`` / ``last_examples``: real
      examples in the last batch / the last execution. ``data_wait_seconds``: time the loop waited
      for data. ``compile_seconds``: time spent tracing and compiling the train step (each shape met).
      ``cpu_settings``: what ``cpu_tuning`` changed in the train step, one sentence each.

    A second ``fit`` on the same trainer continues the run: up to the same ``max_epochs`` /
    ``max_steps`` totals (raise them to train longer), and after a stop in the middle of an epoch
    it resumes that epoch at the next batch when the data is an ``ArrayLoader`` (other iterables
    cannot seek and start a fresh pass). A new ``Trainer`` always starts at epoch 0, batch 0.
    """

    @other_names(TRAINER)
    def __init__(
        self,
        model: nnx.Module,
        optimizer: optax.GradientTransformation | None = None,
        *,
        loss_fn: Callable[[nnx.Module, Any], Any] | None = None,
        callbacks: Iterable[Callback] = (),
        max_epochs: int | None = None,
        max_steps: int | None = None,
        seed: int = 0,
        workdir: str | Path | None = None,
        config: Mapping[str, Any] | None = None,
        steps_per_execution: int = 1,
        prefetch: int | str = "auto",
        ragged_batches: str = "drop",
        cpu_tuning: bool = True,
        dispatch_ahead: int | None = 4,
    ):
        check_options(model, optimizer, max_epochs=max_epochs, max_steps=max_steps,
                      steps_per_execution=steps_per_execution, prefetch=prefetch,
                      ragged_batches=ragged_batches, cpu_tuning=cpu_tuning, dispatch_ahead=dispatch_ahead,
                      config=config)
        self.max_epochs, self.max_steps = max_epochs, max_steps
        self.steps_per_execution = int(steps_per_execution)
        self.prefetch = prefetch_setting(prefetch)
        self.dispatch_ahead = None if dispatch_ahead is None else int(dispatch_ahead)
        self._in_flight: collections.deque = collections.deque()  # one output of each execution in flight
        self.prefetch_in_use: int | None = None  # what "auto" chose (0: the loop's thread)
        self._prefetch_probe: dict[str, float] = {}  # "auto"'s measurement so far, over epochs shorter than it
        self.ragged_batches = ragged_batches
        self.cpu_tuning = cpu_tuning
        self.cpu_settings: list[str] = []  # what cpu_tuning applied to the current train step
        self._announced: set[str] = set()
        self.loss_fn = loss_fn
        warn_if_loss_fn_unused(self)
        self.tx = optimizer
        self.callbacks = CallbackList(callbacks)
        check_intervals(self)
        self.seed = int(seed)
        self.workdir = Path(workdir) if workdir is not None else None
        self.config = dict(config or {})
        reseed_streams(model, self.seed)
        self._carry = Carry()  # state and running sums, flat between steps (see trainer.carry)
        self.step = 0
        self._step_handed_out: tuple = (None, None)  # the step array last read with trainer.state, at what step
        before_another_trainer(model)  # writes into it that earlier Trainers of it have not taken yet: kept for them
        self.graphdef, self.state = TrainState.create(model, optimizer or optax.identity(), own_arrays=True)
        self._link = ModuleLink(model, self.state)  # the module, and the arrays put into it: parameters written there are trained
        self._state_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), self.state)
        self.epoch = 0
        self.should_stop, self.stop_reason = False, None  # a stop asked for, and why (request_stop)
        self.preempted = False  # this fit ends on a preemption signal, its state checkpointed: a resume goes on
        self.history: list[dict[str, float]] = []
        self.eval_metrics: dict[str, float] = {}
        self.eval_prefix = ""  # the prefix of the evaluation under way (or last run)
        self.fitting = False  # True while fit trains: from before on_fit_start; False again by on_fit_end
        self.resuming = False  # this fit was asked to resume (fit(resume=...)): set before on_fit_start
        self.probes: list[Probe] = []
        self.metric_reductions: dict[str, str] = {}
        self.pending_logs: dict[str, tuple[int, float]] = {}  # name -> (step recorded at, value)
        self.data_wait_seconds = 0.0
        self.compile_seconds = 0.0
        self.last_batch_size = self.last_examples = 0
        self.execution_steps = 1
        self.compiled_batch_size: int | None = None
        self._compiled_shapes = CompiledShapes()  # the train batches' shapes, checked on the host
        self._halt_after: int | None = None
        self.position = 0  # batches consumed in the current epoch
        self.restored_data_state: dict | None = None
        self.restored_epoch_sums: dict | None = None
        self.restored_window_sums: dict | None = None  # other readers' sums a checkpoint held (loggers' windows)
        self.skip_batches: set[tuple[int, int]] = set()  # (epoch, position) never to train on
        self._rollback_request: int | None = None
        self.step_positions: dict[int, tuple[int, int]] = {}  # recent step -> (epoch, position)
        self._preemption = PreemptionHandler()
        self._metric_shapes: dict[str, Any] | None = None
        self._fit_evaluators: list[Evaluator] = []
        self._train_steps = None
        self._compiled: set = set()
        self._built_signature: Any = None
        self._eval_step = self._eval_sums = self._predict_step = None
        self._eval_sums_shapes: dict = {}  # evaluated batch shapes -> their sums' shapes (traced once each)
        self._example_means_checked = False  # the first evaluation compares its metrics with whole-batch ones
        self._output_shapes: dict[tuple, tuple] = {}  # the model's output shape by the batch's shapes (label checks)
        self.data_iterator: Iterator[Any] | None = None
        self.epoch_length: int | None = None

    # ----- what users override -------------------------------------------------------------

    def compute_loss(self, model: nnx.Module, batch: Any) -> Any:
        """The training loss: ``loss`` or ``(loss, metrics)`` for one batch (traced, on device)."""
        return (self.loss_fn or losses.default_loss)(model, batch)

    def compute_metrics(self, model: nnx.Module, batch: Any) -> Mapping[str, jax.Array]:
        """Evaluation metrics for one batch: per-example arrays ``[batch]`` (or scalar means).

        Default: the loss and its metrics, evaluated per example so that padding is masked.
        """
        return per_example_metrics(self.compute_loss, library_loss(self))(model, batch)

    def finish_metrics(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """Host metrics (an evaluation's, an epoch's) before reporting; override to add derived ones."""
        return dict(metrics)

    def predict_step(self, model: nnx.Module, batch: Any) -> Any:
        """The model's output for a batch (default: ``model(inputs)``)."""
        return model(losses.batch_inputs(batch))

    def check_batch(self, batch: Any, where: str) -> None:
        """Host checks of a training batch before it goes to the device; raise to refuse it.

        Runs ahead of the step, in the prefetch thread when there is one (the error surfaces in ``fit``). Default: with the default loss,
        integer labels must lie in ``[0, num_classes)``.
        """
        check_labels(self, batch, where)

    def place_batch(self, batch: Any, *, stacked: bool = False) -> Any:
        """Puts a host batch on the device: ``jax.device_put``; override to shard.

        ``stacked``: a chunk of ``steps_per_execution`` batches, ``[K, batch, ...]`` (its batch axis is 1).
        An override also places ``evaluate`` / ``predict`` batches (padded to the first batch's size).
        """
        return jax.device_put(batch)

    # ----- public state --------------------------------------------------------------------

    @property
    def state(self) -> TrainState:
        """The ``TrainState`` (params, model state, optimizer state, step); assign to replace it.

        Between steps the loop keeps it as flat arrays; reading it rebuilds the structure (cheap,
        but do it at an interval, not every step, in a callback that must stay off the hot path).
        ``trainer.step`` follows an assigned state's ``step``: free for a state made from the one
        last read (``trainer.state.replace(params=...)``), a wait for the device otherwise (a state
        from elsewhere, whose step is read); assign one with another step between fits. A state read
        here is valid until the next step, which reuses (donates) its arrays: keep
        ``jax.tree.map(jnp.copy, trainer.state)`` to assign later; a used-up one is refused.
        """
        state = self._carry.state
        self._step_handed_out = (state.step, self.step)
        return state

    @state.setter
    def state(self, value: TrainState) -> None:
        if any(isinstance(x, jax.Array) and x.is_deleted() for x in jax.tree.leaves(value)):
            raise ValueError("the state assigned to trainer.state holds arrays a later step has reused (the train step "
                             "donates its input buffers, so a state read from trainer.state is valid only until the "
                             "next step). Keep a copy to assign later: saved = jax.tree.map(jnp.copy, trainer.state).")
        same_step = value.step is self._step_handed_out[0] and self._step_handed_out[1] == self.step  # read since the last step
        if hasattr(self, "_link"):  # a write into the module was to the state replaced: the new one wins
            value = self._link.restore(value)
        self._carry.state = value
        if not same_step:  # max_steps, intervals and checkpoints count with trainer.step
            self.step = int(jax.device_get(value.step))

    @property
    def _sums(self) -> dict[str, Sums | None]:  # named running sums of the step metrics
        return self._carry.sums

    @_sums.setter
    def _sums(self, value: dict[str, Sums | None]) -> None:
        self._carry.sums = value

    @property
    def model(self) -> nnx.Module:
        """The model with the current trained state (the object passed in, updated in place).

        Read it again after more training: the next step reuses (donates) the arrays it holds. It is
        updated only when the state changed since the last read, so what calling it changes (dropout's
        RNG counters: Monte-Carlo dropout) is not reset by reading it again. Weights written into it
        (pretrained ones loaded, a callback's edit) are trained (``trainer.module_link``).
        """
        return lend_model(self)

    @property
    def learning_rate(self) -> jax.Array | None:
        """The learning rate of the last step, when the optimizer injects one (``trainer.optim``; several: None)."""
        return current_learning_rate(self.state.opt_state)

    def save_model(self, path: str | Path) -> Path:
        """Writes what inference needs (parameters, batch statistics) and the config to ``path``.

        ``trainer.export.load_model(path, model)`` loads it into a module built the same way.
        """
        return export.save_model(self.model, path, self.config)

    def request_rollback(self, bad_step: int) -> None:
        """Asks the loop to restore the newest checkpoint and skip the batch of ``bad_step``.

        Done at the next step boundary; the skipped batch is replayed never (``skip_batches``).
        """
        if not self.checkpoints:
            raise ValueError("a rollback needs a Checkpoint callback to restore from.")
        self._rollback_request = bad_step

    def request_stop(self, reason: str) -> None:
        """Ends ``fit`` after the current step, recording why."""
        self.should_stop = True
        self.stop_reason = reason

    def add_metric_sums(self, name: str) -> None:
        """Registers named running sums of the step metrics, added up inside the compiled step.

        ``clu.metrics.Average`` per metric (``LastValue`` where ``metric_reductions`` says ``"last"``
        or the name ends in ``_total``); ``take_metric_sums`` reads and restarts them.
        """
        if name not in self._sums:
            self._sums[name] = None if self._metric_shapes is None else empty_sums(self._metric_shapes, self.metric_reductions)

    def take_metric_sums(self, name: str, packed: bool = False) -> Sums | Packed | None:
        """Returns the running sums of ``name`` (device ``clu.metrics``) and restarts them at zero.

        ``packed=True``: the same sums packed on the device (``trainer.packing.Packed``) by the same
        compiled call, for ``callbacks.lagged.LaggedFetch.push``: a logger's window is then one call
        and one device read (where the sums are not packed at the time: the tree, as without it).
        """
        return self._carry.take_sums(name, zeros_like_tree, packed=packed)

    def enable_nonfinite_guard(self, halt_after: int) -> None:
        """Makes every step with a non-finite loss or gradient a no-op on the device.

        After ``halt_after`` such steps in a row the guard halts training on the device (every
        later step is a no-op) and ``state.guard`` records the step, the cause and the learning
        rate; a ``NaNDetector`` reads that at its own interval and raises.
        """
        if not isinstance(halt_after, int) or halt_after < 1:
            raise ValueError(f"halt_after={halt_after!r} must be a positive integer.")
        self._halt_after = halt_after
        if self.state.guard is None:  # not a restore: a weight written into the module is still taken
            self._carry.state = self.state.replace(guard=init_guard())

    def sums_snapshots(self) -> dict[str, dict[str, list[float]]]:
        """Every reader's running sums (``add_metric_sums``) as ``{name: {metric: [total, count]}}``."""
        return {name: sums_snapshot(sums) for name, sums in self._carry.peek_sums().items() if sums is not None}

    def record(self, name: str, value: float) -> None:
        """Hands a host value (throughput, a timing) to the loggers' first window ending at this step or later."""
        self.pending_logs[name] = (self.step, recorded_number(name, value))

    @property
    def checkpoints(self) -> list[Checkpoint]:
        """The ``Checkpoint`` callbacks."""
        return [cb for cb in self.callbacks.callbacks if isinstance(cb, Checkpoint)]

    @property
    def evaluators(self) -> list[Evaluator]:
        """The ``Evaluator`` callbacks, including the one ``fit(eval_data=...)`` adds."""
        return self._fit_evaluators + [cb for cb in self.callbacks.callbacks if isinstance(cb, Evaluator)]

    # ----- fit / evaluate / predict --------------------------------------------------------

    @other_names(FIT)
    def fit(self, train_data: Iterable[Any], eval_data: Iterable[Any] | None = None, *,
            resume: bool | str | Path = False) -> list[dict[str, float]]:
        """Trains until ``max_epochs`` / ``max_steps`` or a stop request; returns a copy of ``history`` as it
        then stands (a later ``fit`` changes ``trainer.history``, not a list an earlier one returned).

        ``train_data`` is an ``ArrayLoader`` or any re-iterable of batches (each epoch iterates it
        again). ``eval_data`` is sugar for an ``Evaluator(eval_data)``: every completed epoch ends
        with an evaluation whose metrics (``eval/loss``, ...) reach ``on_eval_end``, then ``on_epoch_end``.

        ``resume=True`` continues from the newest good checkpoint (of the ``Checkpoint`` callback, or
        ``<workdir>/checkpoints``; none there: a fresh start; neither: refused); a path resumes from that checkpoint
        folder or step and must exist. With a ``Checkpoint`` callback, SIGTERM / SIGINT end the run
        at the next step boundary with a synchronous save, ``on_fit_end``, and ``SystemExit`` with
        code 143 / 130.
        """
        if resume is False and self._limit_reached():
            warn(
                f"fit has nothing to do: the trainer already ran {self.epoch} epochs / {self.step} "
                f"steps (max_epochs={self.max_epochs}, max_steps={self.max_steps}); raise them to train more.",
                stacklevel=2,
            )
            return [dict(row) for row in self.history]
        check_fit_inputs(self, train_data, eval_data, resume)
        self.should_stop, self.stop_reason, self.preempted = False, None, False
        self.add_metric_sums(EPOCH_SUMS)
        if resume is False and self.step == 0:
            resuming.refuse_used_stores(self)
        self._fit_evaluators = [Evaluator(eval_data)] if eval_data is not None else []
        check_eval_data_fits(self)
        if self.checkpoints:
            self._preemption.install()
        self.fitting, self.resuming = True, resume is not False
        try:
            self.callbacks.dispatch("on_fit_start", self)
            if resume is not False:
                resuming.restore(self, resume)
            resuming.refuse_halted(self)
            resumed_at = self.step
            checkpointing.check_callback_states(self)
            while not self._limit_reached() and not self.should_stop:
                run_epoch(self, train_data)
            if self.position and not (self.step == resumed_at and has_partial_row(self)):
                finish_partial_epoch(self, evaluate=not self.should_stop)  # its numbers so far; a finished
                # run resumed keeps the row (and evaluation) it ended with
            if self._preemption.signal:  # arrived after the last step (an epoch's end): saved and exited too
                raise Preempted()
        except Preempted:
            resuming.save_and_exit(self, self._preemption)
        except BaseException as exc:
            for error in self.callbacks.dispatch_all("on_exception", self, exc):
                warnings.warn(f"a callback's on_exception raised {error!r} while handling {exc!r}", RuntimeWarning,
                              stacklevel=2)
            raise
        finally:
            self.fitting = False
            self._preemption.uninstall()
            self._fit_evaluators = []
            lend_model(self, walk=False)  # the caller's module holds the trained state, even after an error
            # (whose place a refusal of changed layers would take: they are checked when fit, evaluate... start)
        end_fit(self)
        return [dict(row) for row in self.history]

    @other_names(EVALUATE)
    def evaluate(self, data: Any, *, prefix: str = "", batch_size: int | None = None) -> dict[str, float]:
        """Mean of ``compute_metrics`` over every example of ``data``, keys prefixed by ``prefix``.

        ``data``: an iterable of batches, or arrays (``{'image': x, 'label': y}``) taken ``batch_size``
        rows at a time (default 32). The last, smaller batch is padded to the first batch's size and
        masked, so every example counts once and one compiled function serves all batches.
        """
        return run_evaluation(self, batches_of(data, batch_size, "evaluate"), prefix)

    @other_names(PREDICT)
    def predict(self, data: Any, *, batch_size: int | None = None) -> Any:
        """``predict_step`` over every batch, concatenated on the host (numpy array or pytree).

        ``data``: an iterable of batches (a list of input arrays works), or arrays (``x``, as Keras's
        ``predict(x)``) taken ``batch_size`` rows at a time (default 32), in order.
        """
        return run_prediction(self, batches_of(data, batch_size, "predict"))

    # ----- the loop ------------------------------------------------------------------------

    def _limit_reached(self) -> bool:
        return (self.max_steps is not None and self.step >= self.max_steps) or (
            self.max_epochs is not None and self.epoch >= self.max_epochs)

    # ----- building and checking -----------------------------------------------------------

    def _step_signature(self) -> tuple:
        return tuple(self.probes), self._halt_after, tuple(sorted(self.metric_reductions.items()))
