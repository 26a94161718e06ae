# Issue-15 stage sweep of 2026-12-03, as run (bench/RESULTS.md, "A student good enough to mine from").
# Paths are the session's scratch folder (D=/tmp/i15); phases ran one after another on quiet cores.
# env.sh:
P=/work/main/.venv/bin/python
D=/tmp/i15
C="paths.data_dir=$D/data paths.log_dir=$D/logs seed=0 dataset=synthcity"
S="model=mobilenetv3_large model.weights=null model.net.cut=stride16 model.net.proj_dim=128 model.net.num_clusters=32 model.net.bn_momentum=0.1"
T="model=resnet18 model.weights=null model.net.num_clusters=32"
PRE="experiment=pretrain_places teacher=none"
NV="experiment=demo_netvlad module.schedule.first_passes=1"
DI="teacher=resnet18 teacher.net.num_clusters=32 teacher.ckpt=$D/teacher/checkpoints/best.ckpt module.distill.center=true"
keep() { echo "+callbacks.keep._target_=lightning.pytorch.callbacks.ModelCheckpoint +callbacks.keep.dirpath=$D/$1/keep +callbacks.keep.every_n_train_steps=$2 +callbacks.keep.save_top_k=-1 +callbacks.keep.monitor=null"; }
tr() { n=$1; shift; t=$(date +%s); cd /work/main; $P train.py $C "$@" hydra.run.dir=$D/$n > $D/$n.log 2>&1; rc=$?; echo "$n rc=$rc $(( $(date +%s)-t )) s val R@1: $($P -c "
import csv,glob
f=glob.glob('$D/logs/**/metrics.csv',recursive=True)
import os
f=[x for x in glob.glob('$D/$n/**/metrics.csv',recursive=True)]
rows=list(csv.DictReader(open(f[0]))) if f else []
print([round(float(r['val/R@1']),3) for r in rows if r.get('val/R@1')])" 2>&1 | tail -1)"; }
ev() { n=$1; shift; cd /work/main; $P eval.py "$@" $C pca=false hydra.run.dir=$D/eval-$n > $D/eval-$n.log 2>&1; echo "eval $n $($P -c "import json;r=json.load(open('$D/eval-$n/results.json'))['recall'];print(r['1'],r['5'],r['10'])" 2>&1|tail -1)"; }

# --- phaseA.sh
tr pre-student $S $PRE trainer.max_steps=450 trainer.limit_train_batches=150 optimizer.lr=3e-3 $(keep pre-student 150)
tr pre-teacher $T $PRE trainer.max_steps=280 trainer.limit_train_batches=280
tr teacher $T $NV model.weights=$D/pre-teacher/checkpoints/last.ckpt trainer.limit_train_batches=0.6 teacher=none

# --- phaseB.sh
W=$D/pre-student/checkpoints/last.ckpt
Q="trainer.limit_train_batches=0.25"
tr st-plain-2e5 $S $NV model.weights=$W $Q teacher=none
ev st-kmeans $S model.weights=$W
ev st-plain-2e5 $S ckpt=$D/st-plain-2e5/checkpoints/best.ckpt
tr st-plain-1e4 $S $NV model.weights=$W $Q teacher=none optimizer.lr=1e-4
ev st-plain-1e4 $S ckpt=$D/st-plain-1e4/checkpoints/best.ckpt
tr st-wakd-1e4 $S $NV model.weights=$W $Q $DI optimizer.lr=1e-4
ev st-wakd-1e4 $S ckpt=$D/st-wakd-1e4/checkpoints/best.ckpt
tr st-wakd-2e5 $S $NV model.weights=$W $Q $DI
ev st-wakd-2e5 $S ckpt=$D/st-wakd-2e5/checkpoints/best.ckpt

# --- phaseC.sh
W=$D/pre-student/checkpoints/last.ckpt
Q="trainer.limit_train_batches=0.25"
run() { n=$1; shift; tr $n $S $NV model.weights=$W "$@"; ev $n $S ckpt=$D/$n/checkpoints/best.ckpt; }
run st-wakd-1e4-w10 $Q $DI optimizer.lr=1e-4 module.distill.weight=10
run st-wakd-1e3 $Q $DI optimizer.lr=1e-3
run st-wakd-1e4-vlad $Q $DI optimizer.lr=1e-4 module.distill.attention=false
run st-wakd-1e4-att $Q $DI optimizer.lr=1e-4 module.distill.vlad=false
run st-plain-full-2e5 teacher=none
run st-plain-full-1e4 teacher=none optimizer.lr=1e-4

# --- phaseD.sh
W=$D/pre-student/checkpoints/last.ckpt
run() { n=$1; shift; tr $n $S $NV model.weights=$W "$@"; ev $n $S ckpt=$D/$n/checkpoints/best.ckpt; }
run st-wakd-full-2e5-w10 $DI module.distill.weight=10
run st-wakd-full-1e4-w10 $DI optimizer.lr=1e-4 module.distill.weight=10
run st-wakd-full-2e5-w100 $DI

# --- phaseE.sh
W=$D/pre-student/checkpoints/last.ckpt
run() { n=$1; shift; tr $n $S $NV model.weights=$W "$@"; ev $n $S ckpt=$D/$n/checkpoints/best.ckpt; }
run st-wakd-full-1e4-w10-batch $DI optimizer.lr=1e-4 module.distill.weight=10 module.distill.scope=batch
run st-wakd-full-1e4-w100-batch $DI optimizer.lr=1e-4 module.distill.scope=batch

# --- phaseF.sh
W=$D/pre-student/checkpoints/last.ckpt
run() { n=$1; shift; tr $n $S $NV model.weights=$W "$@"; ev $n $S ckpt=$D/$n/checkpoints/best.ckpt; }
run st-wakd-full-1e4-w100-batch-vlad $DI optimizer.lr=1e-4 module.distill.scope=batch module.distill.attention=false
run st-wakd-full-3e4-w10-batch $DI optimizer.lr=3e-4 module.distill.weight=10 module.distill.scope=batch
run st-plain-full-3e4 teacher=none optimizer.lr=3e-4

# --- phaseG.sh
W=$D/pre-student/checkpoints/last.ckpt
run() { n=$1; shift; tr $n $S $NV model.weights=$W "$@"; ev $n $S ckpt=$D/$n/checkpoints/best.ckpt; }
run st-tmine-plain-1e4 $DI optimizer.lr=1e-4 module.distill.weight=0 module.distill.mine_with=teacher
run st-tmine-wakd-1e4-w10 $DI optimizer.lr=1e-4 module.distill.weight=10 module.distill.mine_with=teacher

# --- phaseH.sh
W=$D/pre-student/checkpoints/last.ckpt
run() { n=$1; shift; tr $n $S $NV model.weights=$W "$@"; ev $n $S ckpt=$D/$n/checkpoints/best.ckpt; }
run st-tmine-wakd-3e4-w10-batch $DI optimizer.lr=3e-4 module.distill.weight=10 module.distill.scope=batch module.distill.mine_with=teacher
run st-tmine-wakd-1e4-w10-batch $DI optimizer.lr=1e-4 module.distill.weight=10 module.distill.scope=batch module.distill.mine_with=teacher
