"""python -m fastloc.demo: fastloc's main job in miniature, on a fresh machine, no download, no GPU.

It converts a synthetic set (textured regions and shaped objects), trains a small ViT from scratch
on image-level labels only (the baseline: what CLIP and SigLIP see, which classes, never where),
post-trains it with MaskEmbed, Leopart and NeCo (--objectives picks), and probes every encoder
beside a floor (the random-init ViT) and a ceiling (a ViT trained on patch labels) with Patch-Seg,
Leopart's overclustering, Hummingbird and DINO's k-NN: one table, a row per encoder. The language
miniature (--no-language leaves it out) trains the baseline with a tiny text tower on the captions
and segments the classes by name, zero-shot, before and after MaskEmbed: a second table. Re-running
reuses finished stages; --quick is the test suite's short version.
Option values and the folders are checked before any stage: a bad one is one "error:" line, exit 2.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import tyro

from fastloc.cli import run_command
from fastloc.demo.config import DemoConfig, resolved


def run(cfg: DemoConfig) -> Path:
    """Every stage (each reused when done before); the values and the folders are checked first,
    the values before torch is imported, so that a bad one is refused at once."""
    cfg = resolved(cfg)
    cfg.validate()
    from fastloc.demo import stages, summary
    from fastloc.probe.report import checked_folders

    run_dir = cfg.run_dir
    with checked_folders(("--shards", cfg.shards), ("--out", cfg.out)):
        run_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def stage(name: str, inputs: dict, work) -> dict:
        start = time.perf_counter()
        record = stages.run_stage(run_dir, name, inputs, work)
        timings[name] = round(time.perf_counter() - start, 1)
        return record["outputs"]

    sizes = {"train": cfg.train_images, "val": cfg.val_images, "difficulty": "demo", **stages.IMAGE_SIZES}
    data = stage("data", sizes, lambda: stages.make_data(cfg))
    train = Path(data["train"])
    common = {"backbone": cfg.backbone, "seed": cfg.seed, "data": data}
    trained = {}
    for supervision in ("image", "patch"):
        trained[supervision] = stage(f"pretrain-{supervision}", *stages.pretrained(cfg, supervision, train, common))
    image, patch = trained["image"], trained["patch"]
    backbones = {
        "floor": (cfg.backbone, "random"),
        "ceiling": (cfg.backbone, patch["weights"]),
        "baseline": (cfg.backbone, image["weights"]),
    }
    roles = summary.roles(cfg.objectives)
    for objective in (r for r in roles if r in cfg.objectives):
        aligned = stage(stages.ALIGN_STAGES[objective], *stages.aligned(cfg, objective, image["weights"], common))
        backbones[objective] = (aligned["export"], "pretrained")
    results, rows, cards = {}, {}, {}  # cards: each role's result files, the card's columns
    for role in roles:
        probe_cfg = stages.probe_config(cfg, role, *backbones[role])
        inputs = {**common, "role": role, "backbone": backbones[role], "probe": dataclasses.asdict(probe_cfg)}
        record = stage(f"probe-{role}", inputs, stages.probed(probe_cfg))
        results[role] = summary.load(Path(record["result"]))
        rows[role] = summary.figures(results[role])
        cards[role] = {"patch-seg": record["result"]}
        for protocol in stages.DENSE_PROTOCOLS:
            dense_cfg = stages.dense_config(cfg, protocol, role, *backbones[role])
            inputs = {**common, "role": role, "backbone": backbones[role], protocol: dataclasses.asdict(dense_cfg)}
            record = stage(f"{protocol}-{role}", inputs, stages.dense_probed(dense_cfg))
            rows[role] |= summary.dense_figures(protocol, summary.load(Path(record["result"])))
            cards[role][protocol] = record["result"]
    verdict = summary.gates(rows)
    print()
    print(summary.table(rows))
    print()
    for gate, passed, text in verdict:
        print(f"{gate}: {'yes' if passed else 'NO'} ({text})")
    if len(verdict) < 3:
        print("the comparison of the objectives with the baseline is not meaningful until gates 1 and 2 pass")
    language_rows = {}
    if cfg.language:
        from fastloc.demo import language

        language_rows = language.run_language(cfg, stage, image["weights"], common)
        print("\nzero-shot segmentation by class name (the language miniature), before and after MaskEmbed:")
        print(language.table(language_rows))
    plots = [summary.contact_sheet(results, backbones, run_dir / "contact-sheet.png")]
    if "maskembed" in results:
        from fastloc.probe.compare import compare

        labels = ("baseline", "maskembed")
        _, plot = compare(*(Path(results[r]["run_dir"]) for r in labels), run_dir / "baseline-vs-maskembed.png", labels)
        plots.insert(0, plot)
    path = summary.write_summary(
        run_dir / "summary.json", dataclasses.asdict(cfg), rows, verdict, timings, language_rows
    )
    from fastloc.probe.card.run import card_of_results

    by_baseline = dict(sorted(cards.items(), key=lambda role: role[0] != "baseline"))  # the differences' reference
    card = card_of_results(run_dir / "card", by_baseline, "demo stage")  # python -m fastloc.probe card's table
    print(f"\n{card.read_text()}\nsummary: {path}\nplots: {', '.join(map(str, plots))}\ncard: {card}")
    print(f"probe results: {run_dir / 'probes'}")
    return run_dir


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv

    def command() -> int:
        run(tyro.cli(DemoConfig, args=argv, prog="python -m fastloc.demo", description=__doc__))
        return 0

    return run_command(command, "run the same command again to go on from the last finished stage")


if __name__ == "__main__":
    sys.exit(main())
