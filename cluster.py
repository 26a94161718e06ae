"""Cluster dense local features of a backbone for NetVLAD initialisation:

    python cluster.py model=mobilenetv3_large dataset=pitts
"""

import hydra
from omegaconf import DictConfig

from wakd.cli import run_job
from wakd.resolvers import register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path="configs", config_name="cluster")
def main(cfg: DictConfig) -> None:
    from wakd.jobs import cluster

    run_job(cluster.run, cfg)


if __name__ == "__main__":
    main()
