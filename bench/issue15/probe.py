"""Mining probe: with the k-means NetVLAD of a pretrained net, how good are the mined tuples?"""
import sys
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra import compose, initialize_config_dir
from wakd.eval.extract import (
    extract_descriptors,
    split_descriptors,
)

import wakd.jobs.common as common
from wakd.jobs.cluster import compute_centroids
from wakd.synth.synthcity import City

sys.path.insert(0, "/work/wt15/bench_out/i15")
from diag import NETS, PRE, C

which = sys.argv[1]
weights = sys.argv[2] if len(sys.argv) > 2 else str(PRE[which])
with initialize_config_dir(config_dir="/work/wt15/configs", version_base="1.3"):
    cfg = compose("train", overrides=[*NETS[which], *C, "experiment=demo_netvlad", f"model.weights={weights}", "paths.output_dir=/tmp/x"])
torch.set_num_threads(2)
net = common.build_net(cfg.model)
if not net.pool_from_weights:
    cen = Path(cfg.centroids)
    if not cen.is_file():
        compute_centroids(net, cfg.dataset, cen, num_images=500, features_per_image=100, seed=0, num_workers=2)
    net.pool.init_from_hdf5(cen)
net.eval()
dm = hydra.utils.instantiate(cfg.datamodule)
dm.setup("fit")
split = dm.train_split
ext = extract_descriptors(net, dm.train_images(), batch_size=16, num_workers=2, device=torch.device("cpu"))
q_desc, db_desc = split_descriptors(ext, [split.num_queries, split.num_db])
tuples = dm.miner.mine(dm.round_queries(0), q_desc, db_desc, np.random.default_rng(0))
city = City("demo", 0)
q_poses = city.query_poses("train", city.config.queries[0], np.random.default_rng(np.random.SeedSequence([0, 2, 0])))
xy, axis = city.places("train")
db_h = np.concatenate([city.view_headings(a) for a in axis])
def dh(q, d):
    return abs((q_poses[q, 2] - db_h[d] + 180) % 360 - 180)
ok = np.array([dh(t.query, t.hard_positive) < 45 for t in tuples])
qd, dd = q_desc.astype(np.float32), db_desc.astype(np.float32)
d_ap = np.array([np.linalg.norm(qd[t.query] - dd[t.hard_positive]) for t in tuples])
d_an = np.array([[np.linalg.norm(qd[t.query] - dd[n]) for n in t.negatives] for t in tuples])
m = 0.1 ** 0.5
act = (d_ap[:, None] - d_an + m > 0)
cos = qd @ dd.T
print(f"{which}: hard positive faces the query's way in {ok.mean():.3f} of tuples (chance 0.25 of the 10 m positives)")
print(f"  d_ap mean {d_ap.mean():.3f} (same-way {d_ap[ok].mean():.3f}, other-way {d_ap[~ok].mean() if (~ok).any() else float('nan'):.3f}); "
      f"d_an mean {d_an.mean():.3f}, hardest {d_an[:,0].mean():.3f}")
print(f"  triplets active at margin {m:.3f}: {act.mean():.3f}; d_an < d_ap (violations): {(d_an < d_ap[:, None]).mean():.3f}")
print(f"  mean cosine query-db over all pairs {cos.mean():.4f} (sd {cos.std():.4f})")
