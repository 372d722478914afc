"""IP-Adapter weights for SD1.5 and SDXL: file loading, variant detection, projection models, per-site K/V.

An IP-Adapter file holds two groups of tensors (IP-Adapter, Ye et al. 2023, arXiv 2308.06721):
  * ``image_proj``: turns CLIP vision features into ``T`` context-width image tokens. Either
    ``ImageProj`` (global image embedding -> 4 tokens: Linear + LayerNorm) or a Perceiver
    ``Resampler`` (penultimate hidden states -> 16 learned-query tokens);
  * ``ip_adapter``: for every cross-attention site of the UNet, bias-free ``to_k_ip``/``to_v_ip``
    linears (context width -> site width), keyed ``"{2n+1}.to_k_ip.weight"`` with ``n`` counting the
    sites in the order of ``sdxl_sites()`` / ``sd15_sites()`` (the order the reference processors
    are registered in).

Files come as ``.safetensors`` (flat ``image_proj.*`` / ``ip_adapter.*`` keys) or ``.bin`` (a
pickled dict of the two groups, read with ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .files import check_weights, read_weight_file

SiteKey = tuple[str, int, int]  # ("input" | "middle" | "output", block id, transformer index): ComfyUI's attn2 key

RESAMPLER_DIM_HEAD = 64  # the reference Resampler always uses 64-wide heads (heads = inner width / 64)
WHAT = "IP-Adapter"  # how loader errors name these files


def sdxl_sites() -> tuple[SiteKey, ...]:
    """SDXL's 70 cross-attention sites in adapter order: input, output, then middle."""
    sites: list[SiteKey] = []
    for block in (4, 5, 7, 8):
        sites += [("input", block, i) for i in range(2 if block in (4, 5) else 10)]
    for block in range(6):
        sites += [("output", block, i) for i in range(2 if block in (3, 4, 5) else 10)]
    sites += [("middle", 0, i) for i in range(10)]
    return tuple(sites)


def sd15_sites() -> tuple[SiteKey, ...]:
    """SD1.5's 16 cross-attention sites in adapter order: input, output, then middle."""
    sites: list[SiteKey] = [("input", block, 0) for block in (1, 2, 4, 5, 7, 8)]
    sites += [("output", block, 0) for block in range(3, 12)]
    sites += [("middle", 0, 0)]
    return tuple(sites)


BASE_SITES = {"sdxl": sdxl_sites(), "sd15": sd15_sites()}
BASE_NAMES = {"sdxl": "SDXL", "sd15": "SD1.5"}


# projection models


class ImageProj(nn.Module):
    """Global image embedding -> ``T`` tokens (IP-Adapter's ``ImageProjModel``).

    Shapes:
        forward: (R, clip_dim) -> (R, T, C)
    """

    def __init__(self, clip_dim: int, context_dim: int, num_tokens: int) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.context_dim = context_dim
        self.proj = nn.Linear(clip_dim, num_tokens * context_dim)
        self.norm = nn.LayerNorm(context_dim)

    def forward(self, embeds: Tensor) -> Tensor:
        tokens = self.proj(embeds).reshape(-1, self.num_tokens, self.context_dim)  # (R, T, C)
        return self.norm(tokens)


class PerceiverAttention(nn.Module):
    """Learned queries attend to [image features ; queries] (one Resampler layer's attention)."""

    def __init__(self, dim: int, heads: int, dim_head: int = RESAMPLER_DIM_HEAD) -> None:
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        inner = heads * dim_head
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, features: Tensor, latents: Tensor) -> Tensor:
        """Shapes: features (R, P, dim), latents (R, T, dim) -> (R, T, dim)."""
        features = self.norm1(features)
        latents = self.norm2(latents)
        batch, num_queries, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([features, latents], dim=1)).chunk(2, dim=-1)
        q, k, v = (t.reshape(batch, -1, self.heads, self.dim_head).transpose(1, 2) for t in (q, k, v))  # (R, h, *, d)
        # the reference scales q and k by d**-0.25 each (more stable in fp16 than scaling the product)
        scale = 1.0 / math.sqrt(math.sqrt(self.dim_head))
        weight = ((q * scale) @ (k * scale).transpose(-2, -1)).float().softmax(dim=-1).to(q.dtype)
        out = (weight @ v).transpose(1, 2).reshape(batch, num_queries, -1)  # (R, T, inner)
        return self.to_out(out)


