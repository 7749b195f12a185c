"""What every tyro command line of fastloc shares.

``flowing_help`` hands tyro each field's docstring as one flowing paragraph, so that ``--help``
wraps it to the terminal instead of keeping the source's line breaks.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import itertools


def flowing_help(cls):
    """Class decorator: give tyro flowing help texts for a config dataclass and its fields.

    tyro keeps the hard line breaks of attribute docstrings (it looks for paragraph breaks before
    removing the indentation), so wrapped source lines came out as ragged help lines. This reads
    the attribute docstrings of the class and its bases from the source, joins each into one line,
    and puts them in the class docstring's ``Args:`` section, which tyro reads first.
    """
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            body = _class_body(klass)
        except (OSError, TypeError, SyntaxError, UnicodeDecodeError):  # no source (a zipped install?)
            return cls  # tyro reads the docstrings itself
        for node, after in itertools.pairwise(body):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = " ".join(after.value.value.split())
    names = [f.name for f in dataclasses.fields(cls)]
    paragraphs = (inspect.getdoc(cls) or "").split("\n\n")
    summary = "\n\n".join(" ".join(p.split()) for p in paragraphs if p.strip())
    args = "".join(f"    {name}: {docs[name]}\n" for name in names if name in docs)
    cls.__doc__ = f"{summary}\n\nArgs:\n{args}" if args else summary
    return cls


@functools.cache
def _module_tree(filename: str) -> ast.Module:
    with open(filename, encoding="utf-8") as f:
        return ast.parse(f.read())


def _class_body(klass: type) -> list[ast.stmt]:
    """The statements of a top-level class, from its module's source (parsed once per module)."""
    filename = inspect.getsourcefile(klass)
    if filename is None:
        raise OSError(f"no source file for {klass.__qualname__}")
    for node in _module_tree(filename).body:
        if isinstance(node, ast.ClassDef) and node.name == klass.__qualname__:
            return node.body
    raise OSError(f"{klass.__qualname__} not found at the top level of {filename}")
