#!/usr/bin/env python
"""WAKD from a teacher of another family: ResNet18 + GeM distilled into the demo student (issue 34).

    python bench/other_teacher.py [--seeds 0 1 2] [--quick] [--no-write]

Per seed, on its own city (preset ``bench``: the demo city with 600 test queries):
 1. two teachers of the same family, ResNet18 (cut at layer3) + GeM, from random weights:
    the strong one with the demo teacher's place pretraining (280 steps), the weak one with
    100; each then gets the same GeM stage (experiment=demo_netvlad model/head=gem);
 2. the demo student (MobileNetV3 + NetVLAD) three times from the same seed, data and steps:
    plain (teacher=none), distilled from the strong teacher, distilled from the weak one,
    each with the demo's pretraining and NetVLAD stage (wakd.synth.demo's settings; the
    teachers are given as `teacher=resnet18 teacher.ckpt=...`, whose GeM head the checkpoint
    names);
 3. eval.py (pca=false) of all five on the test split.

Hits at 1 are recomputed per query from predictions.npz and the split's UTM positions
(checked against eval.py's R@1), so that the distilled - plain difference gets its paired
standard error from the queries (per seed) and from the seeds. Writes the r1_other_* and
r1_*_teacher_distilled keys into bench/results.json and the section `other_teacher` of
bench/RESULTS.md. Each finished stage leaves a .done file: a rerun resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

from _results import machine, merge_results, replace_section  # noqa: E402
from student_heads import run_all  # noqa: E402

from wakd.data.datasets import load_split  # noqa: E402
from wakd.synth.demo import STUDENT, Budget  # noqa: E402

TEACHER = ["model=resnet18", "model.weights=null", "model/head=gem"]
WEAK_TEACHER_PRETRAIN_STEPS = 100  # the demo teacher's val R@1 at 100 steps: 0.18 (at 280: ~0.5)
ARMS = ("teacher-strong", "teacher-weak", "student-plain", "student-strong", "student-weak")


def seed_commands(seed: int, out: Path, budget: Budget, weak_steps: int) -> list[dict[str, list[str]]]:
    """The stages of one seed, in order; the commands within a stage depend only on earlier stages."""
    common = [f"paths.data_dir={out / 'data'}", f"paths.log_dir={out / 'logs'}", f"seed={seed}", "dataset=synthcity",
              "dataset.generate.preset=bench", f"dataset.generate.seed={seed}"]

    def train(name: str, model: list[str], extra: list[str]) -> list[str]:
        return ["train.py", *model, *common, *extra, f"hydra.run.dir={out / name}"]

    def pretrain(steps: int) -> list[str]:
        return ["experiment=pretrain_places", f"trainer.max_steps={steps}", f"trainer.limit_train_batches={steps}"]

    def stage(pretrained: str, fraction: float) -> list[str]:
        return ["experiment=demo_netvlad", f"module.schedule.first_passes={budget.netvlad_passes}",
                f"model.weights={out / pretrained / 'checkpoints' / 'last.ckpt'}",
                f"trainer.limit_train_batches={fraction}"]

    def distill(teacher: str) -> list[str]:  # wakd.synth.demo's distillation settings
        return ["teacher=resnet18", f"teacher.ckpt={out / teacher / 'checkpoints' / 'best.ckpt'}",
                "module.distill.center=true"]

    stage_distill = ["module.distill.weight=10", "module.distill.scope=batch", "module.distill.mine_with=teacher"]
    student_pre = [*pretrain(budget.student_pretrain_steps), "optimizer.lr=3e-3"]
    student_stage = [f"optimizer.lr={budget.student_netvlad_lr}"]
    return [
        {"city": ["-m", "wakd.synth.synthcity", "--out", str(out / "data"), "--preset", "bench",
                  "--seed", str(seed), "--quiet"]},
        {"pretrain-teacher-strong": train("pretrain-teacher-strong", TEACHER,
                                          [*pretrain(budget.teacher_pretrain_steps), "teacher=none"]),
         "pretrain-teacher-weak": train("pretrain-teacher-weak", TEACHER, [*pretrain(weak_steps), "teacher=none"]),
         "pretrain-student-plain": train("pretrain-student-plain", STUDENT, [*student_pre, "teacher=none"])},
        {"teacher-strong": train("teacher-strong", TEACHER, [
            *stage("pretrain-teacher-strong", budget.teacher_netvlad_fraction), "teacher=none"]),
         "teacher-weak": train("teacher-weak", TEACHER, [
             *stage("pretrain-teacher-weak", budget.teacher_netvlad_fraction), "teacher=none"]),
         "student-plain": train("student-plain", STUDENT, [
             *stage("pretrain-student-plain", budget.student_netvlad_fraction), *student_stage, "teacher=none"])},
        {f"pretrain-student-{t}": train(f"pretrain-student-{t}", STUDENT, [*student_pre, *distill(f"teacher-{t}")])
         for t in ("strong", "weak")},
        {f"student-{t}": train(f"student-{t}", STUDENT, [
            *stage(f"pretrain-student-{t}", budget.student_netvlad_fraction), *student_stage,
            *distill(f"teacher-{t}"), *stage_distill]) for t in ("strong", "weak")},
        {f"eval-{arm}": ["eval.py", *(TEACHER if arm.startswith("teacher") else STUDENT), *common, "pca=false",
                         "plots=false", f"ckpt={out / arm / 'checkpoints' / 'best.ckpt'}",
                         f"hydra.run.dir={out / f'eval-{arm}'}"] for arm in ARMS},
    ]


def hits_at_1(out: Path, arm: str) -> np.ndarray:
    """[Q] bool: the arm's first retrieved image within the test split's radius of the query,
    recomputed from predictions.npz and the split's UTM positions; checked against eval.py."""
    run = out / f"eval-{arm}"
    predictions = np.load(run / "predictions.npz", allow_pickle=False)
    split = load_split("synthcity", out / "data" / "synthcity" / "raw", "test", check_images=False)
    if list(predictions["query_paths"]) != split.q_rel:
        raise ValueError(f"{run}: predictions are not in the test split's query order")
    top1 = predictions["topk"][:, 0]
    hits = np.linalg.norm(split.q_utm - split.db_utm[top1], axis=1) <= split.eval_radius
    reported = json.loads((run / "results.json").read_text())["recall"]["1"]
    if abs(hits.mean() - reported) > 1e-9:
        raise ValueError(f"{run}: R@1 recomputed {hits.mean():.4f}, eval.py reported {reported:.4f}")
    return hits


