"""Real file-system faults for tests: a private mount namespace (``unshare``) in which a small
tmpfs fills up or is remounted read-only; its mounts vanish with it. Tests skip, saying why,
where the machine allows no such namespace."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys

import pytest


def _unshare_works() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True, check=False
    )
    return probe.returncode == 0


needs_unshare = pytest.mark.skipif(not _unshare_works(), reason="no private mount namespace (unshare) here")


def in_private_mount(script: str) -> subprocess.CompletedProcess:
    """Run a shell script as root of a private user and mount namespace (its tmpfs mounts vanish
    with it); skip the test when the script says it could not mount (exit 98 or 99)."""
    result = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if result.returncode in (98, 99):
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr}")
    return result


def module_command(module: str, *argv) -> str:
    """``python -m MODULE ARGV...`` as one quoted shell line."""
    return shlex.join([sys.executable, "-m", module, *map(str, argv)])