class Resampler(nn.Module):
    """Perceiver resampler: patch features -> ``T`` learned-query tokens (IP-Adapter plus).

    Shapes:
        forward: (R, P, clip_width) -> (R, T, C)
    """

    def __init__(
        self, dim: int, depth: int, heads: int, num_queries: int, embedding_dim: int, output_dim: int, ff_inner: int
    ) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.zeros(1, num_queries, dim))
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([
                PerceiverAttention(dim, heads),
                nn.Sequential(
                    nn.LayerNorm(dim), nn.Linear(dim, ff_inner, bias=False), nn.GELU(), nn.Linear(ff_inner, dim, bias=False)
                ),
            ])
            for _ in range(depth)
        )

    def forward(self, features: Tensor) -> Tensor:
        latents = self.latents.expand(features.shape[0], -1, -1)
        features = self.proj_in(features)
        for attn, ff in self.layers:
            latents = attn(features, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


# the adapter


@dataclass(frozen=True, eq=False)
class IPAdapter:
    """A loaded IP-Adapter (the ``MS_IPADAPTER`` socket value).

    Shapes:
        to_k_ip[n], to_v_ip[n]: (C_site, C) weights of site ``n`` (order of ``sites``)
    """

    name: str  # the variant, e.g. "ip-adapter-plus_sdxl_vit-h"
    base: str  # "sdxl" | "sd15"
    kind: str  # "global" (ImageProj on image_embeds) | "plus" (Resampler on penultimate hidden states)
    num_tokens: int  # image tokens per reference image (T)
    clip_dim: int  # width of the CLIP vision features the projection reads
    context_dim: int  # C: token width = the UNet's text-context width
    image_proj: nn.Module
    to_k_ip: tuple[Tensor, ...]
    to_v_ip: tuple[Tensor, ...]

    def __post_init__(self) -> None:
        if self.base not in BASE_SITES or self.kind not in ("global", "plus"):
            raise ValueError(f"unknown adapter base/kind {self.base!r}/{self.kind!r}")
        if len(self.to_k_ip) != len(self.sites) or len(self.to_v_ip) != len(self.sites):
            raise ValueError(f"{self.base} adapter needs {len(self.sites)} site weights, got {len(self.to_k_ip)}")

    @property
    def sites(self) -> tuple[SiteKey, ...]:
        return BASE_SITES[self.base]

    @property
    def base_name(self) -> str:
        return BASE_NAMES[self.base]

    @property
    def encoder_features(self) -> str:
        """Which CLIP vision output the projection reads."""
        return "penultimate_hidden_states" if self.kind == "plus" else "image_embeds"

    def describe(self) -> str:
        return (
            f"{self.name} ({self.base_name}, {self.num_tokens} tokens per image, reads CLIP vision "
            f"{self.encoder_features} of width {self.clip_dim})"
        )

    @torch.no_grad()
    def project(self, features: Tensor) -> Tensor:
        """CLIP vision features -> image tokens.

        Shapes:
            features: (R, clip_dim) image embeds (global) or (R, P, clip_dim) hidden states (plus)
            returns (R, T, C)
        """
        expected_ndim = 3 if self.kind == "plus" else 2
        if features.ndim != expected_ndim or features.shape[-1] != self.clip_dim:
            raise ValueError(
                f"the CLIP vision encoder gives {self.encoder_features} of shape {tuple(features.shape)}, but "
                f"{self.describe()} expects width {self.clip_dim}. Load the image encoder this adapter was trained "
                f"with: {encoder_hint(self)}"
            )
        param = next(self.image_proj.parameters())
        return self.image_proj(features.to(param.device, param.dtype))


def encoder_hint(adapter: IPAdapter) -> str:
    if adapter.clip_dim == 1280 and adapter.kind == "global":
        return "OpenCLIP ViT-bigG/14 (1280-d image embeds)"
    if adapter.clip_dim in (1024, 1280):
        return "OpenCLIP ViT-H/14 (1024-d image embeds, 1280-wide hidden states)"
    return f"an encoder whose {adapter.encoder_features} are {adapter.clip_dim} wide"


# loading


def load_adapter_file(path: str | Path) -> IPAdapter:
    """Read an IP-Adapter ``.safetensors`` or ``.bin`` file and build the adapter it describes.

    Every tensor must be finite float32/float16/bfloat16; a damaged, truncated or pickled-object file is
    refused with a ``ModelFileError`` naming the file and the fix.
    """
    path = Path(path)
    state = read_weight_file(path, WHAT, convert_hint="use the .safetensors release of this IP-Adapter")
    check_weights(path, WHAT, state)
    return adapter_from_state_dict(state, name_hint=path.name)


def adapter_from_state_dict(state: dict, name_hint: str = "adapter") -> IPAdapter:
    """Detect the variant from keys and shapes and build the adapter.

    Accepts the nested ``{"image_proj": {...}, "ip_adapter": {...}}`` layout of ``.bin`` files and the flat
    ``image_proj.*`` / ``ip_adapter.*`` layout of ``.safetensors`` files.
    """
    proj_state, site_state = _split_groups(state, name_hint)
    k_weights, v_weights = _site_weights(site_state, name_hint)
    base = {len(s): b for b, s in BASE_SITES.items()}.get(len(k_weights))
    if base is None:
        raise ValueError(
            f"{name_hint}: found {len(k_weights)} cross-attention sites (to_k_ip/to_v_ip pairs); SDXL IP-Adapters have "
            f"70 and SD1.5 ones 16. This file is for another model family; use an SDXL or SD1.5 IP-Adapter"
        )
    context_dim = int(k_weights[0].shape[1])
    if "latents" in proj_state:
        kind, image_proj, clip_dim, num_tokens = "plus", *_build_resampler(proj_state, name_hint)
    elif "proj.weight" in proj_state and "norm.weight" in proj_state:
        kind, image_proj, clip_dim, num_tokens = "global", *_build_image_proj(proj_state, name_hint)
    else:
        raise ValueError(
            f"{name_hint}: unknown image projection with keys {_sample_keys(proj_state)}; supported are IP-Adapter "
            "(image_proj.proj + image_proj.norm, 4 tokens) and IP-Adapter plus (image_proj.latents, Perceiver "
            "Resampler, 16 tokens). FaceID / full-face variants are not supported"
        )
    out_dim = _proj_output_dim(image_proj)
    if out_dim != context_dim:
        raise ValueError(
            f"{name_hint}: image projection gives {out_dim}-wide tokens but to_k_ip reads {context_dim}-wide context; "
            "the file is inconsistent or damaged"
        )
    return IPAdapter(
        name=_variant_name(base, kind, clip_dim, num_tokens, context_dim),
        base=base, kind=kind, num_tokens=num_tokens, clip_dim=clip_dim, context_dim=context_dim,
        image_proj=image_proj.eval().requires_grad_(False), to_k_ip=tuple(k_weights), to_v_ip=tuple(v_weights),
    )


def _split_groups(state: dict, name_hint: str) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    if isinstance(state.get("image_proj"), dict) and isinstance(state.get("ip_adapter"), dict):
        return dict(state["image_proj"]), dict(state["ip_adapter"])
    proj = {k[len("image_proj."):]: v for k, v in state.items() if k.startswith("image_proj.")}
    sites = {k[len("ip_adapter."):]: v for k, v in state.items() if k.startswith("ip_adapter.")}
    if not proj or not sites:
        raise ValueError(
            f"{name_hint} is not an IP-Adapter: expected 'image_proj' and 'ip_adapter' groups of weights, found "
            f"keys {_sample_keys(state)}. Put IP-Adapter files (e.g. ip-adapter-plus_sdxl_vit-h) in models/ipadapter"
        )
    return proj, sites


def _site_weights(site_state: dict[str, Tensor], name_hint: str) -> tuple[list[Tensor], list[Tensor]]:
    pattern = re.compile(r"^(\d+)\.to_([kv])_ip\.weight$")
    found: dict[str, dict[int, Tensor]] = {"k": {}, "v": {}}
    for key, value in site_state.items():
        match = pattern.match(key)
        if match:
            found[match.group(2)][int(match.group(1))] = value
    numbers = sorted(found["k"])
    expected = [2 * n + 1 for n in range(len(numbers))]
    if not numbers or numbers != expected or sorted(found["v"]) != expected:
        raise ValueError(
            f"{name_hint}: ip_adapter weights are not numbered 1, 3, 5, ... with one to_k_ip and one to_v_ip each "
            f"(found keys {_sample_keys(site_state)}); the file is not an IP-Adapter in the reference layout"
        )
    # kept in the file's dtype (SDXL's 140 matrices are ~0.7 GB in fp16); site_kv converts one site at a time
    return [found["k"][n] for n in numbers], [found["v"][n] for n in numbers]


def _build_image_proj(state: dict[str, Tensor], name_hint: str) -> tuple[nn.Module, int, int]:
    out_features, clip_dim = state["proj.weight"].shape
    context_dim = state["norm.weight"].shape[0]
    if out_features % context_dim:
        raise ValueError(f"{name_hint}: image_proj.proj gives {out_features} values, not a multiple of {context_dim}")
    module = ImageProj(int(clip_dim), int(context_dim), int(out_features // context_dim))
    _load_strict(module, state, name_hint)
    return module, int(clip_dim), module.num_tokens


def _build_resampler(state: dict[str, Tensor], name_hint: str) -> tuple[nn.Module, int, int]:
    _, num_queries, dim = state["latents"].shape
    depth = len({k.split(".")[1] for k in state if k.startswith("layers.")})
    inner = state["layers.0.0.to_q.weight"].shape[0] if depth else 0
    if not depth or inner % RESAMPLER_DIM_HEAD:
        raise ValueError(
            f"{name_hint}: Resampler has {depth} layers and {inner}-wide attention; expected at least one layer and "
            f"a width that is a multiple of {RESAMPLER_DIM_HEAD}"
        )
    module = Resampler(
        dim=int(dim), depth=depth, heads=int(inner // RESAMPLER_DIM_HEAD), num_queries=int(num_queries),
        embedding_dim=int(state["proj_in.weight"].shape[1]), output_dim=int(state["proj_out.weight"].shape[0]),
        ff_inner=int(state["layers.0.1.1.weight"].shape[0]),
    )
    _load_strict(module, state, name_hint)
    return module, int(state["proj_in.weight"].shape[1]), int(num_queries)


def _load_strict(module: nn.Module, state: dict[str, Tensor], name_hint: str) -> None:
    try:
        module.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{name_hint}: image projection weights do not fit the detected layout: {e}") from None


def _proj_output_dim(module: nn.Module) -> int:
    return module.context_dim if isinstance(module, ImageProj) else module.proj_out.out_features


def _variant_name(base: str, kind: str, clip_dim: int, num_tokens: int, context_dim: int) -> str:
    known = {
        ("sdxl", "global", 1280, 4, 2048): "ip-adapter_sdxl",
        ("sdxl", "global", 1024, 4, 2048): "ip-adapter_sdxl_vit-h",
        ("sdxl", "plus", 1280, 16, 2048): "ip-adapter-plus_sdxl_vit-h",
        ("sd15", "global", 1024, 4, 768): "ip-adapter_sd15",
        ("sd15", "plus", 1280, 16, 768): "ip-adapter-plus_sd15",
    }
    plus = "-plus" if kind == "plus" else ""
    return known.get((base, kind, clip_dim, num_tokens, context_dim), f"ip-adapter{plus}_{base} (custom dims)")


def _sample_keys(state: dict, limit: int = 4) -> str:
    keys = sorted(str(k) for k in state)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return "[" + ", ".join(keys[:limit]) + "]" + more


def adapter_state_dict(adapter: IPAdapter) -> dict[str, Tensor]:
    """Flat ``.safetensors`` layout of ``adapter`` (the inverse of ``adapter_from_state_dict``)."""
    state = {f"image_proj.{k}": v.detach().clone() for k, v in adapter.image_proj.state_dict().items()}
    for n, (k, v) in enumerate(zip(adapter.to_k_ip, adapter.to_v_ip)):
        state[f"ip_adapter.{2 * n + 1}.to_k_ip.weight"] = k.clone()
        state[f"ip_adapter.{2 * n + 1}.to_v_ip.weight"] = v.clone()
    return state
