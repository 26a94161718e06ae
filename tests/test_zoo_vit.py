"""The ViT-era zoo families (SALAD, BoQ on DINOv2 / ResNet, MegaLoc) against their authors' code.

tests/fixtures/zoo_vit_parity.json holds, per family, the key layout of the authors' model at
a reduced size and its descriptors of seeded images once filled with
``zoo_vit_states.synthetic_state`` (produced by ``bench/zoo_parity_vit.py --write-fixture``;
provenance in tests/fixtures/README.md). The same weights are rebuilt here, detected, loaded
strictly into the wakd family and compared. Full-size parity: bench/zoo_parity_vit.py.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from zoo_vit_states import synthetic_state

from wakd.models.inference import export_onnx
from wakd.zoo import boq, megaloc, salad

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "zoo_vit_parity.json").read_text())
VARIANTS = FIXTURE["variants"]
FAMILY = {"salad": salad, "boq_dinov2": boq, "boq_resnet18": boq, "megaloc": megaloc}
REDUCED_VIT = {"embed_dim": 32, "depth": 2, "num_heads": 1, "pos_grid": 4}
EXPECTED_OPTIONS = {
    "salad": {**REDUCED_VIT, "clusters": 4, "cluster_dim": 8, "token_dim": 8, "hidden": 512},
    "megaloc": {**REDUCED_VIT, "clusters": 4, "cluster_dim": 8, "token_dim": 8, "hidden": 16, "feat_dim": 48},
    "boq_dinov2": {"backbone": "dinov2", **REDUCED_VIT, "proj_channels": 64, "queries": 4, "layers": 2,
                   "row_dim": 4, "heads": 1},
    "boq_resnet18": {"backbone": "resnet18", "proj_channels": 64, "queries": 4, "layers": 2, "row_dim": 4,
                     "heads": 1},
}  # fmt: skip


def loaded(variant: str) -> torch.nn.Module:
    family, state = FAMILY[variant], authors_state(variant)
    model = family.build(**family.detect(state)).eval()
    model.load_state_dict(state, strict=True)
    return model


def authors_state(variant: str) -> dict[str, torch.Tensor]:
    entry = VARIANTS[variant]
    return synthetic_state(
        {k: (tuple(shape), dtype) for k, (shape, dtype) in entry["layout"].items()}, entry["seed"]
    )


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_detects_loads_strictly_and_matches_the_authors(variant: str) -> None:
    family, state = FAMILY[variant], authors_state(variant)
    options = family.detect(state)
    assert options == EXPECTED_OPTIONS[variant]
    model = family.build(**options).eval()
    model.load_state_dict(state, strict=True)
    assert set(model.state_dict()) == set(state)  # no extra keys (e.g. normalisation buffers)
    generator = torch.Generator().manual_seed(VARIANTS[variant]["image_seed"])
    for output in VARIANTS[variant]["outputs"]:
        images = torch.rand(2, 3, *output["size"], generator=generator)
        expected = torch.tensor(output["descriptors"])
        with torch.no_grad():
            got = model(images)
        assert got.shape == expected.shape
        torch.testing.assert_close(got.norm(dim=1), torch.ones(2))
        assert (got - expected).abs().max().item() <= 1e-5, f"{variant} at {output['size']}"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_other_families_do_not_claim_the_checkpoint(variant: str) -> None:
    state = authors_state(variant)
    for family in {salad, boq, megaloc} - {FAMILY[variant]}:
        assert family.detect(state) is None, f"{family.NAME} claimed {variant}"
    assert FAMILY[variant].detect({}) is None


def test_boq_evaluation_size_follows_the_backbone() -> None:
    assert boq.image_size(EXPECTED_OPTIONS["boq_dinov2"]) == (322, 322)
    assert boq.image_size(EXPECTED_OPTIONS["boq_resnet18"]) == (384, 384)
    assert boq.IMAGE_SIZE == (384, 384) and boq.RESIZE == "bicubic"
    assert salad.IMAGE_SIZE == (322, 322) and megaloc.IMAGE_SIZE is None


def test_published_sizes_are_described() -> None:
    assert salad.describe({}) == "SALAD DINOv2 ViT-B/14 (depth 12), 8448-d"
    assert megaloc.describe({}) == "MegaLoc ViT-B/14 (depth 12), 8448-d"
    assert boq.describe({}) == "BoQ ResNet50, 16384-d"
    assert boq.describe({"backbone": "dinov2"}) == "BoQ DINOv2 ViT-B/14 (depth 12), 12288-d"


def test_dinov2_families_reject_sides_that_are_not_multiples_of_14() -> None:
    model = salad.build(**EXPECTED_OPTIONS["salad"]).eval()
    with pytest.raises(ValueError, match="multiples of 14"):
        model(torch.rand(1, 3, 56, 60))


def test_unknown_options_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown options"):
        salad.build(clusterz=4)
    with pytest.raises(ValueError, match="backbone"):
        boq.build(backbone="vgg16")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_onnx_export_runs_in_onnxruntime_at_its_export_size(variant: str) -> None:
    """The graph is fixed to the size it was exported at: DINOv2's position-embedding resize,
    the Sinkhorn masses and the attention reshapes are traced as constants."""
    import onnxruntime

    output = VARIANTS[variant]["outputs"][0]
    generator = torch.Generator().manual_seed(VARIANTS[variant]["image_seed"])
    images = torch.rand(2, 3, *output["size"], generator=generator)
    buffer = io.BytesIO()
    export_onnx(loaded(variant), images, buffer)
    session = onnxruntime.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
    assert (got - torch.tensor(output["descriptors"])).abs().max().item() <= 1e-4
