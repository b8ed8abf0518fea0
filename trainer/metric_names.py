"""Which way a metric improves, read from its name: ``mode="auto"`` of ``EarlyStopping`` and ``Checkpoint``.

As Keras's ``mode="auto"``, by whole words of the name (``val_loss``, ``top1_acc``): a loss or an
error is better lower, an accuracy higher; a name that says neither (or both) is refused with a
request for ``mode="min"`` or ``"max"`` rather than guessed.
"""

from __future__ import annotations

import re

MODES = ("auto", "min", "max")
LOWER_IS_BETTER = frozenset({"loss", "error", "err", "mse", "mae", "rmse", "bpc", "perplexity", "ppl", "nll"})
HIGHER_IS_BETTER = frozenset({"acc", "accuracy", "auc", "precision", "recall", "f1", "iou", "dice"})


def check_mode(mode: str, who: str) -> None:
    """Refuses a ``mode`` that is none of ``MODES``."""
    if mode not in MODES:
        raise ValueError(f"{who}: mode={mode!r} is not known; choose 'auto', 'min' (for losses) or 'max' (for accuracy).")


def resolve_mode(monitor: str, mode: str, who: str) -> str:
    """``"min"`` or ``"max"`` for ``monitor``: ``mode`` itself, or with ``"auto"`` read from the words of
    the name's last part (``eval/top1_acc`` -> ``max``); ``who`` names the caller in the errors."""
    check_mode(mode, who)
    if mode != "auto":
        return mode
    name = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", monitor.rsplit("/", 1)[-1]).lower()  # valLoss -> val_loss
    words = [w.rstrip("0123456789") or w for w in re.findall(r"[a-z]+[0-9]*|[0-9]+", name)]  # loss2 -> loss
    words.append(re.sub(r"[^a-z0-9]", "", name))  # the name run together: mIoU -> miou

    def says(known: frozenset) -> bool:  # a word that is one of them, or starts or ends with one (f1score, miou)
        return any(w == k or (len(k) >= 2 and (w.startswith(k) or w.endswith(k))) for w in words for k in known)

    lower, higher = says(LOWER_IS_BETTER), says(HIGHER_IS_BETTER)
    if lower != higher:
        return "min" if lower else "max"
    raise ValueError(f"{who}(monitor={monitor!r}) cannot tell from the name whether a higher or a lower value "
                     "is better; pass mode='max' or mode='min'.")
