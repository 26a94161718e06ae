"""Train a NetVLAD baseline or a WAKD student. Examples:

    python train.py experiment=baseline                       # teacher / baseline
    python train.py model=mobilenetv3_large teacher=vgg16     # WAKD distillation
    python train.py -m datamodule.pos_num=1,3 datamodule.neg_num=3,10
"""

import hydra
from omegaconf import DictConfig

from wakd.cli import run_job
from wakd.pretrained import check_start_files
from wakd.resolvers import register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    run_job(check_start_files, cfg)  # before torch is imported: a missing file fails in seconds
    # The job the config names: wakd.jobs.train.run, or experiment=pretrain_places's.
    metrics = run_job(hydra.utils.get_method(cfg.job), cfg)
    return metrics.get("val/R@5")


if __name__ == "__main__":
    main()
