"""A recipe's workdir before anything is loaded: the runs in it and beside it, and what a resume keeps.

``prepare_workdir`` is the first thing a recipe's ``run`` does. A second run in the default workdir
(``runs/mnist``) moves to a fresh sibling (``runs/mnist-2``) and says the exact command that
continues it; a ``--workdir`` given explicitly that holds a run, a checkpoints folder given as the
workdir, ``--resume`` without ``--workdir`` while sibling runs exist, and a resume whose model-shaping
or data-order options (``--batch-size``, ``--seed``, ...) differ from the checkpoint's saved config
are ``UsageError``s, raised before any data is read or model built. ``fitting`` wraps ``fit``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import shlex
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

from recipes.common import RUN_OUTPUTS, DefaultWorkdir, _holds, holds_a_run, run_config
from recipes.config_cli import UsageError, flag_of


def prepare_workdir(config: Any, recipe: str, fixed: Sequence[str] = ()) -> Any:
    """``config`` ready to run (its workdir moved to a fresh sibling when it was left at a default that
    holds a run), or a ``UsageError``; ``fixed``: the options a resume must keep as they were saved."""
    workdir = config.workdir
    if not workdir:
        return config
    refuse_checkpoints_folder(workdir)
    if config.resume:
        refuse_ambiguous_resume(workdir)
        check_resume(config, recipe, fixed)
        return config
    if not holds_a_run(Path(workdir)):
        return config
    if not isinstance(workdir, DefaultWorkdir):
        raise UsageError(used_workdir_problem(workdir, recipe))
    fresh = next_sibling(workdir)
    print(f"{workdir} holds an earlier run: this one writes to {fresh} (--workdir chooses the folder). Continue "
          f"this run after an interruption with: {resume_command(recipe, config, fresh)}  (and the earlier one "
          f"with --resume --workdir {workdir})", file=sys.stderr, flush=True)
    return dataclasses.replace(config, workdir=fresh)


def refuse_checkpoints_folder(workdir: str) -> None:
    """A workdir that itself holds ``step_N`` folders is a run's checkpoints folder: a run there would
    start fresh and nest its own run inside the old one's checkpoints."""
    path = Path(workdir)
    steps = sorted(p.name for p in path.glob("step_*") if p.is_dir() and p.name[5:].isdigit()) if path.is_dir() else []
    if steps:
        raise UsageError(f"--workdir {workdir} is a checkpoints folder (it holds {', '.join(steps[:3])}), not a "
                         f"run's workdir; pass the run's folder, its parent: --workdir {path.parent}.")


def refuse_ambiguous_resume(workdir: str) -> None:
    """``--resume`` left at the default workdir while sibling runs exist could continue the wrong run."""
    others = siblings(workdir) if isinstance(workdir, DefaultWorkdir) else []
    if others:
        raise UsageError(f"--resume without --workdir continues {workdir}, but other runs are beside it "
                         f"({', '.join(others)}): pass --workdir to say which run to continue (--resume --workdir "
                         f"{others[-1]} for the newest, --resume --workdir {workdir} for the first).")


def check_resume(config: Any, recipe: str, fixed: Sequence[str]) -> None:
    """The run in the workdir must be one of this recipe, saved with the same ``fixed`` options."""
    saved = saved_config(Path(config.workdir), logged=False)  # what a resume restores: a checkpoint's config
    if saved is None:
        return
    other = recipe_of(saved)
    if other not in (None, recipe):
        raise UsageError(f"--workdir {config.workdir} holds {_an(other)} run, not {_an(recipe)} one, so nnx-train "
                         f"{recipe} cannot continue it; choose the workdir of {_an(recipe)} run (or another "
                         "--workdir for a new one, without --resume).")
    differ = [name for name in fixed if name in saved and saved[name] != getattr(config, name)]
    if differ:
        why = "a resumed run keeps these as saved (they fix the model's shapes and the data order)"
        raise UsageError(_saved_with(config.workdir, [(n, saved[n], getattr(config, n)) for n in differ], why))


def _saved_with(workdir: str, changed: list[tuple[str, Any, Any]], why: str) -> str:
    """``the checkpoint in --workdir X was saved with --width 16 (this run: --width 8): ...``."""
    was = " ".join(_option(name, before) for name, before, _ in changed)
    now = " ".join(_option(name, after) for name, _, after in changed)
    return (f"the checkpoint in --workdir {workdir} was saved with {was} (this run: {now}): {why}. Resume with "
            f"{was}, or start a new run in another --workdir.")


def used_workdir_problem(workdir: str, recipe: str) -> str:
    """Why a fresh run may not write into an explicitly given workdir that holds a run, and what to do."""
    found = [name for name in RUN_OUTPUTS if _holds(Path(workdir) / name)]
    saved = saved_config(Path(workdir))
    other = recipe_of(saved) if saved is not None else None
    if other not in (None, recipe):
        held, advice = f"an earlier {other} run", f"Choose another --workdir (nnx-train {recipe} cannot continue it)."
    elif "checkpoints" in found:
        held, advice = "an earlier run", "Continue it with --resume, or choose another --workdir."
    else:
        held, advice = "an earlier run", ("It has no checkpoints to continue from: choose another --workdir, or "
                                          "move the old one away.")
    return (f"--workdir {workdir} holds {held} ({', '.join(found)}): a fresh run would mix its logs and checkpoints "
            f"into it. {advice}")


