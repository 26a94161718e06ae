"""Calibrate the synthetic city: chance, raw-pixel and untrained-network Recall@N.

    python bench/calibrate_rawpixels.py --out /tmp/synth --preset demo --seed 0

A trained model needs room above the raw-pixel floor (docs/design.md, synthetic city): the target
is raw pixels clearly above chance but far from solved (R@1 about 0.15-0.35).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import faiss
import numpy as np
import torch
import torchvision
from PIL import Image

from wakd.data.netvlad_mat import load_dbstruct
from wakd.models.normalization import InputNormalization
from wakd.synth.rawpixels import RawPixels
from wakd.synth.synthcity import generate_city


def load_images(folder: Path, fns: list[str]) -> torch.Tensor:
    """Images [N, 3, H, W] float in [0, 1]."""
    arr = np.stack([np.asarray(Image.open(folder / fn).convert("RGB")) for fn in fns])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0


def recall_at(
    db_desc: np.ndarray,
    q_desc: np.ndarray,
    db_utm: np.ndarray,
    q_utm: np.ndarray,
    ns: tuple[int, ...] = (1, 5, 10),
    radius: float = 25.0,
) -> dict[int, float]:
    """Recall@N with exact inner-product search: a hit is a top-N image within ``radius``."""
    index = faiss.IndexFlatIP(db_desc.shape[1])
    index.add(np.ascontiguousarray(db_desc, dtype=np.float32))
    _, nn = index.search(np.ascontiguousarray(q_desc, dtype=np.float32), max(ns))
    dist = np.linalg.norm(db_utm[nn] - q_utm[:, None, :], axis=2)
    good = dist <= radius
    return {n: float(good[:, :n].any(axis=1).mean()) for n in ns}


def chance_recall1(db_utm: np.ndarray, q_utm: np.ndarray, radius: float = 25.0) -> float:
    """Expected R@1 of a random ranking: mean fraction of database images that are positives."""
    d = np.linalg.norm(db_utm[None, :, :] - q_utm[:, None, :], axis=2)
    return float((d <= radius).mean(axis=1).mean())


@torch.no_grad()
def describe(model: torch.nn.Module, images: torch.Tensor, batch: int = 64) -> np.ndarray:
    return torch.cat([model(images[i : i + batch]) for i in range(0, len(images), batch)]).numpy()


class ResNetLayer3GAP(torch.nn.Module):
    """Randomly initialised ResNet18 cut after layer3, global average pooled, L2-normalised."""

    def __init__(self) -> None:
        super().__init__()
        r = torchvision.models.resnet18(weights=None)
        self.body = torch.nn.Sequential(
            InputNormalization(), r.conv1, r.bn1, r.relu, r.maxpool, r.layer1, r.layer2, r.layer3
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.body(x).mean(dim=(2, 3))
        return torch.nn.functional.normalize(f, dim=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="/tmp/wakd_synth_calib")
    p.add_argument("--preset", default="demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="test")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    root = generate_city(args.out, args.preset, args.seed, progress=False)
    print(f"generation (or up-to-date check): {time.perf_counter() - t0:.1f} s")
    db = load_dbstruct(root / f"synthcity_{args.split}.mat")
    db_img = load_images(root / "images", db.db_image_fns)
    q_img = load_images(root / "queries", db.q_image_fns)
    print(f"{args.split}: {db.num_db} database images, {db.num_queries} queries")
    print(f"chance R@1: {chance_recall1(db.db_utm, db.q_utm):.3f}")
    models = {
        "raw pixels 24x32": RawPixels((24, 32)),
        "raw pixels 24x32 gray": RawPixels((24, 32), grayscale=True),
        "random ResNet18-layer3 GAP": ResNetLayer3GAP().eval(),
    }
    for name, model in models.items():
        r = recall_at(describe(model, db_img), describe(model, q_img), db.db_utm, db.q_utm)
        print(f"{name}: " + " ".join(f"R@{n} {v:.3f}" for n, v in r.items()))


if __name__ == "__main__":
    main()
