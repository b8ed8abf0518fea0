"""Resuming: where a run continues from, restoring a checkpoint into a trainer, rollbacks, the preemption exit.

Kept apart from ``trainer.checkpoint`` (what a checkpoint holds and when one is saved) because it is
the reading side: ``fit(resume=...)``, ``NaNDetector``'s rollback, ``EarlyStopping``'s best state
after a resume, and the save and exit after SIGTERM / SIGINT.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import jax
import jax.numpy as jnp

from trainer.checkpoint import _differences, _load_callback_states, environment
from trainer.json_values import jsonable
from trainer.checkpoint_arrays import CheckpointError, check_structure, expected_leaves, place_like, unflatten
from trainer.checkpoint_store import CheckpointStore
from trainer.optim import key_names, optimizer_signature
from trainer.sums import restart_trainer_sums

if TYPE_CHECKING:  # pragma: no cover
    from trainer.trainer import Trainer


def refuse_used_stores(trainer: "Trainer") -> None:
    """A fresh run (step 0, no ``resume``) would overwrite and prune the checkpoints an earlier run left
    in its store: refused before anything is written, the earlier run's checkpoints untouched."""
    for checkpoint in trainer.checkpoints:
        steps = checkpoint.open(trainer).steps()
        if steps:
            shown = ", ".join(str(s) for s in steps[:5]) + (", ..." if len(steps) > 5 else "")
            raise CheckpointError(
                f"{checkpoint.directory} already holds checkpoints of an earlier run (steps {shown}); a fresh "
                "run would overwrite and prune them. Pass resume=True (recipes: --resume) to continue that run, "
                "or give this run another workdir or Checkpoint(directory=...), or delete that folder.")


def check_resume_source(trainer: "Trainer", resume: bool | str | os.PathLike) -> None:
    """Refuses ``resume=True`` on a trainer that has nowhere to look for checkpoints, which would
    otherwise start fresh without a word (an empty workdir does start fresh: the first run of a script)."""
    if resume is True and not trainer.checkpoints and trainer.workdir is None:
        raise ValueError("fit(resume=True) continues from the Checkpoint callback's folder or <workdir>/checkpoints, "
                         "but this trainer has neither (workdir=None, no Checkpoint callback), so nothing could "
                         "be resumed. Give the Trainer the workdir of the run to continue, or pass "
                         "resume='path/to/checkpoints'.")


def find_store(trainer: "Trainer", resume: bool | str | os.PathLike,
               read_only: bool = False) -> tuple[CheckpointStore | None, int | None]:
    """The store to resume from and, for a path to one step folder, that step (``read_only``: to read it)."""
    if resume is True:
        checkpoints = trainer.checkpoints
        if checkpoints:
            return checkpoints[0].open(trainer), None
        if trainer.workdir is None or not (Path(trainer.workdir) / "checkpoints").is_dir():
            return None, None
        return CheckpointStore(Path(trainer.workdir) / "checkpoints"), None
    if not isinstance(resume, (str, os.PathLike)) or not str(resume).strip():
        raise ValueError(f"resume={resume!r} names no folder; pass resume=True to continue from the newest "
                         "checkpoint in the workdir, or the path of a checkpoints folder or step_<N> folder.")
    path = Path(resume)
    if not path.exists():
        raise FileNotFoundError(f"resume={str(resume)!r} does not exist; pass resume=True to continue from the "
                                "newest checkpoint in the workdir, or the path of a checkpoint folder.")
    number = path.name.rsplit("_", 1)[-1]
    if number.isdigit() and (path / "meta").is_dir():
        return CheckpointStore(path.parent, read_only=read_only), int(number)
    if (path / "checkpoints").is_dir() and not any(path.glob("step_*")):  # a run's workdir
        return CheckpointStore(path / "checkpoints", read_only=read_only), None
    return CheckpointStore(path, read_only=read_only), None


def _configured_hyperparams(restored: Any, current: Any) -> Any:
    """The restored optimizer state with the hyperparameters this trainer's optimizer was built with (b1,
    b2, weight decay, momentum): ``inject_hyperparams`` keeps them in the state, so a checkpoint's kept
    the saved values over a changed setting while the learning rate (a schedule) changed. The learning
    rate's own value stays the checkpoint's: the schedule sets it at the next step."""
    def pick(path: tuple, saved: Any, now: Any) -> Any:
        names = key_names(path)
        configured = "hyperparams" in names and names[-1] != "learning_rate"
        return now if configured and jnp.shape(saved) == jnp.shape(now) else saved

    try:
        return jax.tree_util.tree_map_with_path(pick, restored, current)
    except ValueError:  # another structure (an optimizer of other kind, warned about): as saved
        return restored


