"""Metric writers with one small interface modelled on CLU's ``MetricWriter``.

``ConsoleWriter``, ``JsonlWriter`` and ``CsvWriter`` are plain Python; ``TensorBoardWriter`` (in
``callbacks.tensorboard``) writes event files with tensorboardX, no TensorFlow needed. File writers
open lazily (on the first write, in append mode), so a writer can be built before the run's
folder exists and reused after ``close()``.

Example::

    writers = [ConsoleWriter(), JsonlWriter("runs/x/metrics.jsonl"), CsvWriter("runs/x/metrics.csv")]
    MetricsLogger(writers, log_every=50)
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, TextIO

import numpy as np


class MetricWriter:
    """The writer interface: every method is optional to override; the base does nothing."""

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Writes one logged window's scalars (name -> float) at ``step``."""

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """``images``: name -> ``[H, W, C]`` (C of 1, 3 or 4) uint8, or float in [0, 1]."""

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        """Writes named texts (generated samples, notes) at ``step``."""

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Writes the run's config (plain values) once, at the start of ``fit``."""

    def flush(self) -> None:
        """Makes what was written so far durable (called at the log cadence)."""

    def close(self) -> None:
        """Releases the file or handle; writing again reopens it, appending."""

    def rewind(self, step: int) -> None:
        """Forget what was written after ``step`` (a run resumed from a checkpoint at ``step``)."""

    def read_scalars(self) -> list[tuple[int, dict[str, float]]] | None:
        """What the writer holds, ``[(step, scalars), ...]``, where it can read it back; ``None``: it cannot."""
        return None

    def earlier_output(self) -> str | None:
        """Where this writer already holds output (its file or folder): ``None`` if nowhere."""
        return None


def check_stream(stream: Any) -> None:
    """Refuses a ``stream=`` that cannot be written to (a file name, say), when the writer is built."""
    if stream is not None and not callable(getattr(stream, "write", None)):
        raise TypeError(f"stream must be a text stream with write() (sys.stdout, an open file); got {stream!r}.")


def print_line(text: str, stream: TextIO | None = None) -> None:
    """Prints ``text`` (stdout by default), flushed, above any progress bar on the terminal: tqdm's
    ``write`` clears the bars first and redraws them after, so a line is never glued onto a bar."""
    from tqdm import tqdm

    out = stream or sys.stdout
    tqdm.write(text, file=out)
    out.flush()


def to_uint8(image: np.ndarray) -> np.ndarray:
    """An image as ``[H, W, C]`` uint8 (float images are taken to be in [0, 1])."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.dtype != np.uint8:
        image = (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)
    return image


def plain(value: Any) -> Any:
    """JSON-safe version of a config value."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (np.generic,)):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


class ConsoleWriter(MetricWriter):
    """``step 50  loss 0.1234  accuracy 0.9612`` lines on ``stream`` (stdout by default)."""

    def __init__(self, stream: TextIO | None = None, precision: int = 4):
        if not isinstance(precision, int) or precision < 1:
            raise ValueError(f"precision={precision!r} must be a positive integer (significant digits).")
        check_stream(stream)
        self.stream = stream
        self.precision = precision

    def _print(self, text: str) -> None:
        print_line(text, self.stream)

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Prints ``step N  name value ...`` with ``precision`` significant digits."""
        values = "  ".join(f"{k} {v:.{self.precision}g}" for k, v in scalars.items())
        self._print(f"step {step}  {values}")

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        """Prints each text under a ``step N  name:`` line."""
        for name, text in texts.items():
            self._print(f"step {step}  {name}:\n{text}")

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Prints ``config {...}`` (JSON, keys sorted)."""
        self._print("config " + json.dumps(plain(hparams), sort_keys=True))


class _FileWriter(MetricWriter):
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file = None

    def _open(self):
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", newline="")
        return self._file

    def earlier_output(self) -> str | None:
        return str(self.path) if self.path.is_file() and self.path.stat().st_size else None

    def flush(self) -> None:
        """Flushes the open file (no ``fsync``)."""
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        """Closes the file; the next write reopens it, appending."""
        if self._file is not None:
            self._file.close()
            self._file = None


