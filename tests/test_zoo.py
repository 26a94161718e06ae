"""wakd.zoo: published layouts (built here from torchvision, independently of the zoo's
modules) load strictly, are recognised, and give unit-norm descriptors; bad files fail clearly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.models as tvm
import torchvision.transforms as T
from conftest import REPO, compose_cfg
from PIL import Image

from wakd import zoo
from wakd.data.images import ImageListDataset, build_transform
from wakd.jobs import evaluate
from wakd.jobs.common import build_zoo_model
from wakd.jobs.train import build_teacher

IMAGES = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _prefixed(prefix: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}{k}": v for k, v in module.state_dict().items()}


def _resnet_trunk(depth: int, stages: int) -> torch.nn.Sequential:
    net = {18: tvm.resnet18, 50: tvm.resnet50}[depth]()
    return torch.nn.Sequential(*list(net.children())[: 4 + stages])


def _vgg16_trunk() -> torch.nn.Sequential:
    return torch.nn.Sequential(*list(tvm.vgg16().features.children())[:-2])


def _netvlad(prefix: str, k: int, dim: int, bias: bool = False) -> dict[str, torch.Tensor]:
    state = {f"{prefix}conv.weight": torch.randn(k, dim, 1, 1), f"{prefix}centroids": torch.rand(k, dim)}
    return state | ({f"{prefix}conv.bias": torch.randn(k)} if bias else {})


def cosplace_state(fc: int = 64) -> dict[str, torch.Tensor]:
    """CosPlace / EigenPlaces release layout, ResNet18."""
    return _prefixed("backbone.", _resnet_trunk(18, 4)) | {
        "aggregation.1.p": torch.ones(1) * 3,
        "aggregation.3.weight": torch.randn(fc, 512) * 0.05,
        "aggregation.3.bias": torch.zeros(fc),
    }


def openibl_hub_state(k: int = 4, pca: int = 16) -> dict[str, torch.Tensor]:
    return (
        _prefixed("base_model.base.", _vgg16_trunk())
        | _netvlad("net_vlad.", k, 512)
        | {"pca_layer.weight": torch.randn(pca, k * 512, 1, 1), "pca_layer.bias": torch.randn(pca)}
    )


def openibl_drive_checkpoint(k: int = 4) -> dict:
    state = _prefixed("base_model.base.", _vgg16_trunk()) | _netvlad("net_vlad.", k, 512)
    return {"state_dict": {f"module.{key}": v for key, v in state.items()}, "epoch": 5, "best_recall5": 0.9}


def mixvpr_state(locations: int = 16, out_channels: int = 32, out_rows: int = 2) -> dict[str, torch.Tensor]:
    resnet = tvm.resnet50()
    trunk = {k: v for k, v in resnet.state_dict().items() if not k.startswith(("layer4.", "fc."))}
    state = {f"backbone.model.{k}": v for k, v in trunk.items()}
    for i in range(4):
        p = f"aggregator.mix.{i}.mix."
        state |= {
            f"{p}0.weight": torch.ones(locations), f"{p}0.bias": torch.zeros(locations),
            f"{p}1.weight": torch.randn(locations, locations) * 0.02, f"{p}1.bias": torch.zeros(locations),
            f"{p}3.weight": torch.randn(locations, locations) * 0.02, f"{p}3.bias": torch.zeros(locations),
        }
    return state | {
        "aggregator.channel_proj.weight": torch.randn(out_channels, 1024) * 0.02,
        "aggregator.channel_proj.bias": torch.zeros(out_channels),
        "aggregator.row_proj.weight": torch.randn(out_rows, locations) * 0.02,
        "aggregator.row_proj.bias": torch.zeros(out_rows),
    }


CASES = {
    "cosplace": (lambda: cosplace_state(64), "cosplace_ResNet18_64.pth", "cosplace",
                 {"backbone": "ResNet18", "fc_output_dim": 64}, 64),
    "eigenplaces": (lambda: cosplace_state(32), "ResNet18_32_eigenplaces.pth", "eigenplaces",
                    {"backbone": "ResNet18", "fc_output_dim": 32}, 32),
    "openibl_hub": (openibl_hub_state, "vgg16_netvlad.pth", "openibl", {"num_clusters": 4, "pca_dim": 16}, 16),
    "openibl_drive": (openibl_drive_checkpoint, "model_best.pth.tar", "openibl",
                      {"num_clusters": 4, "pca_dim": None}, 4 * 512),
    "dvglb_netvlad": (lambda: _prefixed("backbone.", _resnet_trunk(18, 3)) | _netvlad("aggregation.", 4, 256),
                      "best_model.pth", "dvglb",
                      {"backbone": "resnet18conv4", "aggregation": "netvlad", "num_clusters": 4, "fc_output_dim": None},
                      4 * 256),
    "dvglb_gem_fc": (lambda: _prefixed("backbone.", _resnet_trunk(18, 4))
                     | {"aggregation.0.1.p": torch.ones(1) * 3, "aggregation.1.weight": torch.randn(16, 512),
                        "aggregation.1.bias": torch.zeros(16)},
                     "best_model.pth", "dvglb",
                     {"backbone": "resnet18conv5", "aggregation": "gem", "fc_output_dim": 16}, 16),
    "netvlad_pytorch": (lambda: {"epoch": 3, "best_score": 0.8, "state_dict":
                                 {k.replace("encoder.", "encoder.module.", 1): v for k, v in
                                  (_prefixed("encoder.", torch.nn.Sequential(*list(tvm.alexnet().features.children())[:-2]))
                                   | _netvlad("pool.", 4, 256, bias=True)).items()}},
                        "checkpoint.pth.tar", "netvlad_pytorch", {"arch": "alexnet", "num_clusters": 4, "vladv2": True},
                        4 * 256),
    "mixvpr": (mixvpr_state, "resnet50_MixVPR_64.ckpt", "mixvpr",
               {"depth": 50, "stages": 3, "in_channels": 1024, "locations": 16, "out_channels": 32,
                "out_rows": 2, "mix_depth": 4, "hidden": 16}, 64),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_published_layout_loads_strictly(case, tmp_path):
    make, file_name, family, options, dim = CASES[case]
    path = tmp_path / file_name
    torch.save(make(), path)
    state = zoo.read_state(path)
    detected = [(m.NAME, o) for m, o in zoo.detect(state)]
    assert (family, options) in detected
    model = zoo.load(path)
    assert zoo.family_module(family).describe(options) == model.zoo_description
    with torch.no_grad():
        out = model(IMAGES)
    assert out.shape == (2, dim)
    assert torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)
    assert not torch.allclose(out[0], out[1])
    # the file's tensors are the model's (strict load; nothing else in the state dict)
    assert model.state_dict().keys() == state.keys()


def test_detection_separates_layouts():
    for case, (make, _, family, _, _) in CASES.items():
        state = make()
        state = state.get("state_dict", state)
        state = {k.replace("module.", ""): v for k, v in state.items()}
        names = {m.NAME for m, _ in zoo.detect(state)}
        expected = {"cosplace", "eigenplaces"} if family in ("cosplace", "eigenplaces") else {family}
        assert names == expected, case


def test_dvglb_gem_without_fc_is_not_renormalised(tmp_path):
    """As the authors: L2 -> GeM -> flatten, no L2 after pooling."""
    state = _prefixed("backbone.", _resnet_trunk(18, 3)) | {"aggregation.1.p": torch.ones(1) * 3}
    torch.save(state, tmp_path / "gem.pth")
    model = zoo.load(tmp_path / "gem.pth")
    features = F.normalize(model.backbone(model.normalize(IMAGES)), dim=1)
    expected = features.clamp(min=1e-6).pow(3).mean(dim=(2, 3)).pow(1 / 3)
    torch.testing.assert_close(model(IMAGES), expected, atol=1e-6, rtol=1e-5)


def test_openibl_pca_from_h5(tmp_path):
    """pca=PATH adds OpenIBL's PCA: weight = (U diag(lams^-1/2))^T, bias = -weight mu, then L2."""
    torch.save(openibl_drive_checkpoint(k=2), tmp_path / "model_best.pth.tar")
    rng = np.random.default_rng(0)
    u, lams, mu = rng.normal(size=(1024, 8)), rng.uniform(0.5, 2, size=8), rng.normal(size=(1024, 1)) * 0.01
    with h5py.File(tmp_path / "pca_params_model_best.h5", "w") as f:
        f["U"], f["lams"], f["mu"], f["Utmu"] = u, lams, mu, u.T @ mu
    model = zoo.load(tmp_path / "model_best.pth.tar", pca=tmp_path / "pca_params_model_best.h5", pca_dim=6)
    plain = zoo.load(tmp_path / "model_best.pth.tar")
    with torch.no_grad():
        vlad = plain(IMAGES).double()
        out = model(IMAGES)
    w = torch.from_numpy(u[:, :6] / np.sqrt(lams[:6])).T  # [6, 1024]
    expected = F.normalize((vlad - torch.from_numpy(mu).view(1, -1)) @ w.T, dim=1)
    assert out.shape == (2, 6)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)


