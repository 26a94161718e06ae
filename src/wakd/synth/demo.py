"""`make demo`: the whole WAKD pipeline on the synthetic city, in minutes on 2 CPU cores.

Every stage is the command a user would type (printed before it runs):
 1. generate the demo city;
 2. pretrain the teacher's backbone on rendered places (no ImageNet here), cluster,
    train the teacher as a plain NetVLAD model (teacher=none);
 3. train the student twice from the same random initialisation, with distillation from
    the teacher (WAKD) and without (the paper's baseline), same data, steps and seed:
    place pretraining on rendered views, then clustering and NetVLAD training;
 4. the paper's NetVLAD stage on its own (issue 15): the student pretrained without a
    teacher, trained once more with distillation in the stage only, from the same weights;
 5. evaluate the raw-pixel matcher, the untrained student, both students, the teacher, each
    NetVLAD stage's k-means start and the stage-only WAKD student.
The table goes to <out>/demo_results.md; each evaluation's pictures to <out>/eval-<model>/.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from wakd.atomic import atomic_write_json, atomic_write_text

REPO = Path(__file__).resolve().parents[3]

# Demo-scale variants of the paper's models (the full-size configs stay the defaults):
# ResNet18 cut at layer3 stands in for VGG16 as teacher (VGG16 trains at ~11 img/s on 2
# cores: too slow for minutes); the student is MobileNetV3-Large cut at stride 16 (6x8
# maps at 96x128) with a 1x1 projection to 128 channels and BatchNorm momentum 0.1 (see
# configs/model/mobilenetv3_large.yaml). Both learn their first features on freshly
# rendered views of the city (docs/design.md, "Learning without ImageNet"); the WAKD
# student distils the teacher from there on, with centred Grams (`module.distill.center`,
# bench/RESULTS.md "Distillation").
# No ImageNet weights here: every network starts from random weights (model.weights=null;
# the NetVLAD stages then start from the pretraining checkpoint, a later override).
TEACHER = ["model=resnet18", "model.weights=null", "model.net.num_clusters=32"]
STUDENT = [
    "model=mobilenetv3_large",
    "model.weights=null",
    "model.net.cut=stride16",
    "model.net.proj_dim=128",
    "model.net.num_clusters=32",
    "model.net.bn_momentum=0.1",
]


@dataclass(frozen=True)
class Budget:
    """Steps per stage; `--quick` shrinks them for a smoke run."""

    # Val R@1 of the teacher's pretraining rose 0.18 / 0.36 / 0.55 / 0.64 at 100 / 200 /
    # 300 / 400 steps (about 1.1 s a step on 2 cores); fewer steps leave the students
    # their pretraining within the 15 minutes.
    teacher_pretrain_steps: int = 280
    # The student's steps cost 0.6 s (plain) and 0.9 s (distilled) on quiet cores. Alone, 150
    # steps left its GeM val R@1 at 0.08 and 450 at 0.29, the start from which the NetVLAD
    # stage learns (issue 15); distilled, 250 steps already gave GeM 0.42, and after 450 the
    # WAKD student reached 1.22 of its teacher (three seeds) where 0.9 is asked for. At 450
    # steps the demo took 21-28 minutes (goal 15); with 200 steps and half a pass of the
    # students' NetVLAD stage, 17.8 from a fresh clone on quiet cores (2026-12-07), the WAKD
    # student at 0.74 of its teacher and the plain student a weak miner (docs/demo.md).
    student_pretrain_steps: int = 200
    netvlad_passes: int = 1
    # Fractions of the pass's tuples. The teacher's stage gained 6 points in 0.6 of a pass at
    # 2e-5 once the tuples were no longer colour-jittered; the students train at 3e-4, where
    # distillation paid most (a whole pass from 450 pretraining steps: bench/RESULTS.md, "Why
    # the NetVLAD stage did not help"), for half a pass within the 15 minutes.
    teacher_netvlad_fraction: float = 0.6
    student_netvlad_fraction: float = 0.5
    student_netvlad_lr: float = 3e-4


def _run(title: str, args: list[str], log: Path, done: Path | None = None) -> None:
    """Run one stage; with ``done``, a stage that finished before is skipped (rerunning
    `make demo` after an interruption resumes at the first unfinished stage)."""
    if done is not None and done.is_file():
        print(f"\n=== {title}: done before, skipped ({done.parent})", flush=True)
        return
    cmd = [sys.executable, *args]
    print(f"\n=== {title}\n$ {shlex.join(['python', *args])}", flush=True)
    start = time.perf_counter()
    with open(log, "a") as out:
        out.write(f"\n$ {shlex.join(cmd)}\n")
        out.flush()
        # stderr carries the progress bars: show them; stdout is kept in the log.
        result = subprocess.run(cmd, cwd=REPO, stdout=out, text=True)
    if result.returncode != 0:
        raise SystemExit(f"stage '{title}' failed (exit {result.returncode}); see {log}")
    if done is not None:
        done.touch()
    print(f"--- {title}: {time.perf_counter() - start:.0f} s", flush=True)


def _params(ckpt: Path | None, results: dict) -> str:
    if ckpt is None or not ckpt.is_file():
        return "-"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    return f"{sum(v.numel() for k, v in state.items() if v.is_floating_point()) / 1e6:.2f} M"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="demo_out", help="where runs, logs and the table go")
    parser.add_argument("--data-dir", default="datasets/data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny budgets: a smoke run of every stage")
    args = parser.parse_args(argv)
    budget = Budget(20, 10, 1, 0.1, 0.1, 3e-4) if args.quick else Budget()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "demo.log"
    start = time.perf_counter()
    common = [
        f"paths.data_dir={Path(args.data_dir).resolve()}",
        f"paths.log_dir={out / 'logs'}",
        f"seed={args.seed}",
        "dataset=synthcity",
    ]

    def train(name: str, model: list[str], extra: list[str]) -> Path:
        _run(name, ["train.py", *model, *common, *extra, f"hydra.run.dir={out / name}"], log, out / name / ".done")
        return out / name / "checkpoints"

    _run("generate the demo city", ["-m", "wakd.synth.synthcity", "--out", args.data_dir,
                                    "--preset", "demo", "--seed", str(args.seed)], log)
    def pretrain(steps: int) -> list[str]:  # validated once, at the end
        return ["experiment=pretrain_places", f"trainer.max_steps={steps}", f"trainer.limit_train_batches={steps}"]

    def netvlad(weights: Path, fraction: float) -> list[str]:
        return ["experiment=demo_netvlad", f"module.schedule.first_passes={budget.netvlad_passes}",
                f"model.weights={weights / 'last.ckpt'}", f"trainer.limit_train_batches={fraction}"]

    teacher_pre = train("pretrain-teacher", TEACHER, [*pretrain(budget.teacher_pretrain_steps), "teacher=none"])
    teacher = train("teacher", TEACHER, [*netvlad(teacher_pre, budget.teacher_netvlad_fraction), "teacher=none"])
    # MobileNetV3 from scratch learns three times slower than ResNet18 at 1e-3 (RESULTS.md).
    student_pre = [*pretrain(budget.student_pretrain_steps), "optimizer.lr=3e-3"]
    distill = ["teacher=resnet18", "teacher.net.num_clusters=32", f"teacher.ckpt={teacher / 'best.ckpt'}",
               "module.distill.center=true"]
    wakd_pre = train("pretrain-student-wakd", STUDENT, [*student_pre, *distill])
    def student_stage(weights: Path) -> list[str]:
        return [*netvlad(weights, budget.student_netvlad_fraction), f"optimizer.lr={budget.student_netvlad_lr}"]

    # WAKD's NetVLAD stage on the city: the teacher mines the tuples and the Grams span the
    # step's 4 tuples at weight 10; with the reference's per-tuple Grams at weight 100 the
    # distillation term was 40x the triplet loss, did not fall, and the stage gained nothing
    # over plain training (bench/RESULTS.md, "Why the NetVLAD stage did not help").
    stage_distill = [*distill, "module.distill.weight=10", "module.distill.scope=batch", "module.distill.mine_with=teacher"]
    wakd = train("student-wakd", STUDENT, [*student_stage(wakd_pre), *stage_distill])
    plain_pre = train("pretrain-student-plain", STUDENT, [*student_pre, "teacher=none"])
    plain = train("student-plain", STUDENT, [*student_stage(plain_pre), "teacher=none"])
    # The paper's stage on its own (issue 15): the student pretrained WITHOUT a teacher, then
    # the NetVLAD stage without (student-plain above) and with distillation, from the same
    # weights, data and seed; each stage's start (k-means NetVLAD) is evaluated too.
    wakd_stage = train("student-wakd-stage", STUDENT, [*student_stage(plain_pre), *stage_distill])
    # The untrained student's NetVLAD starts from k-means of its own (random) features.
    _run("cluster for the untrained student", ["cluster.py", *STUDENT, *common], log)

    def kmeans(pretrained: Path) -> list[str]:
        # No ckpt: eval.py builds the pretrained backbone and initialises NetVLAD from the
        # k-means centroids the NetVLAD stage clustered for these weights.
        return [f"model.weights={pretrained / 'last.ckpt'}"]

    rows = [
        ("raw pixels (floor)", ["model=rawpixels"], None),
        ("student, untrained", STUDENT, None),
        ("student, plain NetVLAD", STUDENT, plain / "best.ckpt"),
        ("student, WAKD (distilled)", STUDENT, wakd / "best.ckpt"),
        ("teacher", TEACHER, teacher / "best.ckpt"),
        ("teacher, k-means NetVLAD (stage start)", [*TEACHER, *kmeans(teacher_pre)], None),
        ("student (pretrained alone), k-means NetVLAD", [*STUDENT, *kmeans(plain_pre)], None),
        ("student (pretrained alone), plain stage", STUDENT, plain / "best.ckpt"),
        ("student (pretrained alone), WAKD stage", STUDENT, wakd_stage / "best.ckpt"),
    ]
    table = ["| model | params | descriptor dim | R@1 | R@5 | R@10 | extraction img/s |", "|---|---|---|---|---|---|---|"]
    summary = {}
    evaluated: dict[tuple, Path] = {}  # a row naming a model evaluated before reuses its run
    for i, (name, model, ckpt) in enumerate(rows):
        key = (*model, str(ckpt))
        reused = key in evaluated
        run_dir = evaluated.setdefault(key, out / f"eval-{i}-{name.split(',')[0].split(' ')[0]}{i}")
        eval_args = ["eval.py", *model, *common, "pca=false", f"hydra.run.dir={run_dir}"]
        if ckpt is not None:
            eval_args.append(f"ckpt={ckpt}")
        if not reused:
            _run(f"evaluate: {name}", eval_args, log)
        results = json.loads((run_dir / "results.json").read_text())
        r = results["recall"]
        summary[name] = {"recall": r, "run_dir": str(run_dir)}
        table.append(
            f"| {name} | {_params(ckpt, results)} | {results['descriptor_dim']} | "
            f"{100 * r['1']:.1f} | {100 * r['5']:.1f} | {100 * r['10']:.1f} | {results['images_per_second']:.0f} |"
        )
    minutes = (time.perf_counter() - start) / 60
    text = "\n".join([
        f"# wakd demo: synthetic city (demo preset, seed {args.seed}), test split",
        "",
        *table,
        "",
        f"Total time: {minutes:.1f} min. Pictures (retrievals, recall curve, attention) in each eval-* folder.",
        "",
    ])
    atomic_write_text(out / "demo_results.md", text)
    atomic_write_json(out / "demo_results.json", summary)
    print("\n" + text)
    print(f"everything is in {out}")


if __name__ == "__main__":
    main()
