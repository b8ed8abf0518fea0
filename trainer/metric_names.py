"""Which way a metric improves, read from its name: ``mode="auto"`` of ``EarlyStopping`` and ``Checkpoint``.

As Keras's ``mode="auto"``: a loss or an error is better lower, an accuracy higher; a name that says
neither is refused with a request for ``mode="min"`` or ``"max"`` rather than guessed.
"""

from __future__ import annotations

MODES = ("auto", "min", "max")
LOWER_IS_BETTER = ("loss", "error", "err", "mse", "mae", "rmse", "bpc", "perplexity", "nll")
HIGHER_IS_BETTER = ("acc", "auc", "precision", "recall", "f1", "iou", "dice")


def resolve_mode(monitor: str, mode: str, who: str) -> str:
    """``"min"`` or ``"max"`` for ``monitor``: ``mode`` itself, or with ``"auto"`` read from the name's
    last part (``eval/accuracy`` -> ``max``); ``who`` names the caller in the errors."""
    if mode not in MODES:
        raise ValueError(f"{who}: mode={mode!r} is not known; choose 'auto', 'min' (for losses) or 'max' (for accuracy).")
    if mode != "auto":
        return mode
    name = monitor.rsplit("/", 1)[-1].lower()
    if any(word in name for word in LOWER_IS_BETTER):
        return "min"
    if any(word in name for word in HIGHER_IS_BETTER):
        return "max"
    raise ValueError(f"{who}(monitor={monitor!r}) cannot tell from the name whether a higher or a lower value "
                     "is better; pass mode='max' or mode='min'.")
