"""Every usage example in the public docstrings runs and gives what it shows."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import diffaccel
import diffaccel.kernels
import diffaccel.pipelines


def _modules() -> list[str]:
    names = ["diffaccel"]
    for package in (diffaccel, diffaccel.kernels, diffaccel.pipelines):
        names.append(package.__name__)
        names += [info.name for info in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
    return sorted(set(names))


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"


def test_public_api_is_documented():
    for name in diffaccel.__all__:
        assert getattr(diffaccel, name).__doc__, f"diffaccel.{name} has no docstring"
