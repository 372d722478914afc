"""Tiny IP-Adapter state dicts in the real key layout (shared by both test tiers)."""

from __future__ import annotations

import torch

from multisubject.attention.ip_adapter import BASE_SITES, RESAMPLER_DIM_HEAD


def site_widths(base: str, model_channels: int) -> list[int]:
    """Width of each attn2 site, in adapter order, for a UNet with ``model_channels`` (mult 1,2,4 / 1,2,4,4)."""
    widths = []
    for block, block_id, _ in BASE_SITES[base]:
        if base == "sdxl":
            level = {"input": {4: 1, 5: 1, 7: 2, 8: 2}, "output": {0: 2, 1: 2, 2: 2, 3: 1, 4: 1, 5: 1}}
            mult = (1, 2, 4)[level[block][block_id]] if block != "middle" else 4
        else:
            level = {"input": {1: 0, 2: 0, 4: 1, 5: 1, 7: 2, 8: 2},
                     "output": {3: 2, 4: 2, 5: 2, 6: 1, 7: 1, 8: 1, 9: 0, 10: 0, 11: 0}}
            mult = (1, 2, 4)[level[block][block_id]] if block != "middle" else 4
        widths.append(model_channels * mult)
    return widths


def adapter_state(
    base: str = "sdxl",
    kind: str = "plus",
    *,
    model_channels: int = 32,
    context_dim: int = 32,
    clip_dim: int = 48,
    num_tokens: int | None = None,
    resampler_dim: int = 64,
    depth: int = 2,
    seed: int = 0,
    nested: bool = False,
) -> dict:
    """Random IP-Adapter weights with exactly the key names and shape relations of the real files."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.2):
        return torch.randn(*shape, generator=gen) * std

    proj = {}
    if kind == "global":
        num_tokens = num_tokens or 4
        proj["proj.weight"] = rnd(num_tokens * context_dim, clip_dim)
        proj["proj.bias"] = rnd(num_tokens * context_dim)
        proj["norm.weight"] = 1 + rnd(context_dim, std=0.05)
        proj["norm.bias"] = rnd(context_dim, std=0.05)
    else:
        num_tokens = num_tokens or 16
        dim, inner, ff = resampler_dim, 2 * RESAMPLER_DIM_HEAD, 4 * resampler_dim
        proj["latents"] = rnd(1, num_tokens, dim, std=1.0)
        proj["proj_in.weight"], proj["proj_in.bias"] = rnd(dim, clip_dim), rnd(dim)
        proj["proj_out.weight"], proj["proj_out.bias"] = rnd(context_dim, dim), rnd(context_dim)
        proj["norm_out.weight"], proj["norm_out.bias"] = 1 + rnd(context_dim, std=0.05), rnd(context_dim, std=0.05)
        for i in range(depth):
            p = f"layers.{i}."
            for norm in ("0.norm1", "0.norm2", "1.0"):
                proj[p + norm + ".weight"], proj[p + norm + ".bias"] = 1 + rnd(dim, std=0.05), rnd(dim, std=0.05)
            proj[p + "0.to_q.weight"] = rnd(inner, dim)
            proj[p + "0.to_kv.weight"] = rnd(2 * inner, dim)
            proj[p + "0.to_out.weight"] = rnd(dim, inner)
            proj[p + "1.1.weight"] = rnd(ff, dim)
            proj[p + "1.3.weight"] = rnd(dim, ff)
    sites = {}
    for n, width in enumerate(site_widths(base, model_channels)):
        sites[f"{2 * n + 1}.to_k_ip.weight"] = rnd(width, context_dim)
        sites[f"{2 * n + 1}.to_v_ip.weight"] = rnd(width, context_dim)
    if nested:
        return {"image_proj": proj, "ip_adapter": sites}
    return {**{f"image_proj.{k}": v for k, v in proj.items()}, **{f"ip_adapter.{k}": v for k, v in sites.items()}}
