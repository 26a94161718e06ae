# Issue-15 WAKD-stage weights from one seed's demo starts (2026-12-03, seed 1), as run
# (tr = one train.py run, ev = eval.py on the test split; outputs under /tmp/i15/s<SEED>).
# usage: seed.sh SEED  -- issue-15 stage comparison from the demo's starts of one seed
P=${PYTHON:-/work/main/.venv/bin/python}
S="model=mobilenetv3_large model.weights=null model.net.cut=stride16 model.net.proj_dim=128 model.net.num_clusters=32 model.net.bn_momentum=0.1"
T="model=resnet18 model.weights=null model.net.num_clusters=32"
PRE="experiment=pretrain_places teacher=none"
NV="experiment=demo_netvlad module.schedule.first_passes=1"
tr() { n=$1; shift; t=$(date +%s); cd /work/main; $P train.py $C "$@" hydra.run.dir=$D/$n > $D/$n.log 2>&1; rc=$?; echo "$n rc=$rc $(( $(date +%s)-t )) s"; }
ev() { n=$1; shift; cd /work/main; $P eval.py "$@" $C pca=false hydra.run.dir=$D/eval-$n > $D/eval-$n.log 2>&1; echo "eval $n $($P -c "import json;r=json.load(open('$D/eval-$n/results.json'))['recall'];print(r['1'],r['5'],r['10'])" 2>&1|tail -1)"; }
SEED=$1
D=/tmp/i15/s$SEED; mkdir -p $D
C="paths.data_dir=$D/data paths.log_dir=$D/logs seed=$SEED dataset=synthcity"
cd /work/main; $P -m wakd.data.synthcity --out $D/data --preset demo --seed $SEED > $D/gen.log 2>&1; echo gen rc=$?
tr pre-teacher $T $PRE trainer.max_steps=280 trainer.limit_train_batches=280
tr teacher $T $NV model.weights=$D/pre-teacher/checkpoints/last.ckpt trainer.limit_train_batches=0.6 teacher=none
tr pre-plain $S $PRE trainer.max_steps=450 trainer.limit_train_batches=450 optimizer.lr=3e-3
W=$D/pre-plain/checkpoints/last.ckpt
DI="teacher=resnet18 teacher.net.num_clusters=32 teacher.ckpt=$D/teacher/checkpoints/best.ckpt module.distill.center=true module.distill.scope=batch module.distill.mine_with=teacher"
run() { n=$1; shift; tr $n $S $NV model.weights=$W optimizer.lr=3e-4 trainer.limit_train_batches=1.0 "$@"; ev $n $S ckpt=$D/$n/checkpoints/best.ckpt; }
run plain teacher=none
run w3 $DI module.distill.weight=3
run w10 $DI module.distill.weight=10
echo ALLDONE
