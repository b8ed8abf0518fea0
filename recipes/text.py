"""Text data for the language-model recipe: UTF-8 files, a character vocabulary, windows of tokens.

``load_text`` reads any UTF-8 file (with clear errors for empty, too short or undecodable input);
``default_corpus`` is the standard library's own documentation (``pydoc_data.topics``, ~465 kB of
English that ships with every Python). ``TextWindows`` draws random training windows and is
checkpointable like ``ArrayLoader`` (the trainer resumes on the same next window);
``eval_windows`` cuts fixed, consecutive windows for validation.

Example::

    text = default_corpus()
    vocab = CharVocab.from_text(text[: int(0.9 * len(text))])
    train = TextWindows(vocab.encode(text[: int(0.9 * len(text))]), context=128, batch_size=32)
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from trainer.data import ArrayLoader, ArrayLoaderIterator, checked_seed


def default_corpus() -> str:
    """The documentation topics of the standard library (``pydoc_data.topics``), joined."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def load_text(path: str | os.PathLike, min_chars: int = 1) -> str:
    """The text of a UTF-8 file.

    Raises:
      FileNotFoundError: no such file.
      ValueError: the file cannot be read (a permission), is empty, shorter than ``min_chars``
        characters, or not valid UTF-8 (the message gives the byte offset).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--text {path}: no such file.")
    if not path.is_file():
        raise ValueError(f"--text {path} is not a regular file (a folder or a device); give a UTF-8 text file.")
    try:
        data = path.read_bytes()
    except OSError as err:  # a permission, a folder's entry that went away
        raise ValueError(f"--text {path} cannot be read: {(err.strerror or str(err)).lower()}. Make it readable "
                         "(chmod a+r) or pass another file.") from None
    if not data:
        raise ValueError(f"--text {path} is empty; give a UTF-8 text file with some content.")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"--text {path} is not UTF-8 text: undecodable byte {data[err.start]:#04x} at byte offset "
                         f"{err.start}. Convert it (e.g. iconv -t utf-8) or pass another file.") from None
    if len(text) < min_chars:
        raise ValueError(f"--text {path} has {len(text)} characters, fewer than the {min_chars} needed "
                         "(one context window plus one, in each split); use a longer file or a smaller --context.")
    return text


class CharVocab:
    """Characters <-> ids; id 0 stands for any character the vocabulary has not seen."""

    UNKNOWN = 0

    def __init__(self, chars: str):
        self.chars = chars
        self._index = {c: i + 1 for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> "CharVocab":
        return cls("".join(sorted(set(text))))

    def __len__(self) -> int:
        return len(self.chars) + 1

    def encode(self, text: str) -> np.ndarray:
        return np.array([self._index.get(c, self.UNKNOWN) for c in text], dtype=np.int32)

    def decode(self, ids) -> str:
        return "".join(self.chars[i - 1] if 0 < i <= len(self.chars) else "\ufffd" for i in np.asarray(ids).tolist())


class TextWindows(ArrayLoader):
    """Random windows ``{"tokens": [B, T], "targets": [B, T]}`` (targets shifted by one) of a token array.

    Epoch ``e``'s window starts depend only on ``(seed, e)``; ``batches_per_epoch`` defaults to one
    pass's worth of tokens. Iteration, ``iterator(epoch, position)``, ``get_state`` / ``set_state``
    work as for ``ArrayLoader``, so a resumed run draws the same next window.
    """

    def __init__(self, tokens: np.ndarray, *, context: int, batch_size: int, seed: int = 0,
                 batches_per_epoch: int | None = None):
        tokens = np.asarray(tokens, np.int32)
        if context <= 0 or batch_size <= 0:
            raise ValueError(f"context={context} and batch_size={batch_size} must be positive.")
        if len(tokens) < context + 1:
            raise ValueError(f"the text has {len(tokens)} tokens, fewer than one window of context={context} "
                             "plus one target; use more text or a smaller context.")
        self.tokens, self.context = tokens, context
        self.num_starts = len(tokens) - context
        self.batches_per_epoch = batches_per_epoch or max(1, len(tokens) // (context * batch_size))
        self.batch_size, self.seed, self.shuffle, self.drop_remainder = batch_size, checked_seed(seed), True, True
        self.num_examples = self.batches_per_epoch * batch_size

    def __len__(self) -> int:
        return self.batches_per_epoch

    def epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng((self.seed, epoch)).integers(0, self.num_starts, self.num_examples)

    def take(self, starts: np.ndarray) -> dict[str, np.ndarray]:
        index = starts[:, None] + np.arange(self.context + 1)[None, :]
        windows = self.tokens[index]
        return {"tokens": windows[:, :-1], "targets": windows[:, 1:]}

    def iterator(self, epoch: int = 0, position: int = 0) -> ArrayLoaderIterator:
        return ArrayLoaderIterator(self, epoch, position)


def eval_windows(tokens: np.ndarray, *, context: int, batch_size: int, max_windows: int | None = None) -> ArrayLoader:
    """Non-overlapping windows of ``tokens`` (a fixed validation set): all of them, or ``max_windows``
    spread evenly over the text (a large held-out text then costs each evaluation a bounded time)."""
    tokens = np.asarray(tokens, np.int32)
    count = (len(tokens) - 1) // context
    if count == 0:
        raise ValueError(f"the validation text has {len(tokens)} tokens, fewer than one window of "
                         f"context={context} plus one; use more text or a smaller context.")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows={max_windows!r} must be a positive number of windows, or None for all.")
    chosen = np.arange(count)
    if max_windows is not None and count > max_windows:
        chosen = np.linspace(0, count - 1, max_windows).round().astype(np.int64)  # distinct: count > max_windows
    index = chosen[:, None] * context + np.arange(context + 1)[None, :]
    windows = tokens[index]
    return ArrayLoader({"tokens": windows[:, :-1], "targets": windows[:, 1:]}, batch_size, shuffle=False,
                       drop_remainder=False)
