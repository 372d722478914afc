"""IDAR losses: Dice, the efficient reference->image map vs the full attention matrix, flow loss, timesteps."""

import torch

from multisubject.attention.reference_attention import TokenLayout
from multisubject.train.losses import dice_loss, flow_loss, idar_loss, noised, sample_timesteps, supervised_maps


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
