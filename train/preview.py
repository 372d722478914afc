"""Sample previews during training: the generated image (Euler sampling with the current adapters) next to each
subject's IDAR attention heatmap at the last step, written as one PNG."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..attention.attention_maps import normalize_maps
from ..attention.families import FLUX
from ..attention.pil import to_pil
from .cache import LatentCache
from .config import IDARConfig


@torch.no_grad()
def write_preview(backend, cache: LatentCache, index: int, cfg: IDARConfig, blocks: list[int], path: Path) -> Path:
    """Generate sample ``index`` of the cache from pure noise and save ``[image | heatmap_0 | heatmap_1 | ...]``."""
    from .comfy_backend import FluxInputs, latent_to_rgb

    keys = cache.samples[index]
    device = next(p for _, p in backend.trainable_parameters()).device
    x0 = cache.get(keys.target)[None].to(device)
    refs = [cache.get(k)[None].to(device) for k in keys.references]
    context, pooled = (t[None].to(device) for t in cache.text(keys.text))
    x = torch.randn(x0.shape, generator=torch.Generator().manual_seed(cfg.run.seed)).to(device)
    sigmas = torch.linspace(1.0, 0.0, cfg.run.sample_steps + 1)
    maps = []
    for sigma, next_sigma in zip(sigmas[:-1], sigmas[1:]):
        inputs = FluxInputs(x, sigma.view(1).to(device), context, pooled, refs, cfg.model.guidance)
        v, maps = backend(inputs, idar_blocks=blocks, idar_direction=cfg.loss.idar_direction)
        x = x + (next_sigma - sigma) * v  # Euler step of the flow ODE
    image = latent_to_rgb(x[0])  # (3, h, w)
    grid_h, grid_w = FLUX.token_grid(*x.shape[-2:])
    heat = normalize_maps(torch.stack(maps).mean(0))[0].view(-1, 1, grid_h, grid_w).cpu()  # (S, 1, gh, gw)
    size = (image.shape[-2] * FLUX.vae_downscale, image.shape[-1] * FLUX.vae_downscale)
    tiles = [F.interpolate(image[None], size=size, mode="bilinear")[0]]
    tiles += [F.interpolate(h[None], size=size, mode="nearest")[0].expand(3, -1, -1) * torch.tensor([1.0, 0.5, 0.1])[:, None, None]
              for h in heat]
    strip = torch.cat([torch.cat([t, torch.zeros(3, size[0], 4)], dim=2) for t in tiles], dim=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    to_pil(strip.permute(1, 2, 0)).save(path)
    return path
