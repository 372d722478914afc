"""Synthetic multi-subject dataset for the IDAR trainer tests: coloured shapes as subjects, masks known exactly.

Each sample folder follows the `data build` convention: target.png (shapes on a dark background), ref_<i>.png
(subject i alone, centred), mask_<i>.png (subject i's pixels in the target), caption.txt, labels.txt.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (230, 40, 40), "blue": (40, 80, 230), "green": (40, 200, 60), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle")


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=fill)


def make_dataset(root: Path, num_samples: int = 8, size: int = 128, ref_size: int = 64, subjects: int = 2,
                 seed: int = 0) -> Path:
    """Write ``num_samples`` sample folders under ``root``; returns ``root``. Subjects sit in separate slots
    (left/right halves for 2 subjects), at a random place inside their slot, so the masks never overlap."""
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    for n in range(num_samples):
        folder = root / f"sample_{n:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        target = Image.new("RGB", (size, size), (25, 25, 25))
        draw = ImageDraw.Draw(target)
        chosen = rng.choice(len(names), subjects, replace=False)
        order = rng.permutation(subjects)  # which slot each subject takes
        slot_w = size // subjects
        labels = []
        for i, c in enumerate(chosen):
            colour, shape = names[c], SHAPES[(n + i) % 2]
            extent = int(rng.integers(size // 4, size // 3))
            x0 = int(order[i] * slot_w + rng.integers(0, slot_w - extent))
            y0 = int(rng.integers(0, size - extent))
            box = (x0, y0, x0 + extent, y0 + extent)
            _draw(draw, shape, box, COLOURS[colour])
            mask = Image.new("L", (size, size), 0)
            _draw(ImageDraw.Draw(mask), shape, box, 255)
            mask.save(folder / f"mask_{i}.png")
            ref = Image.new("RGB", (ref_size, ref_size), (128, 128, 128))
            margin = ref_size // 6
            _draw(ImageDraw.Draw(ref), shape, (margin, margin, ref_size - margin, ref_size - margin), COLOURS[colour])
            ref.save(folder / f"ref_{i}.png")
            labels.append(f"a {colour} {shape}")
        target.save(folder / "target.png")
        (folder / "caption.txt").write_text(" and ".join(labels))
        (folder / "labels.txt").write_text("\n".join(labels))
    return root


TINY_TOML = """trainer = "idar"

[model]
tiny = true
tiny_hidden = 64
tiny_heads = 2
tiny_depth = 2
tiny_depth_single = 1

[data]
manifest = "{manifest}"
resolution = 128
ref_size = 64
text_dropout = 0.0

[lora]
rank = 4

[moe]
rank = 4
num_experts = 2

[loss]
idar_weight = 0.5

[optim]
lr = 1e-3
warmup_steps = 0
micro_batch = 2

[run]
out_dir = "{out_dir}"
max_steps = 3
precision = "fp32"
grad_checkpointing = false
save_every = 1
log_every = 1
progress = false
"""


def write_config(path: Path, manifest: Path, out_dir: Path) -> Path:
    path.write_text(TINY_TOML.format(manifest=manifest, out_dir=out_dir))
    return path


def evaluate_dice(backend, cache, cfg, ids: list[int] | None = None,
                  t_values: tuple[float, ...] = (0.25, 0.5, 0.75), seed: int = 1234) -> float:
    """Test oracle. Mean soft Dice score (1 - Dice loss) between the IDAR attention maps and the masks, over samples ``ids``
    (default: all) at fixed timesteps with fixed noise: how well the model's reference->image attention follows
    the subjects' regions."""
    import torch

    from multisubject.train.comfy_backend import FluxInputs
    from multisubject.train.idar import idar_blocks, load_batch
    from multisubject.train.losses import idar_loss, noised

    device = next(p for _, p in backend.trainable_parameters()).device
    blocks = idar_blocks(cfg, backend.num_double_blocks)
    scores = []
    with torch.no_grad():
        for i in ids if ids is not None else range(len(cache.samples)):
            batch = load_batch(cache, [i], [False], device)
            for t_value in t_values:
                gen = torch.Generator().manual_seed(seed + i)
                noise = torch.randn(batch.x0.shape, generator=gen).to(device)
                t = torch.full((1,), t_value)
                inputs = FluxInputs(noised(batch.x0, noise, t.to(device)), t.to(device), batch.context, batch.pooled,
                                    batch.refs, cfg.model.guidance)
                _, maps = backend(inputs, idar_blocks=blocks, idar_direction=cfg.loss.idar_direction)
                _, dice = idar_loss(maps, batch.masks, cfg.loss.dice_eps)
                scores.append(dice.mean())
    return float(torch.stack(scores).mean())