def read_saved_state(trainer: "Trainer", step: int) -> Any:
    """The train state this trainer's checkpoints hold for ``step`` (placed like the live one), or
    ``None`` when none of its stores has that step (pruned, never saved) or it cannot be read."""
    for checkpoint in trainer.checkpoints:
        store = checkpoint.open(trainer)
        if step not in store.steps():
            continue
        try:
            _, meta, arrays = store.restore_newest(functools.partial(_check_saved, trainer.state), step)
        except CheckpointError:  # damaged, or another model's
            continue
        template = _state_template(trainer.state, meta)
        return place_like(template, unflatten(template, arrays, meta["leaves"]))
    return None


def _state_template(current: Any, meta: Mapping[str, Any]) -> Any:
    """``current`` (the live state) shaped as a checkpoint with or without the non-finite guard holds it."""
    from trainer.step import init_guard

    if meta.get("has_guard") and current.guard is None:
        return current.replace(guard=init_guard())
    return current if meta.get("has_guard") else current.replace(guard=None)


def _check_saved(current: Any, found_step: int, meta: Mapping[str, Any]) -> None:
    check_structure(f"checkpoint step {found_step}", meta["leaves"], expected_leaves(_state_template(current, meta)),
                    "model and optimizer")


def warn_of_replacing_newer(trainer: "Trainer", store: CheckpointStore, step: int) -> None:
    """Resuming from an older step of the folder this trainer saves into rewinds the run: the newer steps
    are replaced as training passes them (and the logs after the step dropped). Allowed, said once."""
    newer = sorted(s for s in store.steps() if s > step)
    own = {folder.resolve() for folder in (c.folder(trainer) for c in trainer.checkpoints) if folder is not None}
    if newer and Path(store.directory).resolve() in own:
        warnings.warn(f"resuming from step {step} of {store.directory}, which also holds the newer steps {newer}: "
                      "this rewinds the run; training on replaces those it passes (the logs after that step are "
                      "dropped too), and until then a later resume=True continues from the newest of them. To "
                      "keep them, branch instead: give this trainer another workdir (resume= still points at the "
                      "step).", RuntimeWarning, stacklevel=4)


FRESH_START = {"step": 0, "fresh_start": True}  # what ``on_checkpoint_restore`` gets when a resume found nothing


def _starting_fresh(trainer: "Trainer", folder: Path | None) -> None:
    """A resume that found no checkpoint. An untrained trainer then "restores" step 0: callbacks forget
    what a run that left no checkpoint wrote (a logger's files rewind to step 0, not appended to)."""
    where = f" in {folder}" if folder is not None else ""
    print(f"resume=True: no checkpoints{where}; starting fresh", file=sys.stderr, flush=True)
    if trainer.step == 0:
        trainer.callbacks.dispatch("on_checkpoint_restore", trainer, dict(FRESH_START))


