"""Shared test set-up.

TRITON_INTERPRET must be set before triton is first imported (timm, DALI and torch.compile
import it), so it is set here, at the very top, before anything else is imported.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _fixtures_root() -> Path | None:
    """Real dataset excerpts: $FASTLOC_FIXTURES, else ../shared/fixtures beside the repo."""
    for candidate in (os.environ.get("FASTLOC_FIXTURES"), REPO.parent / "shared" / "fixtures"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def fixtures() -> Path:
    """The shared fixtures folder; tests that need it skip when it is absent."""
    root = _fixtures_root()
    if root is None:
        pytest.skip("real-data fixtures not found (set FASTLOC_FIXTURES or place ../shared/fixtures)")
    return root
