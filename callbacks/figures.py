"""Small matplotlib helpers shared by the plotting callbacks (Agg canvas, no global backend)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def new_figure(width: float = 6.4, height: float = 4.0):
    """A matplotlib ``Figure`` on an Agg canvas, independent of pyplot's global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def figure_to_array(figure) -> np.ndarray:
    """The rendered figure as an ``[H, W, 3]`` uint8 array."""
    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()


def save_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Writes an ``[H, W, C]`` uint8 image as PNG (creating the folder)."""
    from matplotlib import image as mpl_image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    mpl_image.imsave(path, image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=255)
    return path
