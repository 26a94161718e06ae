"""Teacher-output cache: same distillation loss as the live teacher, and a WAKD run using it."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from conftest import TINY_TRAIN, compose_cfg

from wakd.data.images import TensorImageDataset
from wakd.jobs import train
from wakd.jobs.common import build_net, load_dataset_split
from wakd.losses import teacher_targets
from wakd.models import build_place_net
from wakd.modules.place_module import PlaceModule
from wakd.modules.teacher_cache import build_teacher_cache

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = (64, 86)


def _module(cache: bool) -> PlaceModule:
    torch.manual_seed(0)
    student = build_place_net("mobilenetv3_large", cut="stride16", proj_dim=64, num_clusters=8)
    teacher = build_place_net("resnet18", cut="layer3", num_clusters=8)
    module = PlaceModule(
        student, optimizer=functools.partial(torch.optim.SGD, lr=0.1), teacher=teacher,
        teacher_cache=cache, pos_num=2,
    )
    return module.train()


def _distill_loss(module: PlaceModule, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    logged: dict[str, torch.Tensor] = {}
    module.log = lambda name, value, **kw: logged.__setitem__(name, torch.as_tensor(value).detach())  # type: ignore[method-assign]
    module.training_step(batch, 0)
    return logged["train/loss_distill"]


def test_cached_targets_give_the_live_teacher_loss() -> None:
    module = _module(cache=True)
    images = torch.randn(12, 3, *SIZE)
    ids = torch.tensor([[3, 0, 7, 11, 5], [8, 1, 2, 10, 4]])  # 2 tuples of 5 images, any order
    batch = (images[ids], ids)
    teacher_before = {k: v.clone() for k, v in module.teacher.state_dict().items()}

    live = _distill_loss(module, batch)
    module.teacher_cache = build_teacher_cache(
        module.teacher, TensorImageDataset(images), SIZE, batch_size=5, num_workers=0, progress=False
    )
    cached = _distill_loss(module, batch)
    assert live > 1e-4
    torch.testing.assert_close(cached, live, rtol=2e-3, atol=1e-6)
    # The rows are the live targets of those very images (fp16-rounded) ...
    out = module.teacher.encode(images[ids[0]])
    vlad, attention = teacher_targets(out.vlad, out.features)
    cached_vlad, cached_attention = module.teacher_cache.lookup(ids[0], "cpu")
    torch.testing.assert_close(cached_vlad, vlad, atol=1e-3, rtol=0)
    torch.testing.assert_close(cached_attention.flatten(1), attention, atol=1e-3, rtol=0)
    # ... and looked up by id: other ids give another loss.
    shuffled = _distill_loss(module, (images[ids], ids.flip(1)))
    assert not torch.allclose(shuffled, cached, rtol=1e-2)
    assert not module.teacher.training
    for key, value in module.teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key]), f"teacher {key} changed"


def test_cache_rejects_batches_without_image_ids() -> None:
    module = _module(cache=True)
    images = torch.randn(5, 3, *SIZE)
    module.teacher_cache = build_teacher_cache(module.teacher, TensorImageDataset(images), SIZE, num_workers=0, progress=False)
    with pytest.raises(ValueError, match="image ids"):
        _distill_loss(module, (images[None], torch.tensor([0])))


def test_wakd_run_with_teacher_cache(tiny_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    teacher_overrides = ["teacher=resnet18", "teacher.weights=null", "teacher.net.num_clusters=8"]
    # A teacher checkpoint with random weights is enough here (no need to train one).
    cfg = compose_cfg("train", [*TINY_TRAIN, *teacher_overrides], tiny_data_dir, tmp_path / "unused")
    teacher_ckpt = tmp_path / "teacher.ckpt"
    torch.manual_seed(1)
    teacher_state = {f"net.{k}": v for k, v in build_net(cfg.teacher).state_dict().items()}
    torch.save({"state_dict": teacher_state}, teacher_ckpt)

    caches, lookups, teachers = [], [], []
    fill = PlaceModule.fill_teacher_cache
    targets = PlaceModule.distill_targets

    def spy_fill(self: PlaceModule) -> None:
        fill(self)
        caches.append(self.teacher_cache)
        teachers.append(self.teacher)

    def spy_targets(self: PlaceModule, images: torch.Tensor, image_ids: torch.Tensor):
        lookups.append(self.teacher_cache is not None)
        return targets(self, images, image_ids)

    monkeypatch.setattr(PlaceModule, "fill_teacher_cache", spy_fill)
    monkeypatch.setattr(PlaceModule, "distill_targets", spy_targets)
    overrides = [
        *TINY_TRAIN, "model=mobilenetv3_large", "model.weights=null", "model.net.cut=stride16", "model.net.proj_dim=64",
        "model.net.num_clusters=8", *teacher_overrides, f"teacher.ckpt={teacher_ckpt}", "teacher.cache=true",
    ]
    cfg = compose_cfg("train", overrides, tiny_data_dir, tmp_path / "run")
    metrics = train.run(cfg)

    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert len(caches) == 1 and lookups == [True] * 3  # filled once, used by every training step
    cache = caches[0]
    split = load_dataset_split(cfg.dataset, "train")
    assert len(cache) == split.num_queries + split.num_db
    assert cache.table.dtype == torch.float16 and cache.similarity_dim == 8 * 256
    assert cache.map_size == (4, 6) and cache.table.shape[1] == 8 * 256 + 4 * 6  # resnet18 layer3 at 64x86
    for key, value in teachers[0].state_dict().items():
        assert torch.equal(value.cpu(), teacher_state[f"net.{key}"]), f"teacher weight {key} changed"
    stored = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert all(k.startswith("net.") for k in stored["state_dict"])  # no cache in the checkpoint
    metrics_csv = (tmp_path / "run" / "csv" / "version_0" / "metrics.csv").read_text()
    assert "train/loss_distill" in metrics_csv
