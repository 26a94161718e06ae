# The demo's commands for the issue-15 rows (demo.py's train()/eval), run by hand.
set -e
export PYTHONPATH=/work/wt15/src
P=/work/main/.venv/bin/python
D=/work/wt15/bench_out/i15/demo
C="paths.data_dir=/work/wt15/bench_out/i15/data paths.log_dir=$D/logs seed=0 dataset=synthcity"
S="model=mobilenetv3_large model.weights=null model.net.cut=stride16 model.net.proj_dim=128 model.net.num_clusters=32 model.net.bn_momentum=0.1"
T="model=resnet18 model.weights=null model.net.num_clusters=32"
NV="experiment=demo_netvlad module.schedule.first_passes=1 trainer.limit_train_batches=0.25"
DI="teacher=resnet18 teacher.net.num_clusters=32 teacher.ckpt=$D/teacher/checkpoints/best.ckpt module.distill.center=true"
cd /work/wt15
t=$(date +%s); $P train.py $S $C $NV model.weights=$D/pretrain-student-plain/checkpoints/last.ckpt teacher=none hydra.run.dir=$D/student-plain > $D/student-plain.log 2>&1; touch $D/student-plain/.done; echo "student-plain $(( $(date +%s)-t )) s"
t=$(date +%s); $P train.py $S $C $NV model.weights=$D/pretrain-student-plain/checkpoints/last.ckpt $DI hydra.run.dir=$D/student-wakd-stage > $D/student-wakd-stage.log 2>&1; touch $D/student-wakd-stage/.done; echo "student-wakd-stage $(( $(date +%s)-t )) s"
ev() { n=$1; shift; $P eval.py "$@" $C pca=false hydra.run.dir=$D/eval-$n > $D/eval-$n.log 2>&1; echo "$n $($P -c "import json;r=json.load(open('$D/eval-$n/results.json'))['recall'];print(r['1'],r['5'],r['10'])")"; }
ev teacher-kmeans $T model.weights=$D/pretrain-teacher/checkpoints/last.ckpt
ev teacher $T ckpt=$D/teacher/checkpoints/best.ckpt
ev student-kmeans $S model.weights=$D/pretrain-student-plain/checkpoints/last.ckpt
ev plain-stage $S ckpt=$D/student-plain/checkpoints/best.ckpt
ev wakd-stage $S ckpt=$D/student-wakd-stage/checkpoints/best.ckpt
