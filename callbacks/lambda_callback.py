"""``LambdaCallback``: hooks given as functions, as Keras's ``LambdaCallback``, for a quick hook without a class."""

from __future__ import annotations

from typing import Any, Callable

from trainer.events import EVENTS, OTHER_NAMES, Callback


class LambdaCallback(Callback):
    """A callback whose hooks are the functions given by event name, each taking the trainer first, then the
    event's arguments: ``LambdaCallback(on_epoch_end=lambda trainer, epoch, logs: print(epoch, logs["loss"]))``.

    A name that is no event is refused with the event it may have meant (Keras's ``on_train_batch_end``:
    ``on_step_end``); a function that cannot take its event's arguments (Keras's ``(epoch, logs)``) is
    refused when the callback list is built, as a method would be.
    """

    def __init__(self, **hooks: Callable[..., Any]):
        for name, hook in hooks.items():
            if name not in EVENTS:
                meant = f" (its event here is {OTHER_NAMES[name]})" if name in OTHER_NAMES else ""
                raise TypeError(f"LambdaCallback got {name}=, which is no trainer event{meant}; the events are "
                                f"{list(EVENTS)}.")
            if not callable(hook):
                raise TypeError(f"LambdaCallback's {name} must be a function (trainer, ...); got {type(hook).__name__}.")
            setattr(self, name, hook)
        self.hooks = tuple(hooks)

    def __repr__(self) -> str:
        return f"LambdaCallback({', '.join(self.hooks)})"
