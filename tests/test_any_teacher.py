"""WAKD from any teacher: every published family gives a descriptor and a map, the training step
distils them (descriptor Gram; map resized to the student's grid), live or cached alike, and
``train.py teacher=<family> teacher.weights=PATH`` runs on the tiny city (random weights in
the published layouts at reduced size, as tests/test_zoo.py and tests/test_zoo_vit.py build them)."""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_TRAIN, compose_cfg
from safetensors.torch import save_file
from test_zoo import CASES, cosplace_state, mixvpr_state, openibl_hub_state
from test_zoo_vit import authors_state

from wakd import zoo
from wakd.data.images import TensorImageDataset
from wakd.jobs import train
from wakd.losses import distill_loss, resized_map
from wakd.models import build_place_net
from wakd.models.place_net import PlaceNet, PlaceOutput
from wakd.modules.place_module import PlaceModule, reference_gram_rows
from wakd.modules.teacher_cache import build_teacher_cache
from wakd.resolvers import file_digest
from wakd.zoo import DistillTargets, ZooTeacher

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = (64, 86)  # the student's images


# variant -> (write the published file into a folder, teacher image size, its map's grid at that size)
PUBLISHED = {
    "cosplace": (lambda d: _save(cosplace_state(32), d / "ResNet18_32_cosplace.pth"), None, (2, 3)),  # stride 32
    "eigenplaces": (lambda d: _save(cosplace_state(32), d / "ResNet18_32_eigenplaces.pth"), None, (2, 3)),
    "openibl": (lambda d: _save(openibl_hub_state(), d / "vgg16_netvlad.pth"), (48, 64), (3, 4)),  # stride 16
    "dvglb": (lambda d: _save(CASES["dvglb_netvlad"][0](), d / "best_model.pth"), None, (4, 6)),  # ResNet18 conv4
    "netvlad_pytorch": (lambda d: _save(CASES["netvlad_pytorch"][0](), d / "checkpoint.pth.tar"), None, (3, 4)),  # AlexNet
    "mixvpr": (lambda d: _save(mixvpr_state(locations=16), d / "mixvpr.ckpt"), (64, 64), (4, 4)),
    "salad": (lambda d: _save(authors_state("salad"), d / "dino_salad.ckpt"), (56, 70), (4, 5)),  # 14-px patches
    "boq_dinov2": (lambda d: _save(authors_state("boq_dinov2"), d / "dinov2_12288.pth"), (56, 70), (4, 5)),
    "boq_resnet18": (lambda d: _save(authors_state("boq_resnet18"), d / "resnet50_16384.pth"), (64, 96), (4, 6)),
    "megaloc": (lambda d: _safetensors(authors_state("megaloc"), d / "model.safetensors"), None, (5, 6)),  # 70x84 inside
}


def _save(state: dict, path: Path) -> Path:
    torch.save(state, path)
    return path


