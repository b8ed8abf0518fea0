"""Command-line options from a recipe's config dataclass: one ``--flag`` per field, defaults shown.

Fields of a nested dataclass (such as ``OptimConfig``) become flags of their own, so every option
of the optimizer is reachable from the command line without being listed twice. Fields declared
with ``trainer.settings.setting`` bounds refuse other values as usage errors that name the flag.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

from trainer.events import DefaultInterval
from trainer.optim import OPTIMIZERS, SCHEDULES
from trainer.settings import bounds_of, setting_problems

C = TypeVar("C")

OPTIM_HELP = {
    "optimizer": f"one of {', '.join(OPTIMIZERS)}",
    "learning_rate": "peak learning rate (after warmup)",
    "schedule": f"learning-rate schedule, one of {', '.join(SCHEDULES)}",
    "warmup_steps": "steps of linear warmup from 0 before the schedule",
    "end_learning_rate": "final learning rate of the cosine schedule, floor of the exponential one",
    "decay_rate": "exponential schedule: factor applied every decay-steps",
    "decay_steps": "exponential schedule: steps per decay-rate factor (None: the whole run)",
    "weight_decay": "decoupled for adamw, added to the gradient for adam and sgd",
    "momentum": "sgd momentum (0 for plain sgd)",
    "nesterov": "sgd with Nesterov momentum",
    "clip_norm": "clip gradients to this global norm (None: no clipping)",
    "b1": "adam / adamw: first-moment decay",
    "b2": "adam / adamw: second-moment decay",
    "weight_decay_mask": "which parameters weight decay reaches: all, or matrices (not biases or norm scales)",
}


def _base_type(annotation: Any) -> tuple[type, bool]:
    """``int | None`` -> ``(int, True)``; ``float`` -> ``(float, False)``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], True
    return annotation, False


def _fields(cls: type) -> list[tuple[dataclasses.Field, Any, str | None, type]]:
    """(field, resolved type, name of the nested dataclass field it belongs to or None, the dataclass declaring it)."""
    hints = typing.get_type_hints(cls)
    out = []
    for field in dataclasses.fields(cls):
        kind = hints[field.name]
        if dataclasses.is_dataclass(kind):
            out += [(inner, t, field.name, owner) for inner, t, _, owner in _fields(kind)]
        else:
            out.append((field, kind, None, cls))
    return out


def flag_of(name: str) -> str:
    """The command-line flag of a config field: ``max_shift`` -> ``--max-shift``."""
    return "--" + name.replace("_", "-")


def _parse_optional(kind: type):
    def parse(text: str):
        return None if text.lower() == "none" else kind(text)
    parse.__name__ = kind.__name__
    return parse


def _as_given(text: str) -> str:
    """A ``str`` option as given: argparse converts a default too, and ``str()`` would strip a default
    that marks itself as one (``recipes.common.DefaultWorkdir``)."""
    return text


_as_given.__name__ = "str"


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, help_texts: dict[str, str] | None = None) -> None:
    """Adds a ``--field-name`` option for every (nested) field of the dataclass ``cls``."""
    help_texts = help_texts or {}
    defaults = dataclasses.asdict(cls())
    for field, kind, parent, owner in _fields(cls):
        default = defaults[parent][field.name] if parent else defaults[field.name]
        base, optional = _base_type(kind)
        flag = flag_of(field.name)
        text = help_texts.get(field.name, OPTIM_HELP.get(field.name, ""))
        text = f"{text} (default: %(default)s)".lstrip()
        if base is bool:
            parser.add_argument(flag, dest=field.name, default=default, help=text,
                                action=argparse.BooleanOptionalAction)
            continue
        convert = _parse_optional(base) if optional else _as_given if base is str else base
        bounds = bounds_of(owner, field.name)
        if bounds is not None and bounds.choices is not None:  # argparse names the choices itself
            parser.add_argument(flag, dest=field.name, default=default, type=convert, help=text,
                                choices=bounds.choices)
        else:
            parser.add_argument(flag, dest=field.name, default=default, type=convert, help=text,
                                metavar=base.__name__.upper())


def config_from_args(cls: type[C], args: argparse.Namespace) -> C:
    """Builds ``cls`` (and its nested dataclasses) from parsed arguments."""
    hints = typing.get_type_hints(cls)
    values = {}
    for field in dataclasses.fields(cls):
        kind = hints[field.name]
        values[field.name] = config_from_args(kind, args) if dataclasses.is_dataclass(kind) else getattr(args, field.name)
    return cls(**values)


def parse_config(cls: type[C], argv: Sequence[str] | None, prog: str, description: str,
                 help_texts: dict[str, str] | None = None,
                 checks: Sequence[Callable[[C], str | None]] = ()) -> C:
    """Parses ``argv`` into a ``cls`` config; ``--help`` lists every option with its default.

    Values outside a field's declared bounds (``trainer.settings``), step intervals that do not fit
    ``--steps-per-execution``, an unwritable ``--export`` or ``--workdir``, ``--nan-policy rollback``
    without checkpoints and whatever ``checks`` (a config -> problem
    or None) find are usage errors: the problem on stderr, exit status 2, before anything is built.
    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_config_arguments(parser, cls, help_texts)
    config = config_from_args(cls, parser.parse_args(argv))
    problem = (bounds_problem(config) or optim_problem(config) or interval_problem(config) or export_problem(config)
               or workdir_problem(config) or resume_problem(config) or rollback_problem(config)
               or next((p for p in (check(config) for check in checks) if p), None))
    if problem:
        parser.error(problem)  # a usage line and the problem on stderr, exit status 2
    return config


def bounds_problem(config: Any) -> str | None:
    """The first option whose value its field's declared bounds refuse, as the command line spells it."""
    for name, value, bounds in setting_problems(config):
        why = f": {bounds.why}" if bounds.why else ""
        return f"{flag_of(name)} {value} {bounds.refusal(value)}{why}."
    return None


