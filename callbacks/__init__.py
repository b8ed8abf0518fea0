"""Plug-ins for the Trainer: each reacts to events and none owns the loop.

``Callback`` (the base class, defined in ``trainer.events``) and ``EpochSummary``.
"""

from trainer.events import Callback
from callbacks.epoch_summary import EpochSummary

__all__ = ["Callback", "EpochSummary"]
