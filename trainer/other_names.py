"""Keras's and Lightning's argument names met in ``Trainer``, ``fit``, ``evaluate``, ``predict``, ``Checkpoint``,
``EarlyStopping`` and ``MetricsLogger``: a clear ``TypeError`` saying what this library calls them, or how it
does the same, where Python's own says only "unexpected keyword"."""

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
    "steps_per_epoch": "max_steps=N (an epoch is one pass over the data; a smaller ArrayLoader makes shorter ones)",
    "fast_dev_run": "max_steps=1, with fit(train_data, eval_data=[one batch]): every part of the loop once",
    "limit_train_batches": "max_steps=N for a short run; a smaller ArrayLoader for shorter epochs",
    "limit_val_batches": "fit(..., eval_data=[the batches to use]) (a list, or a smaller ArrayLoader)",
    "val_check_interval": "callbacks=[Evaluator(eval_data, every_n_steps=N, every_n_epochs=None)]",
    "check_val_every_n_epoch": "callbacks=[Evaluator(eval_data, every_n_epochs=N)]",
    "accumulate_grad_batches": "the optimizer optax.MultiSteps(tx, every_k_schedule=N) (README: 'Accumulate gradients')",
    "gradient_accumulation_steps": "the optimizer optax.MultiSteps(tx, every_k_schedule=N) (README: 'Accumulate gradients')",
    "gradient_clip_val": "the optimizer's clip_norm=...: make_optimizer(..., clip_norm=1.0) or OptimConfig(clip_norm=1.0)",
    "gradient_clip_algorithm": "the optimizer's clip_norm=... (a global norm: optax.clip_by_global_norm)",
    "clipnorm": "the optimizer's clip_norm=...: make_optimizer(..., clip_norm=1.0) or OptimConfig(clip_norm=1.0)",
    "precision": "the layers' own dtype=jnp.bfloat16, param_dtype=jnp.float32 (README: 'Mixed precision')",
    "devices": "JAX's devices: a place_batch override with a sharding (README: 'More than one device')",
    "accelerator": "JAX's platform: JAX_PLATFORMS=cpu|cuda|tpu in the environment",
    "strategy": "a place_batch override with a sharding (README: 'More than one device')",
    "log_every_n_steps": "callbacks=[MetricsLogger(writers, log_every=N)]",
    "logger": "callbacks=[MetricsLogger([ConsoleWriter(), CsvWriter(path), TensorBoardWriter(folder)])]",
    "enable_progress_bar": "callbacks=[ProgressBar()] (none without it)",
    "enable_checkpointing": "callbacks=[Checkpoint()] (none without it), with workdir=...",
    "default_root_dir": "workdir=...",
    "deterministic": "seed=... (on CPU a seed's run repeats bit for bit)",
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
    "validation_split": "split the arrays yourself: fit(ArrayLoader(first rows), eval_data=ArrayLoader(the rest))",
    "validation_steps": "eval_data=[the batches to use] (a list, or a smaller ArrayLoader)",
    "validation_freq": "callbacks=[Evaluator(eval_data, every_n_epochs=N)] on the Trainer",
    "validation_batch_size": "the evaluation data's own batch size: eval_data=ArrayLoader(..., batch_size=N)",
    "sample_weight": "a weight array in the batch and a loss_fn that uses it, e.g. the mean of weight * "
                     "losses.cross_entropy(logits, labels) (Keras's own reduction)",
    "class_weight": "a loss_fn that weighs each example's loss by its label's weight, e.g. the mean of "
                    "jnp.asarray(weights)[labels] * losses.cross_entropy(logits, labels)",
    "shuffle": "ArrayLoader(..., shuffle=True) (its default)",
    "initial_epoch": "resume=True (from the newest checkpoint in workdir)",
    "train_dataloaders": "fit(train_data)",
    "datamodule": "fit(train_data, eval_data=...)",
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
CHECKPOINT = {
    "filepath": "directory=... (default <workdir>/checkpoints)",
    "dirpath": "directory=... (default <workdir>/checkpoints)",
    "save_best_only": "monitor='eval/loss' (keep_best=1 is then the default), and max_to_keep=1 for the newest "
                      "beside it; Checkpoint.best_path names the best, load_model(best_path, model) loads it",
    "save_top_k": "keep_best=K with monitor=... (the max_to_keep newest are kept beside them)",
    "save_last": "max_to_keep=N: the N newest are always kept",
    "save_weights_only": "trainer.save_model(path) (an export of the weights) at the end; a checkpoint holds "
                         "the whole train state so that a run can resume",
    "save_freq": "every_n_steps=N (or every_n_epochs=N)",
    "every_n_train_steps": "every_n_steps=N",
    "period": "every_n_epochs=N",
    "verbose": "nothing: the saves are the step_<N> folders of its directory (best_path names the best)",
}
EARLY_STOPPING = {
    "restore_best_weights": "restore_best=True (its default)",
    "verbose": "nothing: the stop's reason is printed when fit ends (trainer.stop_reason)",
    "check_finite": "NaNDetector() (raise, skip or roll back a non-finite step)",
    "stopping_threshold": "nothing of its own: a subclass's on_epoch_end can call trainer.request_stop(reason)",
    "divergence_threshold": "NaNDetector() for non-finite values; a subclass's on_epoch_end for a bound",
}
METRICS_LOGGER = {
    "log_every_n_steps": "log_every=N",
    "every_n_steps": "log_every=N",
    "filename": "the writer's own path: MetricsLogger([CsvWriter('metrics.csv')])",
}


