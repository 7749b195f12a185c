"""DINO's weighted k-NN classifier (python -m fastloc.probe knn): the classifier against a transcription
of the reference's knn_classifier, the image feature against the reference's transform and model, the
CLI end to end on hand-made two-colour shards, 2 gloo ranks against 1, bad input, and the help."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from loader_data import PALETTE, member, write_set
from PIL import Image

from fastloc.data.shards import open_shards
from fastloc.models.registry import BACKBONES, Backbone, fingerprint
from fastloc.probe.__main__ import main
from fastloc.probe.backbone import load_backbone
from fastloc.probe.dense.config import KnnConfig
from fastloc.probe.dense.knn import has_cls, image_encoder, knn_classify, rank_chunks
from fastloc.probe.dense.report import SEPARATOR
from fastloc.probe.run import seed_everything

CLASSES = len(PALETTE)  # 8 colours, one class each
TRAIN, VAL = 64, 100  # the reference needs 100 queries (it takes chunks of a hundredth)
COMMON = ["--backbone", "tiny", "--weights", "random", "--device", "cpu", "--loader", "cpu", "--workers", "0"]
SMALL = ["--k", "10", "--query-chunk", "7", "--eval-batch-size", "16"]


# --- The reference (facebookresearch/dino @ 7c446df5b9f45747937fb0d72314eb9f7b66930a) -----------------------------


@torch.no_grad()
def reference_knn_classifier(train_features, train_labels, test_features, test_labels, k, T, num_classes=1000):
    """eval_knn.py:142-182, verbatim."""
    top1, top5, total = 0.0, 0.0, 0
    train_features = train_features.t()
    num_test_images, num_chunks = test_labels.shape[0], 100
    imgs_per_chunk = num_test_images // num_chunks
    retrieval_one_hot = torch.zeros(k, num_classes).to(train_features.device)
    for idx in range(0, num_test_images, imgs_per_chunk):
        # get the features for test images
        features = test_features[idx : min((idx + imgs_per_chunk), num_test_images), :]
        targets = test_labels[idx : min((idx + imgs_per_chunk), num_test_images)]
        batch_size = targets.shape[0]

        # calculate the dot product and compute top-k neighbors
        similarity = torch.mm(features, train_features)
        distances, indices = similarity.topk(k, largest=True, sorted=True)
        candidates = train_labels.view(1, -1).expand(batch_size, -1)
        retrieved_neighbors = torch.gather(candidates, 1, indices)

        retrieval_one_hot.resize_(batch_size * k, num_classes).zero_()
        retrieval_one_hot.scatter_(1, retrieved_neighbors.view(-1, 1), 1)
        distances_transform = distances.clone().div_(T).exp_()
        probs = torch.sum(
            torch.mul(
                retrieval_one_hot.view(batch_size, -1, num_classes),
                distances_transform.view(batch_size, -1, 1),
            ),
            1,
        )
        _, predictions = probs.sort(1, True)

        # find the predictions that match the target
        correct = predictions.eq(targets.data.view(-1, 1))
        top1 = top1 + correct.narrow(1, 0, 1).sum().item()
        top5 = top5 + correct.narrow(1, 0, min(5, k)).sum().item()  # top5 does not make sense if k < 5
        total += targets.size(0)
    top1 = top1 * 100.0 / total
    top5 = top5 * 100.0 / total
    return top1, top5


def reference_transform(size: int, crop_pct: float, mean, std):
    """eval_knn.py:32-37 (Resize(256, interpolation=3), CenterCrop(224), ToTensor, Normalize) at the
    backbone's size, crop_pct and normalization: 256 = floor(224 / 0.875)."""
    from torchvision import transforms as pth_transforms

    return pth_transforms.Compose(
        [
            pth_transforms.Resize(math.floor(size / crop_pct), interpolation=pth_transforms.InterpolationMode.BICUBIC),
            pth_transforms.CenterCrop(size),
            pth_transforms.ToTensor(),
            pth_transforms.Normalize(mean, std),
        ]
    )


