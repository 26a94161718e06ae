"""Evaluate a checkpoint with Recall@N. Examples:

    python eval.py dataset=tokyo ckpt=PATH
    python eval.py dataset=pitts scale=250k ckpt=PATH
    python eval.py dataset=synthcity model=rawpixels      # the raw-pixel floor
"""

import hydra
from omegaconf import DictConfig

from wakd.cli import run_job
from wakd.resolvers import register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    from wakd.jobs import evaluate

    run_job(evaluate.run, cfg)


if __name__ == "__main__":
    main()
