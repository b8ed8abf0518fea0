"""The public surface is documented: every public name has a docstring (or, for constants, a README
mention), every public method or property of a public class says what it does, and every name of
``trainer.__all__`` and ``callbacks.__all__`` appears in the README."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
PACKAGES = ("trainer", "callbacks")
MODULES = ("trainer.losses", "trainer.optim", "trainer.export", "trainer.settings")


def public_names(module_name: str) -> list[tuple[str, object]]:
    """``__all__`` where the module has one, else what the module itself defines without a leading ``_``."""
    module = importlib.import_module(module_name)
    names = getattr(module, "__all__", None)
    if names is None:
        names = [name for name, value in vars(module).items() if not name.startswith("_")
                 and not inspect.ismodule(value) and getattr(value, "__module__", module_name) == module_name]
    return [(name, getattr(module, name)) for name in names]


def undocumented_members(cls: type) -> list[str]:
    """Public methods and properties defined on ``cls`` that have no docstring, their own or the overridden one's."""
    missing = []
    for name, value in vars(cls).items():
        function = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
        if name.startswith("_") or not (inspect.isfunction(function) or isinstance(function, property)):
            continue
        if not inspect.getdoc(getattr(cls, name)):  # an override of a documented hook inherits its docstring
            missing.append(f"{cls.__name__}.{name}")
    return missing


@pytest.mark.parametrize("module_name", PACKAGES + MODULES)
def test_every_public_name_and_its_methods_say_what_they_do(module_name):
    module_doc = importlib.import_module(module_name).__doc__ or ""
    missing = []
    for name, value in public_names(module_name):
        if inspect.ismodule(value):
            continue
        if not callable(value):  # a constant: named in the README or the module's docstring
            if name not in README and name not in module_doc:
                missing.append(name)
            continue
        if not (getattr(value, "__doc__", None) or "").strip():
            missing.append(name)
        if inspect.isclass(value):
            missing += undocumented_members(value)
    assert not missing, f"{module_name}: public names without a docstring: {missing}"


@pytest.mark.parametrize("package", PACKAGES)
def test_every_exported_name_appears_in_the_readme(package):
    names = importlib.import_module(package).__all__
    assert [name for name in names if name not in README] == []


def test_the_check_sees_a_method_without_a_docstring():
    class Documented:
        """A class."""

        def run(self):
            """Runs."""

        @property
        def size(self):
            return 1

    assert undocumented_members(Documented) == ["Documented.size"]