# --- The classifier ---------------------------------------------------------------------------------------------


def clustered(
    n: int, classes: int, dim: int, generator: torch.Generator, distinct: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalized features around one random centre per class, overlapping enough that k-NN errs;
    ``distinct``: n = classes images, one per class."""
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(99))
    labels = (
        torch.randperm(classes, generator=generator)
        if distinct
        else torch.randint(0, classes, (n,), generator=generator)
    )
    features = centres[labels] + 1.5 * torch.randn(n, dim, generator=generator)
    return F.normalize(features, dim=1, p=2), labels


def fewer_classes_than_ranked(train, train_labels, test, k: int, top: int) -> int:
    """Queries whose k nearest hold fewer than ``top`` classes: zero-vote classes fill their ranking."""
    neighbours = train_labels[(test @ train.T).topk(k, dim=1).indices]  # [q, k]
    return sum(len(set(row)) < top for row in neighbours.tolist())


@pytest.mark.parametrize("k", [1, 3, 20])
def test_the_classifier_is_dinos_knn_classifier(k):
    """Bit-equal figures for any chunking. With 10 classes torch's CPU sort ranks tied (zero-vote) classes by
    id, as fastloc always does; with 1000 it leaves them in no set order (see DIFFERENCES), so there every
    query is given more voted classes than it ranks."""
    generator = torch.Generator().manual_seed(k)
    train, train_labels = clustered(400, 10, 24, generator)
    test, test_labels = clustered(300, 10, 24, generator)
    want = reference_knn_classifier(train, train_labels, test, test_labels, k, 0.07, num_classes=10)
    assert 20 < want[0] < 95 and want[0] <= want[1]  # top-1 neither trivial nor saturated: a wrong vote shows
    if k > 1:
        assert fewer_classes_than_ranked(train, train_labels, test, k, min(5, k)) > 0  # the tie rule is exercised
    for chunk in (1, 7, 64, 300):
        assert knn_classify(train, train_labels, test, test_labels, k, 0.07, 10, chunk) == want, chunk
    # 1000 classes (the reference's default), another temperature
    train, train_labels = clustered(1000, 1000, 24, generator, distinct=True)  # k nearest: k classes
    test, test_labels = clustered(200, 1000, 24, generator)
    assert fewer_classes_than_ranked(train, train_labels, test, k, min(5, k)) == 0
    want = reference_knn_classifier(train, train_labels, test, test_labels, k, 0.5)
    assert want[0] < want[1] or k == 1  # top-5 counts more than top-1 (k = 1: top-5 is top-1)
    assert knn_classify(train, train_labels, test, test_labels, k, 0.5, 1000, 37) == want


def test_the_votes_are_weighted_by_the_temperature():
    """One neighbour at cosine 0.9 of class 0 against two at 0.8 of class 1: exp(0.9 / 0.07) beats
    2 exp(0.8 / 0.07), while at T = 1 two votes of e^0.8 beat one of e^0.9 (a plain majority)."""
    bank = torch.tensor([[0.9, math.sqrt(1 - 0.81), 0], [0.8, 0, 0.6], [0.8, 0, -0.6], [-1.0, 0, 0]])
    labels = torch.tensor([0, 1, 1, 2])
    query, truth = torch.tensor([[1.0, 0, 0]]), torch.tensor([0])
    assert knn_classify(bank, labels, query, truth, 3, 0.07, 3) == (100.0, 100.0)
    assert knn_classify(bank, labels, query, truth, 3, 1.0, 3) == (0.0, 100.0)
    # fewer than 5 classes: top-5 looks at all 3 (the reference's narrow(1, 0, 5) would fail)
    assert knn_classify(bank, labels, query, torch.tensor([2]), 3, 0.07, 3) == (0.0, 100.0)


def test_query_chunks_go_to_ranks_in_turn_and_cover_the_queries_once():
    for count, chunk in ((24, 5), (10, 10), (3, 7), (0, 4)):
        whole = rank_chunks(count, chunk, 0, 1)
        for world in (2, 3):
            parts = [rank_chunks(count, chunk, rank, world) for rank in range(world)]
            assert sorted((s.start, s.stop) for p in parts for s in p) == [(s.start, s.stop) for s in whole]
        assert [i for s in whole for i in range(s.start, s.stop)] == list(range(count))


def gap_backbone(monkeypatch) -> None:
    """'tiny-gap': the tiny ViT without a class token, pooled by the mean of its patch tokens."""
    tiny = BACKBONES["tiny"]
    kwargs = {**tiny.kwargs, "class_token": False, "global_pool": "avg"}
    monkeypatch.setitem(BACKBONES, "tiny-gap", Backbone(tiny.timm_id, kwargs))


def test_the_feature_is_the_class_token_or_timms_pooling(monkeypatch):
    gap_backbone(monkeypatch)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    cpu = torch.device("cpu")
    tiny = load_backbone("tiny", "random")
    tokens = tiny.forward_features(x)
    assert torch.equal(image_encoder(tiny, "cls", "fp32", cpu)(x), tokens[:, :1])
    assert torch.equal(image_encoder(tiny, "pooled", "fp32", cpu)(x), tokens[:, :1])  # token pooling, no fc_norm
    gap = load_backbone("tiny-gap", "random")
    pooled = image_encoder(gap, "pooled", "fp32", cpu)(x)[:, 0]
    assert torch.allclose(pooled, gap.fc_norm(gap.forward_features(x).mean(1)), atol=1e-6)
    assert image_encoder(tiny, "cls", "bf16", cpu)(x).dtype == torch.bfloat16


# --- End to end -------------------------------------------------------------------------------------------------


def two_colours(rng: np.random.Generator, i: int, split: str) -> tuple[str, np.ndarray, np.ndarray, int]:
    """Half to three quarters of the image in its class's colour, the rest in another, with noise."""
    c, other = (int(v) for v in rng.integers(0, CLASSES, size=2))
    h, w = (int(v) for v in rng.integers(40, 90, size=2))
    cut = int(w * rng.uniform(0.5, 0.75))
    pixels = np.empty((h, w, 3))
    pixels[:, :cut], pixels[:, cut:] = PALETTE[c], PALETTE[other]
    pixels = pixels[:, ::-1] if rng.random() < 0.5 else pixels
    pixels = np.clip(pixels + rng.normal(0, 20, pixels.shape), 0, 255).astype(np.uint8)
    return f"{split}_{i:04d}", pixels, np.zeros((h, w), np.uint8), c


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("colours")
    for split, n, seed in (("train", TRAIN, 0), ("val", VAL, 1)):
        rng = np.random.default_rng(seed)
        write_set(root / split, [two_colours(rng, i, split) for i in range(n)], CLASSES, per_shard=16, split=split)
    return root


def folders(tmp: Path) -> list[str]:
    return ["--out", str(tmp / "runs"), "--results", str(tmp / "results"), "--cache-dir", str(tmp / "cache")]


@pytest.fixture(scope="module")
def one_rank(colours, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("knn")
    assert main(["knn", str(colours), *COMMON, *SMALL, *folders(tmp), "--name", "run"]) == 0
    return tmp


def member_bytes(root: Path, g: int, ext: str) -> bytes:
    """The stored bytes of member ``ext`` of sample ``g`` (what a user's webdataset reads)."""
    tar, _, offset, size = member(root, g, ext)
    with open(tar, "rb") as f:
        f.seek(offset)
        return f.read(size)


def cached(tmp: Path, split: str) -> tuple[Path, dict[str, np.ndarray]]:
    (path,) = (tmp / "cache").glob(f"t-{split}-*")
    return path, {name: np.load(path / f"{name}.npy") for name in ("features", "cls", "usable", "checksum")}


def test_cli_end_to_end(one_rank, colours):
    result = json.loads((one_rank / "runs" / "run" / "result.json").read_text())
    knobs = result["protocol"]
    assert (knobs["name"], knobs["k"], knobs["temperature"], knobs["token"]) == ("knn", 10, 0.07, "cls")
    assert (knobs["image_size"], knobs["top"], knobs["train_split"]) == (64, 5, "train")
    assert knobs["feature_dtype"] == "float32"
    top1, top5 = result["selected"]["top1"], result["selected"]["top5"]
    assert 0.5 < top1 < 1 and top1 <= top5  # above chance (1/8), not saturated
    assert result["accuracy_percent"] == {"top1": pytest.approx(100 * top1), "top5": pytest.approx(100 * top5)}
    assert result["images"] == {"bank": TRAIN, "queries": VAL, "bank_unusable": 0, "queries_unusable": 0}
    assert sum(result["queries_per_class"]) == VAL and len(result["per_class_iou"]["top1"]) == CLASSES
    assert result["transform"] == {"size": 64, "resize": 71, "crop_pct": 0.9, "interpolation": "bicubic"}
    assert result["world_size"] == 1 and "ties" in result["differences"]
    rows = (one_rank / "results" / "dense-knn-t.csv").read_text().splitlines()
    given = ["knn", "t", "tiny", "random", "0", "64"]
    assert len(rows) == 3 and rows[1].split(SEPARATOR)[:8] == [*given, "top1", repr(top1)]
    assert rows[2].split(SEPARATOR)[6:8] == ["top5", repr(top5)]

    # the figures are the reference's classifier on the cached features; the cache holds the split's classes
    (_, bank), (path, queries) = cached(one_rank, "train"), cached(one_rank, "val")
    assert queries["cls"].tolist() == [int(member_bytes(colours / "val", g, "cls")) for g in range(VAL)]
    train_f, test_f = (F.normalize(torch.from_numpy(a["features"][:, 0]), dim=1, p=2) for a in (bank, queries))
    want = reference_knn_classifier(
        train_f, torch.from_numpy(bank["cls"]), test_f, torch.from_numpy(queries["cls"]), 10, 0.07, CLASSES
    )
    assert (result["accuracy_percent"]["top1"], result["accuracy_percent"]["top5"]) == want

    # the cached feature is DINO's: its transform at the backbone's size, the class token after the final norm
    seed_everything(0)  # the run's seeding: the same random weights
    model = load_backbone("tiny", "random")
    assert json.loads((path / "meta.json").read_text())["key"]["backbone"] == fingerprint(model)
    transform = reference_transform(64, 0.9, model.pretrained_cfg["mean"], model.pretrained_cfg["std"])
    jpegs = (member_bytes(colours / "val", g, "jpg") for g in range(6))
    images = [transform(Image.open(io.BytesIO(jpeg)).convert("RGB")) for jpeg in jpegs]
    with torch.no_grad():
        want = model.forward_features(torch.stack(images))[:, 0]
    assert torch.allclose(torch.from_numpy(queries["features"][:6, 0]), want, atol=1e-4)


def test_two_ranks_give_the_one_rank_result(one_rank, colours, tmp_path):
    """torchrun, 2 gloo ranks: each builds its share of the caches and classifies every other chunk of
    queries (15 chunks of <= 7); the caches and every figure equal the 1-rank run's."""
    args = ["knn", str(colours), *COMMON, *SMALL, *folders(tmp_path), "--name", "run"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*command, "-m", "fastloc.probe", *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = (json.loads((t / "runs" / "run" / "result.json").read_text()) for t in (one_rank, tmp_path))
    assert two["world_size"] == 2
    for key in ("selected", "per_class_iou", "accuracy_percent", "queries_per_class", "images", "protocol"):
        assert two[key] == one[key], key
    for split in ("train", "val"):
        (mine, arrays), (theirs, reference) = cached(tmp_path, split), cached(one_rank, split)
        assert mine.name == theirs.name
        for name, array in arrays.items():
            assert np.array_equal(array, reference[name]), (split, name)
    assert (tmp_path / "results" / "dense-knn-t.csv").read_text() == (
        one_rank / "results" / "dense-knn-t.csv"
    ).read_text()


@pytest.mark.gpu
@pytest.mark.parametrize("loader", ["cpu", "gpu"])
def test_on_a_gpu_the_figures_are_the_cpus(one_rank, colours, tmp_path, loader):
    """fp32 features on CUDA (decoded by PIL or by DALI's nvJPEG), the search without TF32: the figures of
    the CPU run up to a query or two whose nearest neighbours the features' rounding reorders."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (run on a GPU machine)")
    args = ["knn", str(colours), "--backbone", "tiny", "--weights", "random", "--device", "cuda", "--loader", loader]
    assert main([*args, "--workers", "0", *SMALL, *folders(tmp_path), "--name", "run"]) == 0
    one, cuda = (json.loads((t / "runs" / "run" / "result.json").read_text()) for t in (one_rank, tmp_path))
    assert cuda["device"].startswith("cuda")
    assert torch.backends.cuda.matmul.allow_tf32  # the runtime's setting, turned off for the search only
    for name, value in one["selected"].items():
        assert cuda["selected"][name] == pytest.approx(value, abs=0.03), name


# --- Bad input --------------------------------------------------------------------------------------------------


def doctored(data: Path, out: Path, changes: dict) -> Path:
    """A copy of ``data`` (its shards linked) whose manifests carry ``changes``."""
    for split in ("train", "val"):
        (out / split).mkdir(parents=True)
        for f in (data / split).iterdir():
            if f.name != "manifest.json":
                (out / split / f.name).symlink_to(f)
        manifest = json.loads((data / split / "manifest.json").read_text())
        (out / split / "manifest.json").write_text(json.dumps({**manifest, **changes}))
    return out


def test_bad_input_is_one_line_and_leaves_nothing(colours, synthetic, tmp_path, capsys, monkeypatch):
    gap_backbone(monkeypatch)
    out = tmp_path / "out"

    def error(data: Path, *extra: str) -> str:
        capsys.readouterr()
        assert main(["knn", str(data), *COMMON, *folders(out), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert not out.exists()  # refused before any work: no folder made, no feature cached
        return err

    assert has_cls(open_shards(synthetic))  # the synthetic set's "class of the largest visible object"
    no_cls = doctored(colours, tmp_path / "no-cls", {"keys": ["jpg", "seg.png"], "cls": None})
    assert not has_cls(open_shards(no_cls / "val"))
    assert "no-cls/train: its samples have no image-level class (cls" in error(no_cls)
    err = error(colours, "--k", str(TRAIN + 1))
    assert f"--k must be at most the {TRAIN} images of the memory bank" in err and f"got {TRAIN + 1}" in err
    assert "--token cls: tiny-gap has no class token (it pools by avg); use --token pooled" in error(
        colours, "--backbone", "tiny-gap"
    )
    assert "--token pooled: tiny has no pooling left (--skip-blocks 1" in error(
        colours, "--token", "pooled", "--skip-blocks", "1"
    )
    assert "--temperature must be a positive number, got 0.0" in error(colours, "--temperature", "0")
    assert "--image-size 60: must be a positive multiple of tiny's patch 8" in error(colours, "--image-size", "60")


def test_every_option_has_help_as_flowing_text(capsys, monkeypatch):
    from test_bench import field_docs

    docs = {}
    for klass in reversed(KnnConfig.__mro__):
        if dataclasses.is_dataclass(klass):
            docs |= field_docs(klass)
    fields = [f.name for f in dataclasses.fields(KnnConfig)]
    assert [f for f in fields if not docs.get(f, "").strip()] == []
    monkeypatch.setenv("COLUMNS", "400")
    assert main(["knn", "--help"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name in fields:
        option = "DATA" if name == "data" else "--" + name.replace("_", "-")
        assert any(option in line for line in lines), option
        assert any(" ".join(docs[name].split()) in line for line in lines), option
