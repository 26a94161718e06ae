"""torch.hub entry points of a wakd checkout (nothing is downloaded):

    torch.hub.load("/path/to/wakd", "wakd", ckpt="best.ckpt", source="local")
    torch.hub.load("/path/to/wakd", "zoo", weights="ResNet50_2048_cosplace.pth", source="local")

Both return a model in eval mode taking 0-1 RGB [B, 3, H, W] and giving descriptors [B, D].
"""

from __future__ import annotations

import sys
from pathlib import Path

dependencies = ["torch", "torchvision", "hydra", "omegaconf", "h5py", "safetensors"]

_SRC = str(Path(__file__).resolve().parent / "src")
if _SRC not in sys.path:  # this checkout's package, installed or not
    sys.path.insert(0, _SRC)


def wakd(ckpt: str, pca: str | None = None):
    """A network trained by wakd (train.py's checkpoint, which records its architecture).

    ``pca``: a PCA file eval.py wrote (results.json's ``pca_file``) to whiten the descriptors.
    """
    from wakd.jobs.common import build_net, checkpoint_model_config
    from wakd.models.pca import PCAWhitening

    model_cfg = checkpoint_model_config(ckpt) if Path(ckpt).is_file() else None
    if model_cfg is None:
        if not Path(ckpt).is_file():
            raise FileNotFoundError(f"checkpoint not found: {ckpt}")
        raise ValueError(
            f"{ckpt}: not a wakd training checkpoint (it records no model config); for a published "
            f"model use torch.hub.load(..., 'zoo', weights={ckpt!r}, source='local')"
        )
    net = build_net(model_cfg, ckpt)
    if pca is not None:
        net.pca = PCAWhitening.load(pca, in_dim=net.descriptor_dim)
    return net.eval()


def zoo(weights: str, family: str | None = None, **options):
    """A published model (CosPlace, EigenPlaces, OpenIBL, MixVPR, ...; docs/zoo.md), loaded strictly."""
    from wakd.zoo import load

    return load(weights, family, **options)
