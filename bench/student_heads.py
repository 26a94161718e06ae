#!/usr/bin/env python
"""Student heads on the demo city: MobileNetV3 + GeM against MobileNetV3 + NetVLAD (issue 34).

    python bench/student_heads.py [--seed 0] [--quick] [--no-write]

The demo's plain student (`make demo`, wakd.synth.demo), with no teacher: place pretraining
of the demo-scale MobileNetV3 on rendered views, then the demo's plain stage
(experiment=demo_netvlad, one pass at 3e-4) from that checkpoint twice, with the same data,
steps and seed: once with NetVLAD (K = 32, k-means start: the demo's "student, plain
NetVLAD") and once with model/head=gem (GeM on the 128 projected channels, no linear
layer). eval.py (pca=false) on the test split, each stage's start too (k-means NetVLAD;
GeM with the pretraining's p). Writes student_heads into bench/results.json and the
section `student_heads` of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

from _results import machine, merge_results, replace_section  # noqa: E402

from wakd.synth.demo import STUDENT, Budget  # noqa: E402

# GeM has no clusters: the demo student's NetVLAD K goes, the head group comes.
GEM_STUDENT = [o for o in STUDENT if not o.startswith("model.net.num_clusters")] + ["model/head=gem"]


def run_all(commands: dict[str, list[str]], out: Path) -> None:
    """Run the commands (title -> arguments of python) at once, each logging to
    <out>/<title>.log; one that finished before (its <out>/<title>.done) is skipped."""
    started = {}
    for title, args in commands.items():
        if (out / f"{title}.done").is_file():
            print(f"=== {title}: done before, skipped", flush=True)
            continue
        print(f"=== {title}\n$ {shlex.join(['python', *args])}", flush=True)
        with open(out / f"{title}.log", "a") as log:
            started[title] = subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=log, stderr=log)
    start = time.perf_counter()
    for title, process in started.items():
        if process.wait() != 0:
            raise SystemExit(f"{title} failed (exit {process.returncode}); see {out / f'{title}.log'}")
        (out / f"{title}.done").touch()
        print(f"--- {title}: {time.perf_counter() - start:.0f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "bench_out" / "student_heads"))
    parser.add_argument("--quick", action="store_true", help="the demo's --quick budgets (smoke run)")
    parser.add_argument("--no-write", action="store_true", help="do not touch bench/results.json, RESULTS.md")
    args = parser.parse_args()
    budget = Budget(20, 10, 1, 0.1, 0.1, 3e-4) if args.quick else Budget()
    out = Path(args.out).resolve() / f"seed{args.seed}"
    out.mkdir(parents=True, exist_ok=True)
    common = [f"paths.data_dir={out.parent / f'data-seed{args.seed}'}", f"paths.log_dir={out / 'logs'}",
              f"seed={args.seed}", "dataset=synthcity"]
    load_before, start = os.getloadavg(), time.perf_counter()

    def train(name: str, model: list[str], extra: list[str]) -> list[str]:
        return ["train.py", *model, *common, *extra, f"hydra.run.dir={out / name}"]

    steps = budget.student_pretrain_steps
    run_all({"pretrain-student": train("pretrain-student", STUDENT, [
        "experiment=pretrain_places", f"trainer.max_steps={steps}", f"trainer.limit_train_batches={steps}",
        "optimizer.lr=3e-3", "teacher=none"])}, out)
    pretrained = out / "pretrain-student" / "checkpoints" / "last.ckpt"
    stage = ["experiment=demo_netvlad", f"module.schedule.first_passes={budget.netvlad_passes}",
             f"model.weights={pretrained}", f"trainer.limit_train_batches={budget.student_netvlad_fraction}",
             f"optimizer.lr={budget.student_netvlad_lr}", "teacher=none"]
    heads = {"netvlad": STUDENT, "gem": GEM_STUDENT}
    # The two stages share nothing but the pretraining checkpoint: on cores shared with other
    # jobs they finish sooner side by side (the recalls do not depend on it).
    run_all({f"student-{head}": train(f"student-{head}", model, stage) for head, model in heads.items()}, out)

    evaluations = {
        f"eval-{head}-{what}": ["eval.py", *model, *common, "pca=false", "plots=false", extra,
                                f"hydra.run.dir={out / f'eval-{head}-{what}'}"]
        for head, model in heads.items()
        for what, extra in (("stage-start", f"model.weights={pretrained}"),
                            ("trained", f"ckpt={out / f'student-{head}' / 'checkpoints' / 'best.ckpt'}"))
    }
    run_all(evaluations, out)
    rows: dict[str, dict] = {}
    for name in evaluations:
        results = json.loads((out / name / "results.json").read_text())
        _, head, what = name.split("-", 2)
        rows[f"{head}, {what.replace('-', ' ')}"] = {"recall": results["recall"],
                                                      "descriptor_dim": results["descriptor_dim"]}
    minutes = (time.perf_counter() - start) / 60
    load_after = os.getloadavg()

    table = ["| student head | descriptor dim | R@1 | R@5 | R@10 |", "|---|---|---|---|---|"]
    for name, row in rows.items():
        r = row["recall"]
        table.append(f"| {name} | {row['descriptor_dim']} | {100 * r['1']:.1f} | {100 * r['5']:.1f} | "
                     f"{100 * r['10']:.1f} |")
    body = "\n".join([
        "## Student heads: MobileNetV3 + GeM against + NetVLAD on the demo city (`bench/student_heads.py`)",
        "",
        f"Machine: {machine()}; seed {args.seed}{' (--quick budgets)' if args.quick else ''}, one run, "
        f"{minutes:.0f} min; load average (1 min) {load_before[0]:.1f} at the start, {load_after[0]:.1f} at the end "
        "(2 cores shared with other jobs: it changes the times, not the recalls). The demo's plain student: "
        f"place pretraining ({steps} steps), then one pass of the plain stage at {budget.student_netvlad_lr:g} from "
        "that checkpoint with each head; test split, 300 queries (Recall@1 standard error about 3 points), no PCA.",
        "",
        *table,
    ])
    print(body)
    if not args.no_write:
        merge_results({"student_heads": {"seed": args.seed, "quick": args.quick, "rows": rows}})
        replace_section("student_heads", body)


if __name__ == "__main__":
    main()
