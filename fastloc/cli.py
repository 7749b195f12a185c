"""What every tyro command line of fastloc shares.

``flowing_help`` hands tyro each field's docstring as one flowing paragraph, so that ``--help``
wraps it to the terminal instead of keeping the source's line breaks. ``require``, ``check_name``
and ``check_writable`` refuse bad option values before any work (``BadValue``: one line, exit 2);
``os_error_line`` turns a file-system failure into one line that names the path, and
``run_command`` ends every command that way: what a user can cause is one line, never a traceback.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import itertools
import sys
from collections.abc import Callable
from pathlib import Path


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


# ---------------------------------------------------------------- bad values, names, folders


class BadValue(ValueError):
    """An option value that makes no sense, found before any work: the message names the option,
    the rule and the value (every CLI prints it as one ``error:`` line and exits 2)."""


def require(ok: bool, flag: str, value: object, rule: str) -> None:
    """A ``BadValue`` ``--flag RULE, got VALUE`` unless ``ok``."""
    if not ok:
        raise BadValue(f"{flag} {rule}, got {value!r}")


def check_name(flag: str, value: str) -> None:
    """A name that becomes one folder or file name: one plain path component (not empty, no '/',
    not '.' or '..', not starting with '.', no control character)."""
    bad = not value or value.startswith(".") or any(c in value for c in "/\\") or not value.isprintable()
    require(
        not bad, flag, value, "must be a plain name (not empty, no '/', not starting with '.', no control characters)"
    )


def check_writable(flag: str, folder: Path) -> Path:
    """Create ``folder`` (and its parents) and prove a file can be written in it, before any work;
    a ``BadValue`` naming the option and the path otherwise. Nothing is left behind but the folder."""
    import tempfile

    folder = Path(folder)
    try:
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(20, "not a folder", str(folder))
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".fastloc-write-check-"):
            pass
    except OSError as exc:
        raise BadValue(f"{flag} {folder}: cannot write there ({exc.strerror or exc})") from None
    return folder


def exception_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, at most ``limit`` characters (its type's name if empty):
    the reason inside a one-line error about a file or a download."""
    return " ".join(str(exc).split())[:limit] or type(exc).__name__


def os_error_line(exc: OSError) -> str:
    """An OSError as one line that names the path: ``PATH: REASON`` (a full disk adds what to do)."""
    import errno

    where = f"{exc.filename}: " if exc.filename else ""
    line = f"{where}{exc.strerror or exc}"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        line += "; free some space and rerun the same command"
    return line


# the errors whose message says what to fix, by the module that defines them: caught only once
# their module is loaded (a command refused for its option values never imports torch and timm)
USER_ERRORS = {
    "fastloc.data.shards": "ShardError",
    "fastloc.models.registry": "WeightsError",
    "fastloc.probe.cache": "CacheError",
    "fastloc.align.checkpoint": "CheckpointError",
    "fastloc.launch.submit": "SubmitError",
}


def user_errors() -> tuple[type[Exception], ...]:
    """What the CLIs print as one ``error:`` line (exit 2): ValueError (BadValue among them) and
    the data, weights, cache, checkpoint and submission errors of the modules loaded so far."""
    loaded = [getattr(sys.modules[m], name) for m, name in USER_ERRORS.items() if m in sys.modules]
    return (ValueError, *loaded)


def run_command(body: Callable[[], int], interrupted: str, failures: tuple[type[Exception], ...] = ()) -> int:
    """``body()``'s exit status, with every way a user can make it stop as one line on stderr:
    tyro's own exits kept (--help 0, a usage error 2); a bad value, bad data, weights, cache or
    checkpoint (``user_errors``) and any ``OSError`` (a full disk: the path) ``error: ...``, exit 2;
    one of ``failures`` (the run itself failed, e.g. a non-finite loss) ``error: ...``, exit 1;
    Ctrl-C ``interrupted: INTERRUPTED``, exit 130."""
    try:
        return body()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    except KeyboardInterrupt:
        print(f"interrupted: {interrupted}", file=sys.stderr)
        return 130
    except Exception as exc:
        if isinstance(exc, failures):
            print(f"error: {exc}", file=sys.stderr)
            return 1
        if isinstance(exc, OSError):
            print(f"error: {os_error_line(exc)}", file=sys.stderr)
            return 2
        if isinstance(exc, user_errors()):
            print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)  # one line, whatever the message
            return 2
        raise
    finally:
        _release_process_group()


def _release_process_group() -> None:
    """Destroy the process group a command joined (torchrun), before the interpreter exits: a gloo
    group left alive at exit can abort its process ("terminate called without an active exception",
    seen in a 2-rank k-NN run). torch is looked up, not imported: most commands never load it."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
