"""The closed-form attention map equals the Grad-CAM the reference computes by autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from wakd.losses import attention_gram_loss, attention_map

SHAPES = [(2, 8, 5, 7), (3, 16, 4, 4), (1, 64, 15, 20), (4, 3, 2, 9)]


def grad_cam(features: torch.Tensor, score: str = "log_softmax") -> torch.Tensor:
    """Grad-CAM of the channel-pooling classifier via an inner backward, [N,C,H,W] -> [N,H*W]."""
    a = F.relu(features).detach().requires_grad_()
    pooled = a.mean(dim=(2, 3))  # [N, C]
    scores = F.log_softmax(pooled, 1) if score == "log_softmax" else F.softmax(pooled, 1)
    c = pooled.argmax(dim=1)
    # samples are independent, so one backward of the sum gives every per-sample gradient
    scores[torch.arange(len(c)), c].sum().backward()
    weights = a.grad.mean(dim=(2, 3), keepdim=True)  # [N, C, 1, 1]
    cam = F.relu((weights * a).sum(dim=1)).flatten(1).detach()  # [N, H*W]
    return cam / cam.amax(dim=1, keepdim=True)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_closed_form_equals_autograd_grad_cam(shape: tuple[int, ...], seed: int) -> None:
    features = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    closed = attention_map(features)
    assert closed.shape == (shape[0], shape[2] * shape[3])
    torch.testing.assert_close(closed, grad_cam(features), atol=1e-6, rtol=0)
    # the reference scores the softmax probability itself: same map after max-normalisation
    torch.testing.assert_close(closed, grad_cam(features, score="softmax"), atol=1e-6, rtol=0)
    assert closed.amax(dim=1).eq(1).all()


def test_gradient_reaches_features_through_activations_only() -> None:
    g = torch.Generator().manual_seed(3)
    features = torch.randn(3, 8, 5, 6, generator=g, dtype=torch.float64).requires_grad_()
    probe = torch.randn(3, 30, generator=g, dtype=torch.float64)
    (attention_map(features) * probe).sum().backward()

    def with_p(detach: bool) -> torch.Tensor:
        f = features.detach().clone().requires_grad_()
        a = F.relu(f)
        p = F.softmax(a.mean(dim=(2, 3)), dim=1)
        p = p.detach() if detach else p
        a_c = a[torch.arange(3), p.argmax(1)]
        cam = F.relu(a_c - (p[:, :, None, None] * a).sum(1)).flatten(1)
        ((cam / cam.amax(1, keepdim=True)) * probe).sum().backward()
        return f.grad

    torch.testing.assert_close(features.grad, with_p(detach=True))
    assert not torch.allclose(features.grad, with_p(detach=False))  # p really is a constant
    assert features.grad[features.detach() < 0].eq(0).all()  # nothing passes the ReLU of A


@pytest.mark.parametrize(
    "features",
    [
        torch.zeros(2, 4, 3, 3),  # zero map
        -torch.rand(2, 4, 3, 3),  # ReLU(F) = 0
        torch.rand(2, 1, 3, 3),  # one channel: A_c - p_c A_c = 0 everywhere
        torch.zeros(2, 4, 3, 3, dtype=torch.bfloat16),  # mixed precision
    ],
)
def test_degenerate_maps_give_zeros_not_nan(features: torch.Tensor) -> None:
    features = features.clone().requires_grad_()
    maps = attention_map(features)
    assert maps.eq(0).all()
    loss = attention_gram_loss(features, torch.randn(2, 8, 4, 4))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(features.grad).all()
