"""``Checkpoint`` (defined beside the engine in ``trainer.checkpoint``, which ``fit(resume=)`` uses)."""

from trainer.checkpoint import Checkpoint

__all__ = ["Checkpoint"]
