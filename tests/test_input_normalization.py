"""Input normalisation belongs to the model: every path feeds 0-1 pixels, and each network
scales them itself, as its weights expect (and as its checkpoint says)."""

from __future__ import annotations

import functools
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import compose_cfg
from PIL import Image
from torch import Tensor
from torchvision import transforms as T

from wakd.data.datamodule import split_images
from wakd.data.images import ImageListDataset, build_transform
from wakd.describe import extract_descriptors
from wakd.eval.retrieval import evaluate_split
from wakd.jobs import evaluate
from wakd.jobs.cluster import compute_centroids
from wakd.jobs.common import load_dataset_split
from wakd.losses import teacher_targets
from wakd.models import Backbone, PlaceNet, build_place_net, kmeans_centroids, sample_local_features
from wakd.models.normalization import INPUT_NORMS
from wakd.modules.place_module import PlaceModule
from wakd.modules.teacher_cache import build_teacher_cache
from wakd.synth.pretrain_module import PlacePretrainModule

pytestmark = pytest.mark.usefixtures("one_thread")

IMAGE_SIZE = (64, 86)  # the tiny city's
TINY_CITY = ["dataset=synthcity", "dataset.image_size=[64,86]", "dataset.generate.preset=tiny"]
RESNET = ["model=resnet18", "model.weights=null", "model.net.num_clusters=8"]


def _pixels(path: Path | str) -> Tensor:
    """What the net should see, computed without wakd's data code: PIL resize, ToTensor."""
    with Image.open(path) as image:
        return T.Compose([T.Resize(IMAGE_SIZE), T.ToTensor()])(image.convert("RGB"))


def _net(input_norm: str = "openibl", seed: int = 0, paths: list[Path] | None = None) -> PlaceNet:
    """A net whose normalisation is not ImageNet's: a path still normalising data with
    ImageNet's statistics (or not letting the net do it) would give other descriptors.
    With ``paths``, NetVLAD is clustered on those images, as training starts: descriptors
    of a random NetVLAD are nearly all alike and would hide such a difference."""
    torch.manual_seed(seed)
    net = build_place_net("resnet18", cut="layer3", num_clusters=8, input_norm=input_norm).eval()
    if paths:
        features = sample_local_features(net.backbone, [torch.stack([_pixels(p) for p in paths])], progress=False)
        net.pool.init_from_centroids(torch.from_numpy(kmeans_centroids(features, 8)), torch.from_numpy(features))
    return net


def _describe(net: PlaceNet, paths: list[Path]) -> Tensor:
    with torch.no_grad():
        return torch.cat([net(_pixels(p)[None]) for p in paths])


def _city_paths(tiny_data_dir: Path, count: int) -> list[Path]:
    cfg = compose_cfg("eval", TINY_CITY, tiny_data_dir, tiny_data_dir / "unused")
    split = load_dataset_split(cfg.dataset, "test")
    return [*split.q_paths[:count], *split.db_paths[:count]]


@pytest.mark.parametrize("optimize", [False, True])
def test_extraction_equals_the_net_on_totensor_pixels(tiny_data_dir: Path, optimize: bool) -> None:
    paths = _city_paths(tiny_data_dir, 3)
    net = _net(paths=paths)
    expected = _describe(net, paths)
    dataset = ImageListDataset(paths, build_transform(IMAGE_SIZE, train=False))
    extraction = extract_descriptors(net, dataset, batch_size=4, num_workers=0, progress=False, optimize=optimize)
    got = torch.from_numpy(extraction.descriptors).float()
    # fp16 storage (values up to ~0.1: steps of 6e-5), and ONNX Runtime when optimised
    assert (got - expected).abs().max() < 1e-4
    with torch.no_grad():  # ImageNet-normalised input would have been told apart
        imagenet = net(T.Normalize(*INPUT_NORMS["imagenet"])(torch.stack([_pixels(p) for p in paths])))
    assert (imagenet - expected).abs().max() > 1e-2  # measured 0.12


