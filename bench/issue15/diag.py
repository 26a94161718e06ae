"""Issue-15 diagnostics (as run; paths are the session's worktree, edit OUT to reuse): run NetVLAD-stage variants in-process from a fixed pretrained start.
usage: diag.py teacher|student NAME 'override ...' [NAME 'overrides' ...]"""
import csv
import json
import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

import wakd.jobs.common  # noqa: F401  (resolvers)
from wakd.jobs import train

OUT = Path("/work/wt15/bench_out/i15")
C = [f"paths.data_dir={OUT}/data", f"paths.log_dir={OUT}/logs", "seed=0", "dataset=synthcity"]
NETS = {
    "teacher": ["model=resnet18", "model.weights=null", "model.net.num_clusters=32"],
    "student": ["model=mobilenetv3_large", "model.weights=null", "model.net.cut=stride16", "model.net.proj_dim=128",
                "model.net.num_clusters=32", "model.net.bn_momentum=0.1"],
}
PRE = {"teacher": OUT / "pre-teacher/checkpoints/last.ckpt", "student": OUT / "pre-student/checkpoints/last.ckpt"}
DISTILL = ["teacher=resnet18", "teacher.net.num_clusters=32", f"teacher.ckpt={OUT}/diag/teacher/demo/checkpoints/best.ckpt", "module.distill.center=true"]


def main():
    which = sys.argv[1]
    args = sys.argv[2:]
    for name, ov in zip(args[::2], args[1::2], strict=True):
        ov = ov.split()
        extra = []
        for o in ov:
            extra += DISTILL if o == "+distill" else [o]
        if "+distill" not in ov:
            extra.append("teacher=none")
        out = OUT / "diag" / which / name
        overrides = [*NETS[which], *C, "experiment=demo_netvlad", "module.schedule.first_passes=1", f"model.weights={PRE[which]}",
                     *([] if "callbacks=default" in ov else ["callbacks=none"]), f"paths.output_dir={out}", *extra]
        with initialize_config_dir(config_dir="/work/wt15/configs", version_base="1.3"):
            cfg = compose("train", overrides=overrides)
        t = time.perf_counter()
        train.run(cfg)
        sec = time.perf_counter() - t
        with open(next((out / "csv").rglob("metrics.csv"))) as f:
            rows = list(csv.DictReader(f))
        val = [float(r["val/R@1"]) for r in rows if r.get("val/R@1")]
        def series(key, rows=rows):
            return [float(r[key]) for r in rows if r.get(key)]
        hard, dist = series("train/loss_hard"), series("train/loss_distill")
        n = max(1, len(hard) // 4)
        res = {"which": which, "name": name, "overrides": " ".join(ov), "sec": round(sec), "val_r1": val,
               "hard_first": round(sum(hard[:n]) / n, 4) if hard else None, "hard_last": round(sum(hard[-n:]) / n, 4) if hard else None,
               "distill_first": round(sum(dist[:n]) / n, 5) if dist else None, "distill_last": round(sum(dist[-n:]) / n, 5) if dist else None}
        print("RESULT", json.dumps(res), flush=True)
        with open(OUT / "diag.jsonl", "a") as f:
            f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
