"""Every docstring example in the package runs and shows what it prints: a stale promise fails.

Examples that need a GPU are marked `# doctest: +SKIP` in place.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import pkgutil

import pytest

import earlyexit


def _modules() -> list[str]:
    names = [earlyexit.__name__]
    for info in pkgutil.walk_packages(earlyexit.__path__, prefix=f"{earlyexit.__name__}."):
        names.append(info.name)
    return sorted(names)


MODULES = _modules()


def test_every_module_is_found():
    assert {"earlyexit.model", "earlyexit.fx.analysis", "earlyexit.models.cifar_resnet"} <= set(
        MODULES
    )


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an example that writes a file writes it here
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed"
