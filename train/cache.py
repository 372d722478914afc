"""Latent and text-embedding cache: computed once by ``python -m multisubject data cache``, read by training.

Entries are keyed by content (sha256 of the file bytes or caption + the geometry + the encoder's name), so a
reference shared by many samples is encoded once and editing one image re-encodes only that image. Tensors live in
safetensors shards (``shard_<n>.safetensors``) with ``index.json`` mapping key -> shard; ``samples.json`` lists, per
manifest line, the keys of its target, references, masks and caption, plus the manifest's hash so a stale cache is
refused. T5 never runs in the training loop.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from ..attention.families import FLUX
from .config import DataConfig
from .data import (
    ManifestRow,
    assign_bucket,
    fit_to_bucket,
    image_size,
    load_image,
    load_mask,
    make_buckets,
    mask_tokens,
)

SHARD_ENTRIES = 512  # cache entries per shard file


class Encoder(Protocol):
    """What the cache needs from a model: a VAE and the text encoders (ComfyUI's in ``comfy_backend``)."""

    name: str  # changes whenever the encoding would change (model files, latent format)

    def encode_images(self, pixels: Tensor) -> Tensor:
        """Shapes: pixels (B, 3, H, W) in [-1, 1]; returns (B, C, H/8, W/8), model-space latents."""

    def encode_texts(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """Returns (context (B, T_txt, D_ctx), pooled (B, D_vec))."""


class TinyEncoder:
    """Deterministic stand-in encoder for tiny models (tests, benchmarks): 8x average pooling and a fixed random
    3 -> 16 channel map for images (colours survive, so subjects stay recognisable); hashed word embeddings for text."""

    def __init__(self, context_dim: int, vec_dim: int, tokens: int = 8, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.channels = torch.randn(FLUX.latent_channels, 3, generator=gen)
        self.context_dim, self.vec_dim, self.tokens = context_dim, vec_dim, tokens
        self.name = f"tiny-{context_dim}-{vec_dim}-{tokens}-{seed}"

    def encode_images(self, pixels: Tensor) -> Tensor:
        pooled = F.avg_pool2d(pixels.float(), FLUX.vae_downscale)  # (B, 3, H/8, W/8)
        return torch.einsum("oc,bchw->bohw", self.channels, pooled)

    def encode_texts(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        context = torch.zeros(len(captions), self.tokens, self.context_dim)
        for i, caption in enumerate(captions):
            for j, word in enumerate(caption.split()[: self.tokens]):
                seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:4], "little")
                context[i, j] = torch.randn(self.context_dim, generator=torch.Generator().manual_seed(seed))
        return context, context.mean(1)[:, : self.vec_dim].repeat(1, -(-self.vec_dim // self.context_dim))[:, : self.vec_dim]


@dataclass(frozen=True)
class SampleKeys:
    """Cache keys of one manifest line."""

    line: int
    target: str
    references: tuple[str, ...]
    masks: str  # (S, L) token masks
    text: str
    bucket: tuple[int, int]


def file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:32]


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def sample_keys(row: ManifestRow, cfg: DataConfig, encoder_name: str) -> SampleKeys:
    bucket = assign_bucket(*image_size(row.image), make_buckets(cfg.resolution, cfg.max_aspect))
    geometry = f"{bucket[0]}x{bucket[1]}"
    return SampleKeys(
        line=row.line,
        target=f"img/{file_hash(row.image)}/{geometry}/{encoder_name}",
        references=tuple(f"img/{file_hash(r)}/sq{cfg.ref_size}/{encoder_name}" for r in row.references),
        masks="mask/" + text_hash("|".join(file_hash(m) for m in row.masks)) + f"/{geometry}",
        text=f"text/{text_hash(row.caption)}/{encoder_name}",
        bucket=bucket,
    )


def empty_text_key(encoder_name: str) -> str:
    return f"text/{text_hash('')}/{encoder_name}"


def build_cache(rows: list[ManifestRow], manifest_hash: str, cfg: DataConfig, encoder: Encoder, cache_dir: str | Path,
                batch_size: int = 8) -> tuple[int, int]:
    """Encode whatever is not cached yet. Returns (entries added, entries reused)."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    index = _read_json(cache_dir / "index.json", {})
    todo: dict[str, tuple[str, object]] = {}  # key -> (kind, source)
    records = []
    for row in rows:
        keys = sample_keys(row, cfg, encoder.name)
        records.append(keys)
        todo.setdefault(keys.target, ("target", (row.image, keys.bucket)))
        for path, key in zip(row.references, keys.references):
            todo.setdefault(key, ("reference", path))
        todo.setdefault(keys.masks, ("masks", (row.masks, keys.bucket)))
        todo.setdefault(keys.text, ("text", row.caption))
    todo.setdefault(empty_text_key(encoder.name), ("text", ""))
    missing = [k for k in todo if k not in index]
    entries: dict[str, Tensor] = {}
    shard_id = 1 + max((int(s.split("_")[1].split(".")[0]) for s in set(index.values())), default=-1)
    for start in range(0, len(missing), batch_size):
        for key in missing[start:start + batch_size]:
            kind, source = todo[key]
            entries.update(_encode_entry(key, kind, source, cfg, encoder))
        if len(entries) >= SHARD_ENTRIES or start + batch_size >= len(missing):
            name = f"shard_{shard_id:05d}.safetensors"
            save_file({k: v.contiguous() for k, v in entries.items()}, str(cache_dir / name))
            for k in entries:
                index[k.split("#")[0]] = name
            entries, shard_id = {}, shard_id + 1
    _write_json(cache_dir / "index.json", index)
    _write_json(cache_dir / "samples.json", {"manifest_sha256": manifest_hash, "encoder": encoder.name,
                                             "samples": [_record(r) for r in records]})
    return len(missing), len(todo) - len(missing)


def _encode_entry(key: str, kind: str, source, cfg: DataConfig, encoder: Encoder) -> dict[str, Tensor]:
    with torch.no_grad():
        if kind == "target":
            path, (width, height) = source
            return {key: encoder.encode_images(fit_to_bucket(load_image(path), width, height)[None])[0].float().cpu()}
        if kind == "reference":
            pixels = fit_to_bucket(load_image(source), cfg.ref_size, cfg.ref_size)
            return {key: encoder.encode_images(pixels[None])[0].float().cpu()}
        if kind == "masks":
            paths, (width, height) = source
            masks = [fit_to_bucket(load_mask(p)[None], width, height, mode="area")[0] for p in paths]
            return {key: torch.stack([mask_tokens(m, height // FLUX.vae_downscale, width // FLUX.vae_downscale) for m in masks])}
        context, pooled = encoder.encode_texts([source])
        return {f"{key}#context": context[0].float().cpu(), f"{key}#pooled": pooled[0].float().cpu()}


class LatentCache:
    """Read side of the cache."""

    def __init__(self, cache_dir: str | Path, manifest_hash: str) -> None:
        self.dir = Path(cache_dir)
        samples = _read_json(self.dir / "samples.json", None)
        if samples is None:
            raise ValueError(f"no cache in {self.dir}; run `python -m multisubject data cache --config <cfg.toml>` first")
        if samples["manifest_sha256"] != manifest_hash:
            raise ValueError(f"the cache in {self.dir} was built from a different manifest; re-run "
                             "`python -m multisubject data cache --config <cfg.toml>` (only changed files are re-encoded)")
        self.encoder = samples["encoder"]
        self.samples = [SampleKeys(s["line"], s["target"], tuple(s["references"]), s["masks"], s["text"],
                                   tuple(s["bucket"])) for s in samples["samples"]]
        self.index = _read_json(self.dir / "index.json", {})
        self._handles: dict[str, object] = {}

    def get(self, key: str) -> Tensor:
        shard = self.index[key.split("#")[0]]
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.dir / shard), framework="pt")
        return self._handles[shard].get_tensor(key)

    def text(self, key: str) -> tuple[Tensor, Tensor]:
        return self.get(f"{key}#context"), self.get(f"{key}#pooled")


def _record(keys: SampleKeys) -> dict:
    return {"line": keys.line, "target": keys.target, "references": list(keys.references), "masks": keys.masks,
            "text": keys.text, "bucket": list(keys.bucket)}


def _read_json(path: Path, default):
    return json.loads(path.read_text()) if path.is_file() else default


def _write_json(path: Path, value) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)
