"""Griffe extension for the API reference: crosschip's docstrings use a few reStructuredText
constructs (``:class:`x```, ``::`` before a literal block); render them as Markdown."""

from __future__ import annotations

import re

import griffe

# :class:`~pkg.Name` -> `Name`; :func:`pkg.name` -> `pkg.name`; :data:`x` -> `x`.
_ROLE = re.compile(r":(?:class|func|meth|data|attr|mod|exc|obj):`(~?)([^`]+)`")
# "text::" at the end of a paragraph introduces an indented literal block.
_LITERAL = re.compile(r"::\n(?=\n)")


def _role(match: re.Match) -> str:
    tilde, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if tilde else target}`"


class RestructuredTextRoles(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            text = _ROLE.sub(_role, obj.docstring.value)
            obj.docstring.value = _LITERAL.sub(":\n", text)
