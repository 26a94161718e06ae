"""The raw-pixel reference descriptor."""

from __future__ import annotations

import torch

from wakd.models.normalization import IMAGENET_MEAN, IMAGENET_STD
from wakd.synth.rawpixels import RawPixels


def test_unit_norm_and_dimension():
    model = RawPixels((24, 32))
    out = model(torch.rand(5, 3, 96, 128))
    assert out.shape == (5, model.descriptor_dim) and model.descriptor_dim == 3 * 24 * 32
    torch.testing.assert_close(out.norm(dim=1), torch.ones(5))
    gray = RawPixels((12, 16), grayscale=True)
    assert gray(torch.rand(2, 3, 64, 86)).shape == (2, 12 * 16) == (2, gray.descriptor_dim)


def test_same_descriptor_as_on_the_imagenet_normalised_images_it_was_given_before():
    """Data pipelines used to normalise for every model: RawPixels now does it itself, with
    the same arithmetic, so its descriptors (and Recall) are unchanged."""
    x = torch.rand(3, 3, 96, 128)
    before = RawPixels(input_norm={"mean": [0.0] * 3, "std": [1.0] * 3})  # the old model: no scaling
    normalised = (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.equal(RawPixels()(x), before(normalised))


def test_invariant_to_brightness_offset_and_gain():
    # Offset and gain of what the descriptor sees, i.e. after its input normalisation.
    model = RawPixels(input_norm={"mean": [0.0] * 3, "std": [1.0] * 3})
    x = torch.rand(3, 3, 96, 128)
    base = model(x)
    torch.testing.assert_close(model(x + 0.2), base, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(1.7 * x - 0.3), base, atol=1e-5, rtol=1e-5)


def test_matches_a_noisy_copy_rather_than_another_image():
    torch.manual_seed(0)
    model = RawPixels()
    db = torch.rand(8, 3, 96, 128)
    smooth = torch.nn.functional.avg_pool2d(db, 9, stride=1, padding=4)  # image-like structure
    query = smooth + 0.2 * torch.randn_like(smooth)
    sims = model(query) @ model(smooth).T
    assert torch.equal(sims.argmax(dim=1), torch.arange(8))
