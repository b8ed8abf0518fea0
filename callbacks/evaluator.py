"""``Evaluator`` (defined beside the engine in ``trainer.evaluation``, which ``fit(eval_data=)`` uses)."""

from trainer.evaluation import Evaluator

__all__ = ["Evaluator"]