def optim_problem(config: Any) -> str | None:
    """An end learning rate above the peak of a schedule that decays to it (the transformer's default
    --end-learning-rate 1e-4 under a --learning-rate below it), named by flags, not a traceback later."""
    optim = getattr(config, "optim", None)
    if optim is None or not hasattr(optim, "end_learning_rate"):
        return None
    decays = optim.schedule in ("warmup_cosine", "cosine") or (optim.schedule == "exponential" and optim.decay_rate < 1)
    if decays and optim.end_learning_rate > optim.learning_rate:
        return (f"--end-learning-rate {optim.end_learning_rate} is above --learning-rate {optim.learning_rate}, but "
                f"--schedule {optim.schedule} decays from the learning rate to it; lower --end-learning-rate too.")
    return None


def resume_problem(config: Any) -> str | None:
    """``--resume`` continues the run in ``--workdir``: with an empty workdir there is nothing to continue."""
    if getattr(config, "resume", False) and not getattr(config, "workdir", "x"):
        return "--resume continues the run in --workdir, but --workdir is empty ('' writes nothing); name the run's folder."
    return None


def export_problem(config: Any) -> str | None:
    """What is wrong with ``--export`` if anything, found before training rather than after it."""
    export = getattr(config, "export", None)
    return folder_problem("--export", export, "the trained model") if export else None


def workdir_problem(config: Any) -> str | None:
    """What is wrong with ``--workdir`` if anything, found before anything is built (with
    ``--no-checkpoint`` a whole epoch would otherwise train before its logs fail to be written)."""
    workdir = getattr(config, "workdir", None)
    return folder_problem("--workdir", workdir, "the run's logs and checkpoints") if workdir else None


def folder_problem(flag: str, value: str, what: str) -> str | None:
    """A folder option's problem, if any: the folder, or its nearest existing parent, must be a writable folder."""
    path = Path(value).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK) or not _can_make_folder_in(existing):
        kind = "" if existing.is_dir() else " (it is a file)"
        return (f"{flag} {value}: {existing} is not a writable folder{kind}, so {what} could not be "
                "written there; choose another folder.")
    return None


def rollback_problem(config: Any) -> str | None:
    """``--nan-policy rollback`` restores the last checkpoint: a run that saves none could never roll back."""
    if getattr(config, "nan_policy", None) != "rollback":
        return None
    if not getattr(config, "checkpoint", True):
        saves_none = "--no-checkpoint"
    elif not getattr(config, "workdir", "x"):
        saves_none = "--workdir '' (nothing written)"
    else:
        return None
    return (f"--nan-policy rollback restores the last checkpoint after a non-finite step, but {saves_none} "
            "saves none; keep checkpoints (--checkpoint and a --workdir), or choose --nan-policy skip or raise.")


def _can_make_folder_in(folder: Path) -> bool:
    """Tries it (and removes the empty folder): permission bits pass for root, and for /proc."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".nnx-train-probe-", dir=folder))
    except OSError:
        return False
    return True


def interval_problem(config: Any) -> str | None:
    """What is wrong with a step interval given on the command line, if anything: each must be a
    multiple of ``--steps-per-execution`` (those left at their defaults round up to one instead)."""
    k = getattr(config, "steps_per_execution", 1)
    if not isinstance(k, int) or k < 1:
        return None  # its range is bounds_problem's (a setting of at least 1)
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(field.default, DefaultInterval) and not isinstance(value, DefaultInterval) and value % k:
            flag = flag_of(field.name)
            return (f"{flag} {value} is not a multiple of --steps-per-execution {k}: callbacks run only between "
                    f"chunks of {k} steps. Use {flag} {max(k, value // k * k)}, or leave it at its default "
                    f"(rounded up to a multiple of {k}).")
    return None


class UsageError(ValueError):
    """An option that fails only once the data is read (a ``--prompt`` character the text never uses):
    raised inside ``usage_errors``, it is reported like a bad flag."""


@contextlib.contextmanager
def reading_options() -> Iterator[None]:
    """Reading the files an option names (``--text``, ``--data-dir``): a missing, empty, unreadable or
    damaged one is a usage error (the loaders' messages name the flag or the file), not a traceback."""
    try:
        yield
    except (OSError, ValueError, EOFError) as err:  # OSError: a permission, a folder for a file, bad gzip data
        raise UsageError(_reading_problem(err)) from err


def _reading_problem(err: BaseException) -> str:
    """A reading error's message; an ``OSError`` (a permission) as the file it names and what went wrong."""
    if isinstance(err, OSError) and err.filename:
        why = (err.strerror or str(err)).lower()
        return f"{err.filename}: cannot be read ({why}); check the path and its permissions."
    return str(err)


@contextlib.contextmanager
def usage_errors(prog: str) -> Iterator[None]:
    """A ``UsageError`` or a ``CheckpointError`` (a used workdir without ``--resume``, nothing usable
    to resume) as a command-line error: the message on stderr and exit status 2, no traceback."""
    from trainer.checkpoint_store import CheckpointError

    try:
        yield
    except (UsageError, CheckpointError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from err
