# Issue-15 WAKD-stage weights on seed 2 (2026-12-03), as run: source is the session scratch env (bench/issue15/stage_sweep.sh, "env.sh"); A = the bench/accuracy output folder.
source /tmp/i15/env.sh
A=/work/main/bench_out/accuracy
D=/tmp/i15/s2; mkdir -p $D
C="paths.data_dir=$A/data-seed2 paths.log_dir=$D/logs seed=2 dataset=synthcity"
W=$A/seed2/pretrain-student-plain/checkpoints/last.ckpt
DI="teacher=resnet18 teacher.net.num_clusters=32 teacher.ckpt=$A/seed2/teacher/checkpoints/best.ckpt module.distill.center=true module.distill.scope=batch module.distill.mine_with=teacher"
run() { n=$1; shift; tr $n $S $NV model.weights=$W optimizer.lr=3e-4 "$@"; ev $n $S ckpt=$D/$n/checkpoints/best.ckpt; }
run w3 $DI module.distill.weight=3
run w30 $DI module.distill.weight=30
run w10-plainmined $DI module.distill.weight=10 module.distill.mine_with=student