TRAINER_ATTRIBUTES = {  # Keras's model and Lightning's trainer: the names a Trainer lacks, and what does the same
    "test": "trainer.evaluate(data, prefix='test/') (Lightning's trainer.test)",
    "validate": "trainer.evaluate(data, prefix='eval/') (Trainer(model) with no optimizer evaluates too)",
    "compile": "the constructor: Trainer(model, optimizer, loss_fn=...) (Keras's compile)",
    "summary": "nnx.tabulate(trainer.model, example_inputs) (Flax's own table of the layers)",
    "save_checkpoint": "callbacks=[Checkpoint()] while fitting; trainer.save_model(path) exports the weights",
    "save_weights": "trainer.save_model(path) (load_model(path, model) reads them back)",
    "save": "trainer.save_model(path) (load_model(path, model) reads it back)",
    "load_weights": "load_model(path, model) (from trainer import load_model), then Trainer(model, ...)",
    "load_from_checkpoint": "load_model(path, model) for the weights, or fit(..., resume=path) to go on training",
    "get_weights": "nnx.state(trainer.model, nnx.Param)",
    "set_weights": "nnx.update(trainer.model, params) (the trainer takes them at its next fit, evaluate or predict)",
    "fit_generator": "trainer.fit(batches)",
    "evaluate_generator": "trainer.evaluate(batches)",
    "predict_generator": "trainer.predict(batches)",
    "train_on_batch": "Trainer(model, optimizer, max_steps=N).fit([batch]) (README: 'Overfit one batch')",
    "test_on_batch": "trainer.evaluate([batch])",
    "predict_on_batch": "trainer.predict([batch])",
    "stop_training": "trainer.should_stop = True, or trainer.request_stop(reason) (Keras's model.stop_training)",
    "current_epoch": "trainer.epoch (0-based)",
    "global_step": "trainer.step",
    "callback_metrics": "trainer.history[-1] (the last epoch's) and trainer.eval_metrics (the last evaluation's)",
    "logged_metrics": "trainer.history, or MetricsLogger's history",
    "lr_find": "nothing of its own: a short fit per learning rate",
}


def missing_attribute(owner: str, name: str) -> AttributeError:
    """The ``AttributeError`` for a name a Trainer lacks: for another framework's name, what to write here."""
    hint = TRAINER_ATTRIBUTES.get(name)
    return AttributeError(f"{owner!r} object has no attribute {name!r}" + (f": here it is {_sentence(hint)}" if hint else ""))


class _OtherName:
    """A class attribute for a name Keras or Lightning has and a Trainer lacks: reading it raises what does the same
    here. Only ``stop_training`` also refuses a value (Keras's ``model.stop_training = True`` would stop nothing);
    other names set on an instance (a subclass's own ``summary``) are the instance's."""

    def __init__(self, name: str):
        self.name = name

    def __get__(self, instance: Any, owner: type) -> Any:
        raise missing_attribute(owner.__name__, self.name)


class _RefusedName(_OtherName):
    def __set__(self, instance: Any, value: Any) -> None:
        raise missing_attribute(type(instance).__name__, self.name)


class OtherAttributeNames:
    """Mixed into ``Trainer``: each name of ``TRAINER_ATTRIBUTES`` (``trainer.test``, ``summary``) fails saying what
    does the same here. Class attributes, not ``__getattr__``: an error inside a property keeps its own name."""


for _name in TRAINER_ATTRIBUTES:
    setattr(OtherAttributeNames, _name, (_RefusedName if _name == "stop_training" else _OtherName)(_name))


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
