"""constraints.txt, the dependency lock: complete for pyproject.toml, installed here, refreshable.

The refresh test resolves against the package indexes (about 20 s here, network needed, as for
the install CI does first), so it runs with the rest; the others read files and metadata only.
"""

from __future__ import annotations

import importlib.util
import platform
import random
import re
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import tomllib
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "constraints.txt"
REFRESH = "python3 .ci/lock.py"


def load_lock_tool():
    spec = importlib.util.spec_from_file_location("ci_lock", REPO / ".ci" / "lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def project_requirements() -> list[Requirement]:
    """The dependencies and every extra's requirements (the lock covers `.[dev]`, so all)."""
    extras = project().get("optional-dependencies", {})
    reqs = [Requirement(r) for r in project()["dependencies"] + [r for rs in extras.values() for r in rs]]
    return [r for r in reqs if canonicalize_name(r.name) != canonicalize_name(project()["name"])]


def parse_lock(text: str) -> dict[str, Version]:
    """Canonical name -> pinned version; fails on anything but comments and `name==version`."""
    pins: dict[str, Version] = {}
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    for line in lines:
        match = re.fullmatch(r"([a-z0-9]+(?:-[a-z0-9]+)*)==(\S+)", line)
        assert match, f"not a canonical `name==version` pin: {line!r}"
        name, version = match.groups()
        assert name not in pins, f"{name} pinned twice"
        pins[name] = Version(version)
    assert list(pins) == sorted(pins), "pins are not sorted by name"
    return pins


def check_lock(text: str) -> dict[str, Version]:
    """A well-formed lock that pins every requirement of pyproject.toml within its specifier."""
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert header and text.startswith("#"), "the lock starts with its header"
    assert REFRESH in "\n".join(header), "the header says how the lock was made"
    assert re.search(r"for CPython \d+\.\d+ on \w+ \w+", "\n".join(header)), "the header names the platform"
    pins = parse_lock(text)
    assert len(pins) > 20  # the whole set, transitive dependencies included
    for req in project_requirements():
        if req.marker and not req.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"{req} (pyproject.toml) is not pinned"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} violates {req}"
    return pins


def installed_closure() -> dict[str, str]:
    """Name -> installed version of every distribution pyproject's requirements pull in."""
    todo = [(r, "") for r in project_requirements()]
    seen: set[tuple[str, frozenset[str]]] = set()
    found: dict[str, str] = {}
    while todo:
        req, extra = todo.pop()
        if req.marker and not req.marker.evaluate({**default_environment(), "extra": extra}):
            continue
        name = canonicalize_name(req.name)
        if (name, frozenset(req.extras)) in seen:
            continue
        seen.add((name, frozenset(req.extras)))
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "(not installed)"
            continue
        for line in metadata.requires(name) or []:
            todo.extend((Requirement(line), e) for e in ("", *req.extras))
    return found


def test_committed_lock_covers_pyproject():
    check_lock(LOCK.read_text())


def test_environment_is_installed_from_the_lock():
    """Every distribution fastloc[dev] pulls in is pinned, and installed at its pinned version."""
    pins = parse_lock(LOCK.read_text())
    installed = installed_closure()
    wrong = {}  # name -> (installed, locked)
    for name, version in installed.items():
        if name not in pins or version == "(not installed)" or Version(version) != pins[name]:
            wrong[name] = (version, str(pins.get(name, "unpinned")))
    fix = f"install with `pip install -c constraints.txt -e '.[dev]'`, or refresh the lock: {REFRESH}"
    assert not wrong, f"installed != locked (name: (installed, locked)): {wrong}; {fix}"
    unused = sorted(set(pins) - set(installed))
    assert not unused, f"pinned but not required by pyproject.toml here: {unused}; refresh: {REFRESH}"


def test_readme_commands_and_ci_install_from_the_lock():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", section, re.DOTALL)
    assert len(commands) == 2, "README: the Two commands section holds two commands"
    for command, install in zip(commands, (["-e", "."], ["-e", ".[dev]"]), strict=True):
        steps = [shlex.split(step) for step in command.split("&&")]
        assert ["pip", "install", "-c", "constraints.txt", *install] in steps, command
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert commands[1] in ci, ".ci/run must run exactly the README's test command"
    assert commands[1].endswith("python -m pytest")