def paired(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean and standard error (points) of the per-query difference of hits a - b."""
    d = a.astype(float) - b.astype(float)
    return 100 * d.mean(), 100 * d.std(ddof=1) / math.sqrt(len(d))


def summarise(seeds: list[int], out_root: Path) -> tuple[dict, list[str]]:
    """Per-seed R@1 of every arm, paired differences with their standard errors, and the table."""
    hits = {seed: {arm: hits_at_1(out_root / f"seed{seed}", arm) for arm in ARMS} for seed in seeds}
    r1 = {arm: [100 * hits[s][arm].mean() for s in seeds] for arm in ARMS}
    comparisons = {"distilled (strong) - plain": ("student-strong", "student-plain"),
                   "distilled (weak) - plain": ("student-weak", "student-plain"),
                   "distilled (strong) - distilled (weak)": ("student-strong", "student-weak")}
    differences = {}
    for name, (a, b) in comparisons.items():
        per_seed = [paired(hits[s][a], hits[s][b]) for s in seeds]
        means = [m for m, _ in per_seed]
        # Seeds are independent: the mean's SE from the queries' SEs, and from the seeds' spread.
        se_queries = math.sqrt(sum(se**2 for _, se in per_seed)) / len(seeds)
        se_seeds = float(np.std(means, ddof=1) / math.sqrt(len(seeds))) if len(seeds) > 1 else float("nan")
        differences[name] = {"per_seed": [round(m, 2) for m in means], "per_seed_se": [round(se, 2) for _, se in per_seed],
                             "mean": round(float(np.mean(means)), 2), "se_queries": round(se_queries, 2),
                             "se_seeds": round(se_seeds, 2), "ahead_every_seed": all(m > 0 for m in means)}
    queries = {len(hits[s]["student-plain"]) for s in seeds}
    table = ["| model | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |",
             "|---|" + "---:|" * (len(seeds) + 1)]
    names = {"teacher-strong": "teacher ResNet18 + GeM, strong", "teacher-weak": "teacher ResNet18 + GeM, weak",
             "student-plain": "student, plain", "student-strong": "student distilled from the strong teacher",
             "student-weak": "student distilled from the weak teacher"}
    for arm in ARMS:
        table.append(f"| {names[arm]} | " + " | ".join(f"{v:.1f}" for v in r1[arm]) + f" | {np.mean(r1[arm]):.1f} |")
    table += ["", "| paired difference (R@1 points) | " + " | ".join(f"seed {s}" for s in seeds)
              + " | mean | SE (queries) | SE (seeds) |", "|---|" + "---:|" * (len(seeds) + 3)]
    for name, d in differences.items():
        cells = " | ".join(f"{m:+.1f} ± {se:.1f}" for m, se in zip(d["per_seed"], d["per_seed_se"], strict=True))
        table.append(f"| {name} | {cells} | {d['mean']:+.1f} | {d['se_queries']:.1f} | {d['se_seeds']:.1f} |")
    summary = {"seeds": seeds, "test_queries": sorted(queries), "r1": {a: [round(v, 2) for v in r1[a]] for a in ARMS},
               "differences": differences}
    return summary, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=str(REPO / "bench_out" / "other_teacher"))
    parser.add_argument("--quick", action="store_true", help="the demo's --quick budgets (smoke run)")
    parser.add_argument("--no-write", action="store_true", help="do not touch bench/results.json, RESULTS.md")
    args = parser.parse_args()
    budget = Budget(20, 10, 1, 0.1, 0.1, 3e-4) if args.quick else Budget()
    weak_steps = 5 if args.quick else WEAK_TEACHER_PRETRAIN_STEPS
    out_root = Path(args.out).resolve()
    load_before, start = os.getloadavg(), time.perf_counter()
    for seed in args.seeds:
        out = out_root / f"seed{seed}"
        out.mkdir(parents=True, exist_ok=True)
        for stage in seed_commands(seed, out, budget, weak_steps):
            # One at a time: three trainings side by side (each with two threads and two
            # rendering workers) took about twice as long in all on 2 cores.
            for title, command in stage.items():
                run_all({title: command}, out)
    minutes = (time.perf_counter() - start) / 60
    load_after = os.getloadavg()
    summary, table = summarise(args.seeds, out_root)
    r1 = {arm: round(float(np.mean(v)) / 100, 4) for arm, v in summary["r1"].items()}
    body = "\n".join([
        "## WAKD from a teacher of another family: ResNet18 + GeM into MobileNetV3 + NetVLAD "
        "(`bench/other_teacher.py`)",
        "",
        f"Machine: {machine()}; seeds {args.seeds}{' (--quick budgets)' if args.quick else ''}, "
        f"{minutes:.0f} min; load average (1 min) {load_before[0]:.1f} at the start, {load_after[0]:.1f} at the end. "
        f"Each seed its own city (preset `bench`, {summary['test_queries']} test queries), R@1 in points, no PCA. "
        f"Teachers: ResNet18 (layer3) + GeM (256-d), place pretraining {Budget().teacher_pretrain_steps} (strong) or "
        f"{WEAK_TEACHER_PRETRAIN_STEPS} (weak) steps, then the same GeM stage; students: the demo's (wakd.synth.demo), "
        "distilled with the Gram of the teacher's GeM descriptors and its Grad-CAM maps. Differences are paired "
        "(same seed, city, queries); ± is the standard error over the queries (a seed's), SE (seeds) the spread "
        "of the seeds' differences.",
        "",
        *table,
    ])
    print(body)
    if not args.no_write:
        merge_results({
            "r1_other_teacher": r1["teacher-strong"],
            "r1_other_plain": r1["student-plain"],
            "r1_other_distilled": r1["student-strong"],
            "r1_strong_teacher_distilled": r1["student-strong"],
            "r1_weak_teacher_distilled": r1["student-weak"],
            "r1_weak_teacher": r1["teacher-weak"],
            "other_teacher": summary,
        }, load=f"{load_before[0]:.1f} at the start, {load_after[0]:.1f} at the end")
        replace_section("other_teacher", body)


if __name__ == "__main__":
    main()