def test_other_family_names_the_right_config(tmp_path):
    torch.save(cosplace_state(64), tmp_path / "ResNet18_64_cosplace.pth")
    with pytest.raises(zoo.ZooLoadError) as err:
        zoo.load(tmp_path / "ResNet18_64_cosplace.pth", "mixvpr")
    message = str(err.value)
    assert "keys look like CosPlace ResNet18, 64-d: use model=cosplace" in message
    assert "missing in file" in message and "backbone.model.conv1.weight" in message
    assert "unexpected in file" in message and "backbone.0.weight" in message


def test_file_without_batchnorm_counters_loads(tmp_path):
    """Files saved before torch 1.1 lack num_batches_tracked; nothing else may be missing."""
    state = {k: v for k, v in cosplace_state(64).items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "old_cosplace.pth")
    assert zoo.load(tmp_path / "old_cosplace.pth")(IMAGES).shape == (2, 64)


def test_wrong_size_lists_mismatched_shapes(tmp_path):
    torch.save(cosplace_state(64), tmp_path / "cosplace.pth")
    with pytest.raises(zoo.ZooLoadError, match=r"aggregation\.3\.weight: file \(64, 512\) vs model \(128, 512\)"):
        zoo.load(tmp_path / "cosplace.pth", "cosplace", fc_output_dim=128)