def test_lock_text_is_deterministic():
    """The same resolution gives the same file, whatever order pip reports it in."""
    tool = load_lock_tool()
    names = ["Torch", "typing_extensions", "Jinja2", "zope.interface", "a-b"]
    environment = {
        "platform_python_implementation": "CPython",
        "python_version": "3.11",
        "sys_platform": "linux",
        "platform_machine": "x86_64",
    }
    install = [{"metadata": {"name": n, "version": f"1.{i}"}} for i, n in enumerate(names)]
    report = {"pip_version": "23.2.1", "environment": environment, "install": install}
    text = tool.render(report, ["dev"])
    random.Random(0).shuffle(report["install"])
    assert tool.render(report, ["dev"]) == text
    want = {"a-b": "1.4", "jinja2": "1.2", "torch": "1.0", "typing-extensions": "1.1", "zope-interface": "1.3"}
    assert parse_lock(text) == {name: Version(v) for name, v in want.items()}
    assert "for CPython 3.11 on linux x86_64" in text and REFRESH in text


def test_refresh_writes_and_checks_without_a_network(tmp_path, monkeypatch, capsys):
    """The tool's own logic, with pip's resolution replaced by the committed lock's pins."""
    tool = load_lock_tool()
    pins = parse_lock(LOCK.read_text())
    environment = {"platform_python_implementation": "CPython", "python_version": "3.11"}
    environment |= {"sys_platform": "linux", "platform_machine": "x86_64"}
    install = [{"metadata": {"name": name, "version": str(v)}} for name, v in reversed(pins.items())]
    asked = []

    def resolve(reqs):
        asked.extend(reqs)
        return {"pip_version": "23.2.1", "environment": environment, "install": install}

    monkeypatch.setattr(tool, "resolve", resolve)
    out = tmp_path / "lock.txt"
    assert tool.main(["--output", str(out)]) == 0
    assert sorted(str(Requirement(r)) for r in asked) == sorted(str(r) for r in project_requirements())
    assert parse_lock(out.read_text()) == pins and check_lock(out.read_text())
    assert tool.main(["--check", "--output", str(out)]) == 0
    out.write_text(out.read_text().replace(f"torch=={pins['torch']}", "torch==2.4.0"))
    capsys.readouterr()
    assert tool.main(["--check", "--output", str(out)]) == 1
    captured = capsys.readouterr()
    assert captured.out.splitlines() == ["- torch==2.4.0", f"+ torch=={pins['torch']}"]
    assert "out of date" in captured.err


def test_refresh_resolves_a_complete_lock(tmp_path):
    """The refresh tool, run for real against the indexes, writes a lock that passes the checks."""
    out = tmp_path / "constraints.txt"
    command = [sys.executable, str(REPO / ".ci" / "lock.py"), "--output", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr
    pins = check_lock(out.read_text())
    assert {"pytest", "ruff", "torch", "triton"} <= set(pins)  # the dev extra and transitive ones
    python = f"{platform.python_implementation()} {sys.version_info[0]}.{sys.version_info[1]}"
    assert f"for {python} on {sys.platform} {platform.machine()}" in out.read_text()


def damaged(edit) -> str:
    lines = LOCK.read_text().splitlines()
    return "\n".join(edit(lines)) + "\n"


DAMAGES = {  # id -> edit of the committed lock's lines
    "no-header": lambda ls: [ln for ln in ls if not ln.startswith("#")],
    "missing": lambda ls: [ln for ln in ls if not ln.startswith("torch==")],
    "violates": lambda ls: [re.sub(r"^torch==.*", "torch==2.3.1", ln) for ln in ls],  # torch>=2.4
    "range": lambda ls: [re.sub(r"^torch==", "torch>=", ln) for ln in ls],
    "name": lambda ls: [ln.upper() if ln.startswith("torch==") else ln for ln in ls],  # not canonical
    "unsorted": lambda ls: sorted(ls, key=lambda ln: (not ln.startswith("#"), ln.startswith("torch=="))),
    "duplicate": lambda ls: ls + [ls[-1]],
}


@pytest.mark.parametrize("edit", list(DAMAGES.values()), ids=list(DAMAGES))
def test_damaged_locks_are_caught(edit):
    check_lock(LOCK.read_text())  # the committed one passes
    with pytest.raises(AssertionError):
        check_lock(damaged(edit))
