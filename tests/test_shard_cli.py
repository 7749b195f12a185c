"""The ``python -m fastloc.shard`` command line: every subcommand's --help, and the README demo."""

import ast
import dataclasses
import inspect
import itertools
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from fastloc.shard.__main__ import InspectConfig, VerifyConfig, main
from fastloc.shard.sources import CONVERTERS

REPO = Path(__file__).resolve().parents[1]
SUBCOMMANDS = {**CONVERTERS, "verify": VerifyConfig, "inspect": InspectConfig}


def field_docstrings(cls) -> dict[str, str]:
    """Attribute docstrings (a string literal right after a field) of a dataclass and its bases,
    read from the source: independent of how tyro extracts them."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body
        for node, after in itertools.pairwise(body):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = after.value.value
    return docs


def normalise(text: str) -> str:
    """Help text without tyro's box drawing and line wrapping: single spaces only."""
    text = re.sub(r"[\u2500-\u257f]", " ", text)  # box-drawing characters (borders of the panels)
    return " ".join(text.split())


def run_help(argv, capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code in (0, None)
    captured = capsys.readouterr()
    return captured.out + captured.err


def test_every_subcommand_config_is_covered():
    assert set(SUBCOMMANDS) == {
        "synthetic",
        "coco",
        "ade20k",
        "imagenet",
        "voc",
        "context",
        "cityscapes",
        "verify",
        "inspect",
    }


@pytest.mark.parametrize("name", list(SUBCOMMANDS))
def test_subcommand_help_explains_every_field(name, capsys, monkeypatch):
    cls = SUBCOMMANDS[name]
    text = run_help([name, "--help"], capsys, monkeypatch)
    flat = normalise(text)
    docs = field_docstrings(cls)
    fields = dataclasses.fields(cls)
    assert fields
    for f in fields:
        doc = " ".join(docs.get(f.name, "").split())
        assert doc, f"{cls.__name__}.{f.name} has no docstring"
        if "Positional" in str(f.type):
            assert re.search(rf"\b{f.name.upper()}\b", text), f"{name} --help does not show {f.name.upper()}"
        else:
            flag = "--" + f.name.replace("_", "-")
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), f"{name} --help lacks {flag}"
        # the field's explanation is in the help: its first words, and (tyro only wraps it) all of it
        first = " ".join(doc.split()[:3])
        assert first in flat, f"{name} --help does not explain {f.name}: {first!r} missing"
        assert doc in flat, f"{name} --help shows only part of the docstring of {f.name}"
    # the class docstring (what the subcommand does) opens the help
    summary = " ".join(cls.__doc__.split()[:4])
    assert summary in flat


@pytest.mark.parametrize("name", list(SUBCOMMANDS))
def test_help_texts_flow_as_paragraphs(name, capsys, monkeypatch):
    """Each field's help is one paragraph that the terminal wraps, not the docstring's source lines:
    on a terminal wide enough for every text, each one sits on a single line."""
    monkeypatch.setenv("COLUMNS", "700")
    with pytest.raises(SystemExit):
        main([name, "--help"])
    captured = capsys.readouterr()
    rows = [" ".join(normalise(line).split()) for line in (captured.out + captured.err).splitlines()]
    cls = SUBCOMMANDS[name]
    for field, doc in field_docstrings(cls).items():
        text = " ".join(doc.split())
        assert any(text in row for row in rows), f"{name} --help breaks the text of {field} over lines"
    summary = " ".join(inspect.getdoc(cls).split("Args:")[0].split())
    assert any(summary in row for row in rows), f"{name} --help breaks its description over lines"


def test_top_level_help_lists_all_subcommands():
    result = subprocess.run(
        [sys.executable, "-m", "fastloc.shard", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "usage: python -m fastloc.shard" in result.stdout
    for name in SUBCOMMANDS:
        assert re.search(rf"\b{name}\b", result.stdout), f"--help does not list {name}"


def test_convert_verify_and_inspect_the_default_synthetic_set(tmp_path):
    steps = [
        ["python", "-m", "fastloc.shard", "synthetic"],
        ["python", "-m", "fastloc.shard", "verify", "shards/synthetic/train"],
        ["python", "-m", "fastloc.shard", "inspect", "shards/synthetic/train"],
    ]

    # The default options: 512 synthetic samples convert in about 5 s on 2 cores.
    def run(step):
        result = subprocess.run([sys.executable, *step[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{shlex.join(step)}\n{result.stdout}\n{result.stderr}"
        assert "Traceback" not in result.stderr
        return result

    outputs = [run(step) for step in steps]
    assert "512 samples" in outputs[0].stdout
    assert "OK" in outputs[1].stdout and "512 samples" in outputs[1].stdout
    assert "dataset synthetic" in outputs[2].stdout
    sheet = tmp_path / "synthetic-train-samples.png"
    assert sheet.is_file()
    with Image.open(sheet) as image:
        assert image.format == "PNG" and image.width >= 512 and image.height >= 256

    manifest = tmp_path / "shards" / "synthetic" / "train" / "manifest.json"
    before = manifest.read_bytes()
    again = run(steps[0])
    assert "nothing to do" in again.stdout
    assert manifest.read_bytes() == before  # untouched