def test_truncated_file_and_partial_state(tmp_path):
    path = tmp_path / "cosplace.pth"
    torch.save(cosplace_state(64), path)
    (tmp_path / "cut.pth").write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(zoo.ZooLoadError, match=r"cannot be read.*truncated"):
        zoo.load(tmp_path / "cut.pth")
    partial = {k: v for k, v in cosplace_state(64).items() if not k.startswith("backbone.7.")}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(zoo.ZooLoadError) as err:
        zoo.load(tmp_path / "partial.pth")
    assert "no published model" in str(err.value) and "model=cosplace" in str(err.value)
    assert "missing in file" in str(err.value)  # listed against the closest family (CosPlace defaults)


def test_hub_url_fails_at_once_naming_the_file():
    url = "https://github.com/gmberton/CosPlace/releases/download/v1.0/ResNet50_2048_cosplace.pth"
    with pytest.raises(zoo.ZooLoadError, match=r"never downloads.*ResNet50_2048_cosplace\.pth.*model\.weights="):
        zoo.load(url)


def test_wakd_checkpoint_is_pointed_to_ckpt(tmp_path):
    torch.save({"state_dict": {"net.pool.centroids": torch.rand(4, 8)}}, tmp_path / "last.ckpt")
    with pytest.raises(zoo.ZooLoadError, match="wakd checkpoint: pass it as ckpt=PATH"):
        zoo.load(tmp_path / "last.ckpt")


def test_unknown_family_lists_registered():
    with pytest.raises(ValueError, match="cosplace"):
        zoo.family_module("netvlad2")


# -- configs and evaluation ----------------------------------------------------------------

TINY_EVAL = ["dataset=synthcity", "dataset.generate.preset=tiny", "num_workers=0", "batch_size=32", "plots=false"]


