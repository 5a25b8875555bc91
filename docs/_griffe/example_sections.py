"""A griffe extension for the API reference: read `Example:` sections as `Examples:`.

The library's docstrings follow Google style with a singular `Example:` section holding
doctests. Griffe parses only `Examples:` as an examples section (its `>>>` lines become
highlighted code); a singular `Example:` becomes an admonition of plain Markdown, where the
doctests run together and `[0.2, 0.36]` reads as a link. The docstrings stay as they are; the
reference renders them as examples.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^Example:[ \t]*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    """Rename a docstring's `Example:` section to `Examples:` before it is parsed."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None and "Example:" in obj.docstring.value:
            obj.docstring.value = _EXAMPLE.sub("Examples:", obj.docstring.value)