def _rewrite(path: Path, keep: Callable[[list[str]], list[bool]]) -> None:
    """Rewrites a text file keeping the lines ``keep(lines)`` flags, atomically."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        lines = f.readlines()
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        f.writelines(line for line, kept in zip(lines, keep(lines)) if kept)
    os.replace(tmp, path)


class JsonlWriter(_FileWriter):
    """One JSON object per line: ``{"step": 50, "scalars": {...}}`` (or ``texts``, ``images``, ``hparams``).

    Images are saved as PNG files in ``<name>_images/`` beside the file; the line holds their paths.
    ``read_jsonl(path)`` reads a file back.
    """

    def _write(self, record: dict) -> None:
        self._open().write(json.dumps(record) + "\n")

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Appends ``{"step": N, "scalars": {...}}``."""
        self._write({"step": int(step), "scalars": {k: float(v) for k, v in scalars.items()}})

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        """Appends ``{"step": N, "texts": {...}}``."""
        self._write({"step": int(step), "texts": dict(texts)})

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Appends ``{"hparams": {...}}``."""
        self._write({"hparams": plain(hparams)})

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        from callbacks.figures import save_png

        folder = self.path.parent / f"{self.path.stem}_images"
        paths = {}
        for name, image in images.items():
            target = folder / f"{name.replace('/', '_')}_{int(step)}.png"
            save_png(target, to_uint8(image))
            paths[name] = str(target.relative_to(self.path.parent))
        self._write({"step": int(step), "images": paths})

    def rewind(self, step: int) -> None:
        """Drops the records after ``step``, and a config record (no step) whose next record goes: it was
        written just before that one, by the part of the run the rewind forgets."""
        self.close()

        def keep(lines: list[str]) -> list[bool]:
            flags, following = [False] * len(lines), None  # the step of the next record with one
            for i in reversed(range(len(lines))):
                if not lines[i].strip():
                    continue
                at = _record_step(self.path, i, lines[i])
                if at is None:
                    flags[i] = following is None or following <= step
                else:
                    flags[i], following = at <= step, at
            return flags

        _rewrite(self.path, keep)

    def read_scalars(self) -> list[tuple[int, dict[str, float]]] | None:
        """Every ``(step, scalars)`` in the file, in order (a resumed logger's history for ``Plots``)."""
        self.flush()
        if not self.path.exists():
            return []
        return [(r["step"], r["scalars"]) for r in read_jsonl(self.path) if "scalars" in r and "step" in r]


def _record_step(path: Path, index: int, line: str) -> float | None:
    """A record's step for a rewind (``None``: a record without one, the config); a line that is not
    JSON (a write cut short: a full disk, a kill) counts as after every step, so the rewind drops it,
    with a warning naming the file and line."""
    try:
        return json.loads(line).get("step")
    except (json.JSONDecodeError, AttributeError):
        warnings.warn(f"{path}: line {index + 1} is not a JSON record (a write cut short); dropped by the rewind.",
                      RuntimeWarning, stacklevel=4)
        return math.inf


def _cells(line: str) -> int:
    """The number of cells of one CSV line (a quoted name may hold a comma)."""
    return len(next(csv.reader([line]), []))


def _row_step(line: str) -> float:
    """A CSV row's step for a rewind; a row whose step is not a number counts as after every step."""
    try:
        return int(line.split(",", 1)[0])
    except ValueError:
        return math.inf


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Every record of a ``JsonlWriter`` file (a last line cut short by a crash is left out)."""
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise ValueError(f"{path}: line {i + 1} is not a JSON record; the file is damaged.") from None
    return records


class CsvWriter(_FileWriter):
    """Scalars as CSV rows ``step,<metric>,...``; when a new metric appears the header grows.

    Growing rewrites the file through a temporary file and an atomic rename, so a reader (or a
    crash) never sees a half-written file; rows written before have empty cells for new columns.
    """

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        self.columns: list[str] | None = None

    def _read_columns(self) -> list[str]:
        if self.path.exists() and self.path.stat().st_size:
            with open(self.path, newline="") as f:
                return next(csv.reader(f))
        return []

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Appends a row; a new metric name adds a column (the file is rewritten atomically)."""
        if self.columns is None or (self._file is None and not self.path.exists()):  # new, or removed since
            self.columns = self._read_columns()
        new = [k for k in scalars if k not in self.columns]
        if new or not self.columns:
            self._grow(new)
        row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        csv.DictWriter(self._open(), fieldnames=self.columns).writerow(row)

    def rewind(self, step: int) -> None:
        """Drops the rows after ``step``, and a row cut short (a full disk, a crash: no line end, or
        fewer cells than the header), which the next row would otherwise be glued onto."""
        self.close()

        def keep(lines: list[str]) -> list[bool]:
            cells = _cells(lines[0]) if lines else 0
            flags = [True] + [_row_step(line) <= step for line in lines[1:]]
            for i, line in enumerate(lines[1:], 1):
                if not line.endswith("\n") or _cells(line) != cells:
                    if line.strip():
                        warnings.warn(f"{self.path}: row {i + 1} is cut short ({line.strip()[:40]!r}); dropped by "
                                      "the rewind.", RuntimeWarning, stacklevel=4)
                    flags[i] = False
            return flags

        _rewrite(self.path, keep)

    def read_scalars(self) -> list[tuple[int, dict[str, float]]]:
        """Every row as ``(step, {metric: value})``, empty cells left out."""
        self.flush()
        if not self.path.exists() or not self.path.stat().st_size:
            return []
        rows = []
        with open(self.path, newline="") as f:
            lines = f.readlines()
        if lines and not lines[-1].endswith("\n"):  # a last row cut short (a crash): its cells may be cut too
            warnings.warn(f"{self.path}: the last row is cut short ({lines[-1].strip()[:40]!r}); left out of the "
                          "history read back.", RuntimeWarning, stacklevel=2)
            lines = lines[:-1]
        for row in csv.DictReader(lines, restkey=None):
            row.pop(None, None)  # cells beyond the header (a line glued onto one cut short)
            try:
                rows.append((int(row.pop("step")), {k: float(v) for k, v in row.items() if v not in ("", None)}))
            except (TypeError, ValueError):
                warnings.warn(f"{self.path}: a row that is not numbers ({row}) is left out of the history read "
                              "back.", RuntimeWarning, stacklevel=2)
        return rows

    def _grow(self, new: list[str]) -> None:
        self.close()
        old_rows = []
        if self.path.exists() and self.path.stat().st_size:
            with open(self.path, newline="") as f:
                old_rows = list(csv.DictReader(f))
        self.columns = (self.columns or ["step"]) + new
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns)
            writer.writeheader()
            writer.writerows(old_rows)
        os.replace(tmp, self.path)