def test_eval_and_clustering_use_the_checkpoints_normalisation(tiny_data_dir: Path, tmp_path: Path) -> None:
    net = _net(paths=_city_paths(tiny_data_dir, 3))
    ckpt = tmp_path / "net.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}}, ckpt)
    # The command line's model says ImageNet (the default): the checkpoint's own wins.
    cfg = compose_cfg("eval", [*TINY_CITY, *RESNET, f"ckpt={ckpt}", "pca=false", "num_workers=0"],
                      tiny_data_dir, tmp_path / "eval")
    loaded = evaluate.load_eval_net(cfg)
    assert torch.equal(loaded.backbone.normalize.std, net.backbone.normalize.std)

    split = load_dataset_split(cfg.dataset, cfg.split)
    result = evaluate_split(loaded, split, split_images(split, evaluate._transform(cfg)), ns=(1,),
                            num_workers=0, progress=False)
    queries, database = [0, 7, 20], [0, 5]
    expected = _describe(net, [*(split.q_paths[i] for i in queries), *(split.db_paths[j] for j in database)])
    got = torch.from_numpy(np.concatenate([result.q_desc[queries], result.db_desc[database]])).float()
    assert (got - expected).abs().max() < 1e-4

    # Clustering samples dense features of the backbone (not of the whole net): all 4 x 6
    # locations of 3 training images, each one of the image's own normalised features.
    out = compute_centroids(loaded, cfg.dataset, tmp_path / "centroids.hdf5", num_images=3,
                            features_per_image=1000, seed=0, num_workers=0)
    train = load_dataset_split(cfg.dataset, "train")
    paths = [*train.q_paths, *train.db_paths]
    chosen = sorted(np.random.default_rng(0).choice(len(paths), size=3, replace=False).tolist())
    with h5py.File(out, "r") as f:
        sampled = torch.from_numpy(f["descriptors"][:]).view(3, 24, -1)
    for i, image in enumerate(chosen):
        with torch.no_grad():
            dense = F.normalize(net.backbone(_pixels(paths[image])[None]), dim=1)[0].flatten(1).T  # [24, D]
        distances = torch.cdist(sampled[i], dense)
        assert distances.min(dim=1).values.max() < 1e-4
        assert len(distances.argmin(dim=1).unique()) == 24


def _inputs_and_outputs(backbone: Backbone) -> list[tuple[Tensor, Tensor]]:
    """Every (input, output) of ``backbone``'s normalisation from now on."""
    seen: list[tuple[Tensor, Tensor]] = []
    backbone.normalize.register_forward_hook(lambda m, args, out: seen.append((args[0].detach(), out.detach())))
    return seen


def _assert_saw(seen: list[tuple[Tensor, Tensor]], pixels: Tensor, name: str) -> None:
    assert seen, f"the {name} network was never run"
    for inputs, outputs in seen:
        assert torch.equal(inputs, pixels)  # the same 0-1 pixels for every network ...
        assert torch.equal(outputs, T.Normalize(*INPUT_NORMS[name])(pixels))  # ... each scaling its own way


def test_student_and_teacher_each_normalise_the_same_pixels_their_own_way() -> None:
    student = _net("imagenet", seed=0)
    teacher = _net("openibl", seed=1)
    module = PlaceModule(student, optimizer=functools.partial(torch.optim.SGD, lr=0.1), teacher=teacher, pos_num=2)
    module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]  # no trainer attached
    module.train()
    seen_student, seen_teacher = _inputs_and_outputs(student.backbone), _inputs_and_outputs(teacher.backbone)
    pixels = torch.rand(2, 5, 3, *IMAGE_SIZE)
    module.training_step((pixels, torch.arange(10).view(2, 5)), 0)
    _assert_saw(seen_student, pixels.flatten(0, 1), "imagenet")
    _assert_saw(seen_teacher, pixels.flatten(0, 1), "openibl")

    # Distilled pretraining: the student's backbone and the teacher, likewise.
    pretraining = _net("imagenet", seed=2)
    seen_pretraining = _inputs_and_outputs(pretraining.backbone)
    seen_teacher.clear()
    pretrain = PlacePretrainModule(pretraining, torch.optim.Adam, num_classes=2, teacher=teacher)
    pretrain.log = lambda *args, **kwargs: None  # type: ignore[method-assign]
    views = torch.rand(2, 2, 3, *IMAGE_SIZE)
    pretrain.training_step((views, torch.tensor([0, 1])), 0)
    _assert_saw(seen_pretraining, views.flatten(0, 1), "imagenet")
    _assert_saw(seen_teacher, views.flatten(0, 1), "openibl")


def test_teacher_cache_holds_the_teachers_targets_of_totensor_pixels(tiny_data_dir: Path) -> None:
    paths = _city_paths(tiny_data_dir, 2)
    teacher = _net("openibl", seed=1, paths=paths)
    images = ImageListDataset(paths, build_transform(IMAGE_SIZE, train=False))
    cache = build_teacher_cache(teacher, images, IMAGE_SIZE, batch_size=4, num_workers=0, progress=False)
    with torch.no_grad():
        out = teacher.encode(torch.stack([_pixels(p) for p in paths]))
    vlad, attention = teacher_targets(out.vlad, out.features)
    cached_vlad, cached_attention = cache.lookup(torch.arange(len(paths)), "cpu")
    torch.testing.assert_close(cached_vlad, vlad, rtol=1e-3, atol=1e-5)  # fp16 rows: 2^-11 relative
    torch.testing.assert_close(cached_attention.flatten(1), attention, rtol=1e-3, atol=1e-5)
