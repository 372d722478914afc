"""IDAR losses: Dice, the efficient attention maps vs the full attention matrix, flow loss, timesteps, MoE balance."""

import pytest
import torch

from multisubject.attention.families import TokenLayout
from multisubject.attention.moe_lora import load_balancing_loss
from multisubject.train.config import LossConfig
from multisubject.train.losses import (
    balance_loss,
    dice_loss,
    flow_loss,
    idar_loss,
    noised,
    sample_timesteps,
    supervised_maps,
)


def test_dice_is_zero_on_the_mask_and_its_gradient_points_to_the_mask():
    mask = torch.zeros(1, 2, 16)
    mask[0, 0, :6] = 1
    mask[0, 1, 10:] = 1
    assert torch.allclose(dice_loss(mask, mask), torch.zeros(1, 2), atol=1e-6)
    pred = torch.full((1, 2, 16), 0.5, requires_grad=True)
    dice_loss(pred, mask).sum().backward()
    step = -pred.grad  # gradient descent direction
    assert (step[mask.bool()] > 0).all() and (step[~mask.bool()] < 0).all()


def test_dice_with_an_empty_mask_is_finite_and_pushes_the_map_down():
    pred = torch.rand(2, 1, 16, requires_grad=True)
    loss = dice_loss(pred, torch.zeros(2, 1, 16))
    assert torch.isfinite(loss).all()
    loss.sum().backward()
    assert torch.isfinite(pred.grad).all() and (pred.grad > 0).all()
    total, dice = idar_loss([torch.zeros(2, 1, 16)], torch.zeros(2, 1, 16))  # constant map: min-max is 0/eps
    assert torch.isfinite(total) and torch.isfinite(dice).all()


def test_efficient_map_equals_the_slice_of_the_full_attention_matrix():
    torch.manual_seed(0)
    layout = TokenLayout.from_latents(5, (6, 8), [(4, 4), (2, 6)])  # 5 txt + 12 img + 4 + 3 ref tokens
    q = torch.randn(2, 3, layout.total, 8, requires_grad=True)
    k = torch.randn(2, 3, layout.total, 8, requires_grad=True)
    fast = supervised_maps(q, k, layout)
    full = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1)  # (B, H, N, N)
    img0, img1 = layout.image_span
    slow = torch.stack([full[:, :, s:e, img0:img1].mean(dim=(1, 2)) for s, e in layout.reference_spans], 1)
    assert fast.shape == (2, 2, 12)
    assert torch.allclose(fast, slow, atol=1e-6)
    checkpointed = supervised_maps(q, k, layout, use_checkpoint=True)
    grad_fast = torch.autograd.grad(checkpointed.square().sum(), (q, k))
    grad_slow = torch.autograd.grad(slow.square().sum(), (q, k))
    for a, b in zip(grad_fast, grad_slow):
        assert torch.allclose(a, b, atol=1e-6)


def test_flow_target_and_shifted_timesteps():
    x0, noise = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    t = torch.tensor([0.0, 1.0])
    xt = noised(x0, noise, t)
    assert torch.equal(xt[0], x0[0]) and torch.equal(xt[1], noise[1])
    assert flow_loss(noise - x0, noise, x0) == 0
    gen = torch.Generator().manual_seed(0)
    plain = sample_timesteps(4096, 1024, torch.Generator().manual_seed(0), shift=False)
    shifted = sample_timesteps(4096, 1024, gen)
    assert ((shifted > 0) & (shifted < 1)).all() and shifted.mean() > plain.mean()  # the shift favours noisier t


def test_image_to_reference_direction_equals_the_full_matrix_and_differs_from_the_default():
    torch.manual_seed(1)
    layout = TokenLayout.from_latents(5, (6, 8), [(4, 4), (2, 6)])
    q = torch.randn(2, 3, layout.total, 8)
    k = torch.randn(2, 3, layout.total, 8)
    maps = supervised_maps(q, k, layout, direction="image_to_reference")
    full = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1)
    img0, img1 = layout.image_span
    expected = torch.stack([full[:, :, img0:img1, s:e].sum(-1).mean(1) for s, e in layout.reference_spans], 1)
    assert maps.shape == (2, 2, 12) and torch.allclose(maps, expected, atol=1e-6)
    assert not torch.allclose(maps, supervised_maps(q, k, layout), atol=1e-3)
    with pytest.raises(ValueError, match="loss.idar_direction must be one of"):
        supervised_maps(q, k, layout, direction="both")
    with pytest.raises(ValueError, match="loss.idar_direction must be one of"):
        LossConfig(idar_direction="image")


def test_samples_beyond_idar_max_t_leave_the_dice_mean():
    torch.manual_seed(2)
    maps, masks = torch.rand(4, 2, 16), (torch.rand(4, 2, 16) > 0.5).float()
    kept, _ = idar_loss([maps[:2]], masks[:2])
    loss, dice = idar_loss([maps], masks, keep=torch.tensor([True, True, False, False]))
    torch.testing.assert_close(loss, kept)  # not half of it, as when the skipped samples counted as zeros
    assert dice.shape == (4, 2)
    maps.requires_grad_(True)
    none, _ = idar_loss([maps], masks, keep=torch.zeros(4))
    none.backward()
    assert float(none) == 0.0 and float(maps.grad.abs().max()) == 0.0


def test_balance_loss_is_summed_over_the_moe_layers_as_switch_does():
    balanced = (torch.zeros(8, 4), torch.arange(8).remainder(4)[:, None])  # uniform router, even load: 1 per layer
    logits = torch.tensor([[4.0, 0.0, 0.0, 0.0]]).repeat(8, 1).requires_grad_(True)
    collapsed = (logits, torch.zeros(8, 1, dtype=torch.long))
    assert float(balance_loss([balanced, balanced, balanced])) == pytest.approx(3.0)
    total = balance_loss([balanced, collapsed])
    torch.testing.assert_close(total, 1.0 + load_balancing_loss(*collapsed))
    # each layer gets the full gradient of its own Switch loss (α per layer), not 1 / (number of layers) of it
    (grad_sum,) = torch.autograd.grad(total, logits)
    (grad_own,) = torch.autograd.grad(load_balancing_loss(*collapsed), logits)
    torch.testing.assert_close(grad_sum, grad_own)
