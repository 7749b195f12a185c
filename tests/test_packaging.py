"""The installed package is the repository's: every subpackage is listed, none leaks to top level."""

from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_installed():
    setup = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setup["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "fastloc").rglob("__init__.py")}
    assert found <= listed, f"subpackages missing from pyproject.toml: {sorted(found - listed)}"
    assert setup["package-dir"] == {"fastloc.kernels": "kernels", "fastloc.launch": "launch"}
    assert all(name.startswith("fastloc") for name in listed)  # no top-level kernels / launch