def _safetensors(state: dict, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def _teacher(variant: str, folder: Path) -> ZooTeacher:
    write, size, _ = PUBLISHED[variant]
    return ZooTeacher(zoo.load(write(folder)), size)


def _student() -> PlaceNet:
    torch.manual_seed(0)
    return build_place_net("mobilenetv3_large", cut="stride16", proj_dim=64, num_clusters=8)


def _module(teacher: torch.nn.Module, **kwargs) -> PlaceModule:
    optimizer = functools.partial(torch.optim.SGD, lr=0.1)
    return PlaceModule(_student(), optimizer=optimizer, teacher=teacher, pos_num=2, **kwargs).train()


def _logged_step(module: PlaceModule, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
    logged: dict[str, torch.Tensor] = {}
    module.log = lambda name, value, **kw: logged.__setitem__(name, torch.as_tensor(value).detach())  # type: ignore[method-assign]
    module.training_step(batch, 0)
    return logged


@pytest.mark.parametrize("variant", sorted(PUBLISHED))
def test_targets_are_the_published_descriptor_and_a_map_on_its_own_grid(variant: str, tmp_path: Path) -> None:
    teacher = _teacher(variant, tmp_path)
    images = torch.rand(3, 3, *SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        descriptor, spatial_map = teacher.targets(images)
        torch.testing.assert_close(descriptor, teacher(images), atol=1e-5, rtol=0)
    assert spatial_map.shape == (3, *PUBLISHED[variant][2])
    assert spatial_map.min() >= 0 and torch.allclose(spatial_map.flatten(1).amax(1), torch.ones(3))
    assert not torch.allclose(spatial_map[0], spatial_map[1])


@pytest.mark.parametrize("variant", ["boq_dinov2", "boq_resnet18"])
def test_boq_map_is_where_its_queries_attend(variant: str, tmp_path: Path) -> None:
    """M_n = mean over blocks b and queries q of softmax_n(<W_Q q, W_K t_n> / sqrt(d_h)), heads averaged."""
    model = _teacher(variant, tmp_path).model
    inputs = []
    for block in model.aggregator.boqs:
        block.cross_attn.register_forward_pre_hook(lambda module, args: inputs.append((module, args[0], args[1])))
    images = torch.rand(2, 3, *PUBLISHED[variant][1])
    with torch.no_grad():
        _, spatial_map = model.distill_targets(images)
        per_block = []
        for attention, queries, tokens in inputs:
            heads, dim = attention.num_heads, attention.embed_dim
            w_q, w_k, _ = attention.in_proj_weight.chunk(3)
            b_q, b_k, _ = attention.in_proj_bias.chunk(3)
            q = (queries @ w_q.T + b_q).unflatten(-1, (heads, dim // heads)).transpose(1, 2)  # [B, heads, Q, d_h]
            k = (tokens @ w_k.T + b_k).unflatten(-1, (heads, dim // heads)).transpose(1, 2)  # [B, heads, N, d_h]
            alpha = torch.softmax(q @ k.transpose(-1, -2) / (dim // heads) ** 0.5, dim=-1)  # [B, heads, Q, N]
            per_block.append(alpha.mean(dim=(1, 2)))
    expected = torch.stack(per_block).mean(0).view(2, *PUBLISHED[variant][2])
    torch.testing.assert_close(spatial_map, expected / expected.flatten(1).amax(1)[:, None, None], atol=1e-5, rtol=1e-4)


def test_salad_map_is_the_mass_its_patches_give_the_clusters(tmp_path: Path) -> None:
    """A patch whose cluster scores all rise sends its mass to the clusters, not the dustbin:
    it becomes the map's maximum."""
    model = _teacher("salad", tmp_path).model
    images = torch.rand(2, 3, 56, 70)
    patch = (2, 3)  # of the 4x5 grid

    def favour_clusters(module: torch.nn.Module, args: tuple, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.clone()  # [B, m, h, w]
        scores[:, :, patch[0], patch[1]] += 10
        return scores

    with torch.no_grad():
        base = model.distill_targets(images).spatial_map
        model.aggregator.score.register_forward_hook(favour_clusters)
        favoured = model.distill_targets(images).spatial_map
    assert (base.flatten(1).argmax(1) != patch[0] * 5 + patch[1]).all()
    assert (favoured.flatten(1).argmax(1) == patch[0] * 5 + patch[1]).all()


def test_zoo_teacher_sees_its_own_image_size(tmp_path: Path) -> None:
    seen = []
    teacher = _teacher("salad", tmp_path)
    teacher.model.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[-2:])))
    images = torch.rand(2, 3, *SIZE)
    teacher(images)
    assert seen == [(56, 70)]
    expected = torch.nn.functional.interpolate(images, size=(56, 70), mode="bilinear", antialias=True)
    torch.testing.assert_close(teacher.resize(images), expected.clamp(0, 1))
    assert ZooTeacher(teacher.model, None).resize(images) is images


def test_resized_map_keeps_where_the_attention_is() -> None:
    maps = torch.zeros(2, 2, 2)
    maps[0, 0, 0] = 0.5  # top left
    maps[1, 1, 1] = 2.0  # bottom right
    out = resized_map(maps, (4, 6)).view(2, 4, 6)
    # The peak stays top left (bottom right), and the far row and columns get nothing of it.
    assert out[0, 0, 0] == 1 and out[0, 3].max() < 1e-6 and out[0, :, 4:].max() < 1e-6
    assert out[1, 3, 5] == 1 and out[1, 0].max() < 1e-6 and out[1, :, :2].max() < 1e-6
    assert torch.allclose(out.flatten(1).amax(1), torch.ones(2))  # max-normalised again
    torch.testing.assert_close(resized_map(maps, (2, 2)), maps.flatten(1) / maps.flatten(1).amax(1, keepdim=True))


def test_step_distils_the_descriptor_gram_and_the_resized_map(tmp_path: Path) -> None:
    teacher = _teacher("salad", tmp_path)
    module = _module(teacher).eval()
    images = torch.rand(1, 7, 3, *SIZE)  # anchor, positive, 3 negatives, 2 soft positives
    logged = _logged_step(module, (images, torch.arange(7)[None]))

    flat = images[0, reference_gram_rows(3, 2)]
    with torch.no_grad():
        out = module.net.encode(flat)
        descriptor, spatial_map = teacher.model.distill_targets(teacher.resize(flat))
        attention = resized_map(spatial_map, tuple(out.features.shape[-2:]))
        expected = distill_loss(out.vlad, descriptor, out.features, attention)["total"]
    assert out.features.shape[-2:] != spatial_map.shape[-2:]  # 4x6 student grid, 4x5 teacher grid
    torch.testing.assert_close(logged["train/loss_distill"], expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("variant", sorted(PUBLISHED))
def test_cached_targets_give_the_live_loss_for_every_family(variant: str, tmp_path: Path) -> None:
    module = _module(_teacher(variant, tmp_path), teacher_cache=True)
    images = torch.rand(10, 3, *SIZE, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([[3, 0, 7, 9, 5], [8, 1, 2, 6, 4]])
    live = _logged_step(module, (images[ids], ids))["train/loss_distill"]
    module.teacher_cache = build_teacher_cache(
        module.teacher, TensorImageDataset(images), SIZE, batch_size=4, num_workers=0, progress=False
    )
    cached = _logged_step(module, (images[ids], ids))["train/loss_distill"]
    assert live > 1e-5
    torch.testing.assert_close(cached, live, rtol=5e-3, atol=1e-6)
    (h, w), dim = PUBLISHED[variant][2], module.teacher(images[:1]).shape[1]
    assert module.teacher_cache.map_size == (h, w) and module.teacher_cache.table.shape[1] == dim + h * w


class _GemStudent(PlaceNet):
    """A student head without NetVLAD, as PlaceNet promises it: vlad None, descriptor [B, D]."""

    def encode(self, images: torch.Tensor, regions: bool = False, grid: int = 3) -> PlaceOutput:
        features = self.backbone(images)
        descriptor = torch.nn.functional.normalize(features.clamp_min(1e-6).pow(3).mean((2, 3)).pow(1 / 3), dim=1)
        return PlaceOutput(features, None, descriptor, None)


def test_a_student_without_netvlad_distils_its_descriptor_gram(tmp_path: Path) -> None:
    teacher = _teacher("cosplace", tmp_path)
    base = _student()
    student = _GemStudent(base.backbone, base.pool)
    module = PlaceModule(student, optimizer=torch.optim.SGD, teacher=teacher, pos_num=2).eval()
    images = torch.rand(1, 7, 3, *SIZE)
    logged = _logged_step(module, (images, torch.arange(7)[None]))
    flat = images[0, reference_gram_rows(3, 2)]
    with torch.no_grad():
        out = student.encode(flat)
        descriptor, spatial_map = teacher.targets(flat)
        attention = resized_map(spatial_map, tuple(out.features.shape[-2:]))
        expected = distill_loss(out.descriptor, descriptor, out.features, attention)["total"]
    torch.testing.assert_close(logged["train/loss_distill"], expected, rtol=1e-5, atol=1e-7)


class _NoMap(torch.nn.Module):
    """A descriptor network that defines no spatial map."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(3, 8)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(self.proj(images.mean((2, 3))), dim=1)

    def distill_targets(self, images: torch.Tensor) -> DistillTargets:
        return DistillTargets(self(images), None)


def test_a_teacher_without_a_map_needs_the_attention_term_off() -> None:
    images = torch.rand(1, 7, 3, *SIZE)
    batch = (images, torch.arange(7)[None])
    module = _module(ZooTeacher(_NoMap()), teacher_info={"name": "nomap"})
    with pytest.raises(ValueError, match=r"teacher=nomap gives no spatial map.*module.distill.attention=false"):
        _logged_step(module, batch)
    module = _module(ZooTeacher(_NoMap()), distill={"attention": False})
    assert _logged_step(module, batch)["train/loss_distill"] > 0


def test_a_model_without_targets_is_refused() -> None:
    with pytest.raises(ValueError, match="defines no distillation targets"):
        ZooTeacher(torch.nn.Linear(3, 3))


def _published_files(folder: Path) -> dict[str, Path]:
    return {
        "salad": PUBLISHED["salad"][0](folder),
        "boq": PUBLISHED["boq_dinov2"][0](folder),
        "megaloc": PUBLISHED["megaloc"][0](folder),
        "openibl": PUBLISHED["openibl"][0](folder),
    }


def test_the_users_commands_compose_and_build_the_teacher(tmp_path: Path) -> None:
    """python train.py model=mobilenetv3_large teacher=<family> teacher.weights=PATH dataset=pitts"""
    sizes = {"salad": (322, 322), "boq": (322, 322), "megaloc": None, "openibl": (480, 640)}
    for family, path in _published_files(tmp_path).items():
        overrides = ["model=mobilenetv3_large", f"teacher={family}", f"teacher.weights={path}", "dataset=pitts"]
        cfg = compose_cfg("train", overrides, tmp_path, tmp_path / "run")
        teacher, info = train.build_teacher(cfg)
        assert isinstance(teacher, ZooTeacher) and teacher.image_size == sizes[family], family
        assert info == {"name": family, "ckpt": str(path), "sha256": file_digest(path),
                        "description": teacher.model.zoo_description}


def test_train_command_distils_salad_on_the_tiny_city(tiny_data_dir: Path, tmp_path: Path) -> None:
    """The user's command, at its teacher's published 322x322, end to end in a fresh process."""
    weights = PUBLISHED["salad"][0](tmp_path)
    student = ["model=mobilenetv3_large", "model.weights=null", "model.net.cut=stride16", "model.net.proj_dim=64",
               "model.net.num_clusters=8"]
    tiny = [o for o in TINY_TRAIN if not o.startswith("model")]
    cmd = [
        sys.executable, str(REPO / "train.py"), *tiny, *student, "teacher=salad", f"teacher.weights={weights}",
        "trainer.limit_train_batches=2", f"paths.data_dir={tiny_data_dir}",
        f"paths.log_dir={tmp_path / 'logs'}", f"hydra.run.dir={tmp_path / 'run'}",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["wakd"]["teacher"]["sha256"] == file_digest(weights)
    assert all(k.startswith("net.") for k in ckpt["state_dict"])  # the teacher is not stored
    metrics = (tmp_path / "run" / "csv" / "version_0" / "metrics.csv").read_text()
    header, *rows = metrics.splitlines()
    column = header.split(",").index("train/loss_distill")
    assert [float(r.split(",")[column]) > 0 for r in rows if r.split(",")[column]] == [True, True]


def test_boq_run_with_the_cache_and_teacher_mining(tiny_data_dir: Path, tmp_path: Path) -> None:
    weights = PUBLISHED["boq_dinov2"][0](tmp_path)
    overrides = [
        *TINY_TRAIN, "model=mobilenetv3_large", "model.weights=null", "model.net.cut=stride16",
        "model.net.proj_dim=64", "model.net.num_clusters=8", "teacher=boq", f"teacher.weights={weights}",
        "teacher.image_size=[56,70]", "teacher.cache=true", "module.distill.mine_with=teacher",
        "trainer.limit_train_batches=2",
    ]
    caches = []
    fill = PlaceModule.fill_teacher_cache

    def spy_fill(self: PlaceModule) -> None:
        fill(self)
        caches.append(self.teacher_cache)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(PlaceModule, "fill_teacher_cache", spy_fill)
        metrics = train.run(compose_cfg("train", overrides, tiny_data_dir, tmp_path / "run"))
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    (cache,) = caches
    assert cache.table.dtype == torch.float16 and cache.map_size == (4, 5)
    assert cache.similarity_dim == 64 * 4  # BoQ's proj_channels x row_dim


@pytest.mark.parametrize("weights", [None, "missing.pth"])
def test_a_missing_published_teacher_file_fails_before_any_data(weights: str | None, tmp_path: Path) -> None:
    overrides = ["model=mobilenetv3_large", "model.weights=null", "teacher=salad", f"teacher.weights={weights or 'null'}"]
    cfg = compose_cfg("train", overrides, tmp_path / "no-data", tmp_path / "run")
    with pytest.raises(FileNotFoundError, match=r"teacher=salad: published weight file .* teacher.weights=PATH"):
        train.run(cfg)
    assert not (tmp_path / "no-data").exists()


def test_eval_draws_a_published_teachers_map_beside_the_models(
    tiny_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from wakd.jobs import evaluate

    drawn = {}
    monkeypatch.setattr(evaluate, "plot_attention", lambda path, images, maps: drawn.update(maps))
    weights = PUBLISHED["salad"][0](tmp_path)
    overrides = ["dataset=synthcity", "dataset.image_size=[64,86]", "dataset.generate.preset=tiny", "pca=false",
                 "num_workers=0", "model=resnet18", "model.weights=null", "model.net.num_clusters=8",
                 "teacher=salad", f"teacher.weights={weights}"]
    evaluate.run(compose_cfg("eval", overrides, tiny_data_dir, tmp_path / "run"))
    assert [m.shape for m in drawn["teacher"]] == [(23, 23)] * 4  # 322x322 in 14-pixel patches
    assert [m.shape for m in drawn["model"]] == [(4, 6)] * 4


def test_place_pretraining_refuses_a_published_teacher(tmp_path: Path) -> None:
    from wakd.synth import pretrain_job

    weights = PUBLISHED["salad"][0](tmp_path)
    overrides = ["experiment=pretrain_places", "model=resnet18", "model.weights=null", "teacher=salad",
                 f"teacher.weights={weights}"]
    cfg = compose_cfg("train", overrides, tmp_path / "no-data", tmp_path / "run")
    with pytest.raises(ValueError, match="pretrain_places distils from wakd teachers only"):
        pretrain_job.run(cfg)
    assert not (tmp_path / "no-data").exists()


def test_gem_student_distilled_from_a_published_teacher(tiny_data_dir: Path, tmp_path: Path) -> None:
    """A student without NetVLAD (model/head=gem) under a published teacher: the similarity
    term compares Grams of the two descriptors, the attention term the two maps."""
    weights = PUBLISHED["boq_dinov2"][0](tmp_path)
    overrides = [
        *(o for o in TINY_TRAIN if not o.startswith("model.net.num_clusters")),
        "model=mobilenetv3_large", "model/head=gem", "model.weights=null", "model.net.cut=stride16",
        "model.net.proj_dim=64", "teacher=boq", f"teacher.weights={weights}", "teacher.image_size=[56,70]",
        "trainer.limit_train_batches=2",
    ]
    train.run(compose_cfg("train", overrides, tiny_data_dir, tmp_path / "run"))
    header, *rows = (tmp_path / "run" / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    column = header.split(",").index("train/loss_distill")
    distilled = [float(r.split(",")[column]) for r in rows if r.split(",")[column]]
    assert len(distilled) == 2 and all(v > 0 for v in distilled), distilled