def restore(trainer: "Trainer", resume: bool | str | os.PathLike) -> int | None:
    """Restores the newest good checkpoint into ``trainer``; returns its step (None: fresh start)."""
    store, step = find_store(trainer, resume)
    if store is None:
        _starting_fresh(trainer, Path(trainer.workdir) / "checkpoints" if trainer.workdir is not None else None)
        return None
    current = trainer.state
    if step is not None:
        warn_of_replacing_newer(trainer, store, step)
    found = store.restore_newest(functools.partial(_check_saved, current), step)
    if found is None:
        if resume is not True:
            raise CheckpointError(f"no usable checkpoint in {store.directory}.")
        if store.steps() or store.damaged():
            aside = f" (the damaged ones moved to {', '.join(p.name for p in store.damaged())})" if store.damaged() else ""
            raise CheckpointError(f"no usable checkpoint remains in {store.directory}: every step folder is "
                                  f"damaged or foreign{aside}. Move the folder away to start fresh.")
        _starting_fresh(trainer, store.directory)
        return None
    found_step, meta, arrays = found
    template = _state_template(current, meta)
    state = place_like(template, unflatten(template, arrays, meta["leaves"]))
    if current.guard is not None and state.guard is None:
        state = state.replace(guard=current.guard)
    state = state.replace(opt_state=_configured_hyperparams(state.opt_state, current.opt_state))
    trainer.state = state
    trainer.step, trainer.epoch, trainer.position = meta["step"], meta["epoch"], meta["position"]
    trainer.history = [dict(h) for h in meta["history"]]
    trainer.restored_data_state = meta["data_state"]
    trainer.restored_epoch_sums = meta.get("epoch_sums")
    trainer.restored_window_sums = meta.get("window_sums")  # a logger's window: its steps before the checkpoint
    for checkpoint in trainer.checkpoints:  # that step is saved: a save before the next step (a preemption) skips it
        if checkpoint.store is not None and Path(checkpoint.store.directory).resolve() == Path(store.directory).resolve():
            checkpoint.last_saved_step = found_step
    restart_trainer_sums(trainer)  # a built trainer (a rollback, a second fit) restarts its sums at the checkpoint's
    trainer.skip_batches |= {tuple(b) for b in meta.get("skip_batches", [])}
    if trainer.compiled_batch_size is None:  # the batch size of the run: a resume may start at a smaller last batch
        trainer.compiled_batch_size = meta.get("compiled_batch_size")
    _load_callback_states(trainer, meta["callbacks"])
    saved_optimizer = {"state": meta["optimizer"]} if "optimizer" in meta else {}  # older checkpoints: none
    optimizer = {"state": optimizer_signature(current.opt_state)} if saved_optimizer else {}
    for what, saved, now in (("environment", meta["environment"], environment()),
                             ("config", meta["config"], jsonable(trainer.config)),
                             ("optimizer", saved_optimizer, optimizer)):
        diffs = _differences(saved, now)
        if diffs:
            warnings.warn(f"resuming checkpoint step {found_step} under a different {what}: " + "; ".join(diffs),
                          RuntimeWarning, stacklevel=3)
    trainer.callbacks.dispatch("on_checkpoint_restore", trainer, meta)
    print(f"resumed from checkpoint step {found_step} in {store.directory}", file=sys.stderr, flush=True)
    return found_step


def refuse_halted(trainer: "Trainer") -> None:
    """A trainer whose non-finite guard halted (a ``NonFiniteError``) would train no more: every step a
    no-op. Refused with the ways on, rather than the old error again or a silent run of no-ops."""
    guard = trainer.state.guard
    if guard is None or not bool(jax.device_get(guard["halted"])):
        return
    raise RuntimeError(
        f"this trainer halted at step {int(jax.device_get(guard['halt_step']))} on a non-finite loss or gradients "
        f"(its NonFiniteError): its parameters and optimizer state are those of step {trainer.step}, before it "
        "(trainer.model holds them), and every further step would change nothing. Resume from the newest good "
        "checkpoint (fit(..., resume=True)), or build a new Trainer from trainer.model; NaNDetector(policy='skip' "
        "or 'rollback') trains past such steps.")


def roll_back(trainer: "Trainer", bad_step: int) -> None:
    """Restores the newest good checkpoint and marks the batch of ``bad_step`` to be skipped."""
    position = trainer.step_positions.get(bad_step)
    if position is not None:
        trainer.skip_batches.add(position)
    for checkpoint in trainer.checkpoints:
        if checkpoint.store is not None:
            checkpoint.store.wait()
    trainer.should_stop, trainer.stop_reason = False, None  # a stop decided on the discarded steps
    if restore(trainer, True) is None:
        raise CheckpointError("rollback found no checkpoint to restore.")


def save_and_exit(trainer: "Trainer", preemption: Any) -> None:
    """After a preemption signal: save synchronously, fire ``on_fit_end``, exit with 128 + signal."""
    saved = [cb for cb in trainer.checkpoints if cb.save(trainer, wait=True)]
    trainer.preempted = bool(saved)
    for error in trainer.callbacks.dispatch_all("on_fit_end", trainer):  # the save is done: exit regardless
        warnings.warn(f"a callback's on_fit_end raised {error!r} after the preemption save", RuntimeWarning,
                      stacklevel=2)
    where = ", ".join(str(cb.directory) for cb in saved) or "nowhere (the state was not finite)"
    print(f"received {preemption.name}: saved checkpoint step {trainer.step} in {where}; resume with "
          "fit(..., resume=True) (recipes: --resume).", file=sys.stderr, flush=True)
    raise SystemExit(128 + preemption.signal)
