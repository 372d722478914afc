"""A toy IPPO policy and reward for tier-1 tests: the real loop on a model small enough to learn in seconds.

The policy is a frozen random convolutional velocity field plus a trainable residual (zero-initialised, like a
LoRA). It sees the layout's first box as an extra input channel, so it *can* learn to brighten that box;
the decoder is a fixed map latent -> RGB. The reward is the mean brightness inside the first subject's box.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from multisubject.attention.layout import Layout, Region
from multisubject.attention.subjects import Subject, Subjects
from multisubject.train.ippo import PromptGroup
from multisubject.train.rewards import RewardInputs

LATENT = (4, 8, 8)  # (C, h, w)


class ToyPolicy(nn.Module):
    def __init__(self, seed: int = 0, hidden: int = 16):
        super().__init__()
        torch.manual_seed(seed)
        channels = LATENT[0]
        self.base = nn.Sequential(nn.Conv2d(channels + 2, hidden, 3, padding=1), nn.SiLU(),
                                  nn.Conv2d(hidden, channels, 3, padding=1))
        self.base.requires_grad_(False)
        self.adapter = nn.Sequential(nn.Conv2d(channels + 2, hidden, 3, padding=1), nn.SiLU(),
                                     nn.Conv2d(hidden, channels, 3, padding=1))
        nn.init.zeros_(self.adapter[2].weight)
        nn.init.zeros_(self.adapter[2].bias)

    def condition(self, groups: Sequence[PromptGroup], group_size: int) -> Tensor:
        masks = torch.stack([g.conditioning for g in groups])  # (num_groups, h, w)
        return masks.repeat_interleave(group_size, 0)  # (B, h, w)

    def select(self, cond: Tensor, index: Tensor) -> Tensor:
        return cond[index]

    def latent_shape(self, group: PromptGroup) -> tuple[int, int, int]:
        return LATENT

    def velocity(self, x: Tensor, sigma: Tensor, cond: Tensor) -> Tensor:
        inp = torch.cat([x, cond[:, None].to(x), sigma.view(-1, 1, 1, 1).expand(-1, 1, *x.shape[2:]).to(x)], 1)
        return self.base(inp) + self.adapter(inp)

    def decode(self, latents: Tensor) -> Tensor:
        rgb = torch.sigmoid(latents[:, :3])  # (B, 3, h, w)
        return nn.functional.interpolate(rgb, scale_factor=2, mode="nearest").permute(0, 2, 3, 1)  # (B, H, W, 3)


def toy_group(index: int) -> PromptGroup:
    """Prompt groups whose single subject sits in one of four quadrant boxes."""
    x0, y0 = (index % 2) * 0.5, ((index // 2) % 2) * 0.5
    box = (x0, y0, x0 + 0.5, y0 + 0.5)
    layout = Layout(width=16, height=16, regions=(Region(box=box, label="toy"),))
    h, w = LATENT[1:]
    mask = torch.zeros(h, w)
    mask[int(y0 * h):int((y0 + 0.5) * h), int(x0 * w):int((x0 + 0.5) * w)] = 1.0
    subjects = Subjects((Subject(images=torch.rand(1, 8, 8, 3, generator=torch.Generator().manual_seed(index)),
                                 label="toy"),))
    return PromptGroup(prompt=f"a toy in quadrant {index % 4}", subjects=subjects, layout=layout, conditioning=mask)


def box_brightness(inputs: RewardInputs) -> Tensor:
    """Mean brightness of each image inside its first subject's box (the toy reward)."""
    out = []
    for image, layout in zip(inputs.images, inputs.layouts):
        x0, y0, x1, y1 = layout.regions[0].bounding_box()
        height, width = image.shape[:2]
        out.append(image[int(y0 * height):int(y1 * height), int(x0 * width):int(x1 * width)].mean())
    return torch.stack(out)


def image_brightness(inputs: RewardInputs) -> Tensor:
    """Mean brightness of each whole image (a toy reward every pixel contributes to)."""
    return inputs.images.mean((1, 2, 3))
