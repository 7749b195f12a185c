"""Shared test set-up.

TRITON_INTERPRET must be set before triton is first imported (timm, DALI and torch.compile
import it), so it is set here, at the very top, before anything else is imported. Triton reads
it once per process, so the interpreted CPU tests and the compiled GPU tests run separately:
``python -m pytest`` (CPU, interpreter; gpu tests skipped) and, on a GPU machine,
``TRITON_INTERPRET=0 python -m pytest -m gpu``.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # one core each (pyproject's -n 2): two 2-thread workers thrash 2 cores
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # read when torch starts, here and in every subprocess
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")  # no pool of compile workers per worker

import shutil
from pathlib import Path

import pytest

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


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory) -> Path:
    """Loader tests: 40 synthetic samples in 6 shards of 7 (the last holds 5); keys jpg seg.png cls txt json."""
    from fastloc.shard.convert import convert
    from fastloc.shard.sources.synthetic import SyntheticConfig

    out = tmp_path_factory.mktemp("synthetic")
    convert(
        SyntheticConfig(
            out=out, num_samples=40, shard_samples=7, processes=1, progress=False, min_size=48, max_size=96, fsync=False
        )
    )
    return out / "synthetic" / "train"


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A real single-node SLURM with accounting (tests/slurm_cluster.py), shared by the session;
    skips, saying why, where it cannot run (not root, no apt)."""
    from slurm_cluster import SlurmCluster, install

    reason = install()
    if reason:
        pytest.skip(f"no SLURM here: {reason}")
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


@pytest.fixture
def synthetic_copy(synthetic, tmp_path) -> Path:
    """A copy to damage."""
    return Path(shutil.copytree(synthetic, tmp_path / "train"))


# the files whose tests start the one local SLURM cluster (the ``slurm`` fixture): one xdist worker
SLURM_FILES = ("test_card.py", "test_launch.py", "test_slurm_cluster.py")
# the longest files (minutes each on CI's cores), handed out first so that no worker ends on one alone
LONGEST = ("test_demo.py", "test_segclip.py", "test_align_dense.py", "test_align_resume.py", "test_align_train.py")


def pytest_xdist_make_scheduler(config, log):
    """Under xdist (pyproject's ``-n 2``): a file's tests on one worker, so its module fixtures are
    made once, and every file that starts the local SLURM cluster on the same worker. (xdist's own
    ``--dist loadgroup`` left its groups split across workers here.)"""
    from xdist.scheduler import LoadScopeScheduling

    config.option.loadscopereorder = False  # the collection's order (LONGEST first), not by test count

    class FileScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "slurm" if Path(path).name in SLURM_FILES else path

    return FileScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    """The longest files first (each file's own order kept); tests marked ``gpu`` need CUDA and
    compiled Triton, otherwise they are reported as skipped."""
    items.sort(key=lambda item: LONGEST.index(item.path.name) if item.path.name in LONGEST else len(LONGEST))
    import torch

    if not torch.cuda.is_available():
        reason = "needs a CUDA device (run on a GPU machine)"
    elif os.environ.get("TRITON_INTERPRET") == "1":
        reason = "needs compiled Triton: run TRITON_INTERPRET=0 python -m pytest -m gpu"
    else:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def voc(tmp_path_factory) -> Path:
    """The dense protocols' tests: a small VOC (tests/dense_data.py) as shards/voc/{train,val,trainaug}."""
    from dense_data import voc_shards

    return voc_shards(tmp_path_factory.mktemp("voc"))


@pytest.fixture(scope="session")
def align_shards(tmp_path_factory) -> Path:
    """The alignment tests' shard set (tests/align_runs.py): 8 updates of 16 per epoch."""
    from align_runs import make_shards

    return make_shards(tmp_path_factory.mktemp("align-shards"))


@pytest.fixture(scope="session")
def align_run(align_shards, tmp_path_factory) -> Path:
    """An uninterrupted 2-epoch tiny run (16 updates), checkpoints every 3: the run every
    interrupted, resumed or damaged run of the same settings must equal."""
    from align_runs import args

    from fastloc.align.__main__ import main

    out = tmp_path_factory.mktemp("runs")
    assert main(args(align_shards, out, "--optim.epochs", 2, "--run.checkpoint-every", 3)) == 0
    return out / "tiny"