def siblings(workdir: str) -> list[str]:
    """The runs beside ``workdir`` that a second run in it made (``runs/mnist-2``, ...), oldest first."""
    path = Path(workdir)
    numbered = [(int(p.name[len(path.name) + 1:]), p) for p in path.parent.glob(f"{path.name}-*")
                if p.name[len(path.name) + 1:].isdigit()]
    return [f"{workdir}-{n}" for n, p in sorted(numbered) if holds_a_run(p)]


def next_sibling(workdir: str) -> str:
    """The first ``workdir-N`` (N >= 2) that holds no run."""
    n = 2
    while holds_a_run(Path(f"{workdir}-{n}")):
        n += 1
    return f"{workdir}-{n}"


def resume_command(recipe: str, config: Any, workdir: str) -> str:
    """The ``nnx-train`` command that continues the run of ``config`` in ``workdir``: its options that differ
    from the defaults (a resume must keep some of them), then ``--resume --workdir``."""
    words = ["nnx-train", recipe, *_given_options(config, type(config)()), "--resume", "--workdir", workdir]
    return " ".join(shlex.quote(str(word)) for word in words)


def _given_options(config: Any, default: Any) -> list[str]:
    """``config``'s options that differ from ``default``'s, as command-line words (nested dataclasses flattened)."""
    words: list[str] = []
    for field in dataclasses.fields(config):
        value, base = getattr(config, field.name), getattr(default, field.name)
        if dataclasses.is_dataclass(value):
            words += _given_options(value, base)
        elif field.name not in ("resume", "workdir") and value != base:
            flag = flag_of(field.name)
            words += ([flag if value else "--no-" + flag[2:]] if isinstance(value, bool)
                      else [flag, "none" if value is None else str(value)])
    return words


def _option(name: str, value: Any) -> str:
    """``--batch-size 128``: an option as the command line spells it."""
    return f"{flag_of(name)} {'none' if value is None else value}"


def _an(name: str) -> str:
    """The recipe's name with its article, for a message."""
    return ("an " if name == "mnist" or name[0] in "aeiou" else "a ") + name  # an mnist run, a transformer run


def saved_config(workdir: Path, logged: bool = True) -> dict | None:
    """The run config an earlier run left in ``workdir``: its newest checkpoint's, else (``logged``) the last
    one its ``metrics.jsonl`` logged; None when none can be read (the trainer's own checks still apply)."""
    folder = workdir / "checkpoints"
    steps = [p for p in folder.glob("step_*") if p.name[5:].isdigit()] if folder.is_dir() else []
    for step in sorted(steps, key=lambda p: int(p.name[5:]), reverse=True):
        meta = _read_json(step / "meta" / "metadata")  # where orbax's JsonSave keeps the checkpoint's meta document
        if isinstance(meta, dict) and isinstance(meta.get("config"), dict):
            return meta["config"]
    return _logged_config(workdir / "metrics.jsonl") if logged else None


def _logged_config(path: Path) -> dict | None:
    """The last run config a ``metrics.jsonl`` holds (``{"hparams": ...}`` records), if any."""
    logged = None
    try:
        with open(path, encoding="utf-8") as lines:
            for line in lines:
                record = _loads(line)
                if isinstance(record, dict) and isinstance(record.get("hparams"), dict):
                    logged = record["hparams"]
    except (OSError, UnicodeDecodeError):
        return None
    return logged


def _read_json(path: Path) -> Any:
    """A JSON file's value; None for one that cannot be read or parsed (a peek: nothing is refused here)."""
    try:
        return _loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        return None


def _loads(text: str) -> Any:
    """``json.loads``, None for text that is no JSON (a line cut short by a crash)."""
    try:
        return json.loads(text)
    except ValueError:
        return None


def recipe_of(saved: dict) -> str | None:
    """The recipe whose run config ``saved`` is (it holds every option of that recipe's ``CONFIG``), if any."""
    from recipes.cli import RECIPES

    for name, (module, _) in RECIPES.items():
        if set(run_config(importlib.import_module(module).CONFIG())) <= set(saved):
            return name
    return None


@contextlib.contextmanager
def fitting(config: Any, recipe: str) -> Iterator[None]:
    """Around ``fit``: a checkpoint whose optimizer state does not fit this run's optimizer is refused naming
    the options it was saved with; after a preemption's save and exit, the exact command that continues."""
    from trainer.checkpoint_store import CheckpointError

    try:
        yield
    except CheckpointError as err:
        saved = saved_config(Path(config.workdir), logged=False) if config.resume and config.workdir else None
        optim = run_config(config).get("optim")  # the model's shapes are checked before: prepare_workdir's fixed
        changed = _changed_options(saved.get("optim"), optim) if saved is not None and optim is not None else []
        if not changed or "does not fit" not in str(err):
            raise
        raise UsageError(_saved_with(config.workdir, changed, "its optimizer state does not fit this run's "
                                                              "optimizer")) from err
    except SystemExit as exit_:
        if exit_.code not in (0, None) and config.checkpoint and config.workdir:
            print(f"continue this run with: {resume_command(recipe, config, config.workdir)}", file=sys.stderr,
                  flush=True)
        raise


def _changed_options(saved: Any, now: dict) -> list[tuple[str, Any, Any]]:
    """``(name, saved, now)`` for each option (nested ones flattened) whose value differs from the saved one."""
    if not isinstance(saved, dict):
        return []
    changed = []
    for name, value in now.items():
        if isinstance(value, dict) and isinstance(saved.get(name), dict):
            changed += _changed_options(saved[name], value)
        elif name in saved and name != "workdir" and saved[name] != value:
            changed.append((name, saved[name], value))
    return changed