def test_eval_command_line_runs_a_zoo_model(tiny_data_dir, tmp_path):
    """python eval.py dataset=synthcity model=cosplace model.weights=PATH (PCA off by default)."""
    weights = tmp_path / "ResNet18_64_cosplace.pth"
    torch.save(cosplace_state(64), weights)
    cmd = [
        sys.executable, str(REPO / "eval.py"), *TINY_EVAL, "model=cosplace", f"model.weights={weights}",
        f"paths.data_dir={tiny_data_dir}", f"paths.log_dir={tmp_path / 'logs'}", f"hydra.run.dir={tmp_path / 'run'}",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["descriptor_dim"] == 64 and results["model"] == "cosplace"
    assert results["checkpoint"] == str(weights) and results["pca_fit"] is None
    assert 0 <= results["recall"]["1"] <= results["recall"]["20"] <= 1


def test_eval_zoo_model_at_its_size_with_pca_on_request(tiny_data_dir, tmp_path):
    """model.image_size / model.resize reach the images; model.pca=true whitens."""
    weights = tmp_path / "mixvpr.ckpt"
    torch.save(mixvpr_state(locations=16), weights)  # a 4x4 map: 64x64 inputs
    overrides = [*TINY_EVAL, "model=mixvpr", f"model.weights={weights}", "model.image_size=[64,64]",
                 "model.pca=true", "pca_dim=8", "pca_fit=database"]
    cfg = compose_cfg("eval", overrides, tiny_data_dir, tmp_path / "run")
    assert evaluate._transform(cfg).compose.transforms[0].interpolation == T.InterpolationMode.BICUBIC
    evaluate.run(cfg)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["descriptor_dim"] == 8 and results["pca_fit"] == "database"
    assert Path(results["pca_file"]).parent == tmp_path  # cached beside the weights, keyed by them


def test_teacher_config_builds_the_zoo_model(tiny_data_dir, tmp_path):
    weights = tmp_path / "ResNet18_32_eigenplaces.pth"
    torch.save(cosplace_state(32), weights)
    cfg = compose_cfg("train", ["teacher=eigenplaces", f"teacher.weights={weights}"], tiny_data_dir, tmp_path / "run")
    teacher = build_zoo_model(cfg.teacher)
    assert teacher.zoo_description == "EigenPlaces ResNet18, 32-d"
    assert teacher(IMAGES).shape == (2, 32)
    wrapped, info = build_teacher(cfg)  # distillation from it: tests/test_any_teacher.py
    assert wrapped.image_size is None and info["description"] == "EigenPlaces ResNet18, 32-d"


def test_zoo_transform_decodes_in_full_before_resizing(tmp_path):
    """Published models see the authors' resize of the full image, not of a JPEG draft."""
    pixels = (np.random.default_rng(0).random((256, 256, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.jpg", quality=95)
    transform = build_transform((32, 32), train=False, resize="bicubic", draft=False)
    got = ImageListDataset([tmp_path / "a.jpg"], transform)[0][0]
    with Image.open(tmp_path / "a.jpg") as image:
        expected = T.ToTensor()(T.Resize((32, 32), T.InterpolationMode.BICUBIC)(image.convert("RGB")))
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    drafted = ImageListDataset([tmp_path / "a.jpg"], build_transform((32, 32), train=False, resize="bicubic"))[0][0]
    assert not torch.equal(drafted, expected)  # the fast path (wakd's own models) differs


def test_torch_hub_loads_a_wakd_checkpoint_and_a_zoo_file(tmp_path):
    from test_export import save_wakd_checkpoint

    expected = save_wakd_checkpoint(tmp_path / "best.ckpt", "resnet18")
    net = torch.hub.load(str(REPO), "wakd", ckpt=str(tmp_path / "best.ckpt"), source="local")
    with torch.no_grad():
        torch.testing.assert_close(net(IMAGES), expected(IMAGES))
    torch.save(cosplace_state(64), tmp_path / "ResNet18_64_cosplace.pth")
    published = torch.hub.load(str(REPO), "zoo", weights=str(tmp_path / "ResNet18_64_cosplace.pth"), source="local")
    assert published.zoo_description == "CosPlace ResNet18, 64-d"
    with pytest.raises(ValueError, match=r"not a wakd training checkpoint.*'zoo'"):
        torch.hub.load(str(REPO), "wakd", ckpt=str(tmp_path / "ResNet18_64_cosplace.pth"), source="local")


def test_export_a_zoo_model_to_onnx(tmp_path):
    """python -m wakd.export model=cosplace model.weights=PATH: the ONNX file matches eager PyTorch."""
    from test_export import export_cfg

    from wakd.export import run as export

    torch.save(cosplace_state(64), tmp_path / "ResNet18_64_cosplace.pth")
    cfg = export_cfg(["model=cosplace", f"model.weights={tmp_path / 'ResNet18_64_cosplace.pth'}", "image_size=[64,64]"])
    out = export(cfg)
    assert out == tmp_path / "ResNet18_64_cosplace.onnx" and out.stat().st_size > 0
    with pytest.raises(ValueError, match="ckpt=PATH is required"):
        export(export_cfg([]))
