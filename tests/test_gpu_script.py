"""``.ci/gpu --check``: the GPU machine's 15 minutes are never spent on an import error. The
check runs here in a Python where fastloc's other dependencies (pycocotools, webdataset,
submitit, DALI) and fastloc's own install are hidden, as on the GPU machine, which has only
torch, triton, timm, scipy and the .whl/ wheels: the staged tree must import, every gpu test
module must be collected, every benchmark must answer --help and the planned Leopart and NeCo
benchmarks' command lines must parse and validate."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

HIDE = """
import sys
HIDDEN = ("pycocotools", "webdataset", "submitit", "nvidia.dali")
# fastloc's editable install (its finder, path hook and path entry) is gone too
sys.meta_path[:] = [f for f in sys.meta_path if "Editable" not in getattr(f, "__name__", type(f).__name__)]
sys.path_hooks[:] = [h for h in sys.path_hooks if "Editable" not in getattr(h, "__qualname__", "")]
sys.path[:] = [p for p in sys.path if "__editable__" not in p]


class Hide:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name in HIDDEN or name.startswith(tuple(h + "." for h in HIDDEN)):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden, as on the GPU machine)", name=name)
        return None


sys.meta_path.insert(0, Hide)
"""


def test_the_gpu_script_imports_collects_and_answers_help_where_only_torch_triton_and_timm_are(tmp_path):
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(HIDE)
    env = {**os.environ, "PYTHONPATH": str(hide), "PYTHON": sys.executable}
    hidden = subprocess.run([sys.executable, "-c", "import fastloc"], env=env, cwd=tmp_path, capture_output=True)
    assert hidden.returncode == 1 and b"No module named 'fastloc'" in hidden.stderr  # the hiding works
    out = tmp_path / "out"
    result = subprocess.run(
        ["bash", str(REPO / ".ci/gpu"), "--check", str(out)],
        env=env,
        cwd=REPO,  # where a user starts it; the script must not import the checkout's fastloc/
        capture_output=True,
        text=True,
        timeout=600,
    )
    logs = {p.name: p.read_text() for p in out.glob("*.log")}
    assert result.returncode == 0, (result.stdout, logs)
    summary = (out / "summary.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in summary] == ["== environment", "== collect", "== bench-help"]
    assert "kernels from /tmp/" in logs["environment.log"] and str(REPO) not in logs["environment.log"]
    assert " tests collected" in logs["collect.log"] and "error" not in logs["collect.log"].lower()
    for name, preset, batch in (("leopart", "leopart-vits16-in100", 32), ("neco", "neco-dinov2-vitb14", 16)):
        planned = f"bench-align-{name}: would run: python -m fastloc.bench align --preset {preset} --batch-size {batch}"
        assert planned in logs["bench-help.log"] and planned in result.stdout, logs["bench-help.log"]
    assert list(out.glob("*.json")) == []  # parsed, not run
