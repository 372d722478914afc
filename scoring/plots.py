"""Evaluation plots: per-metric bars across runs, and a grid of the worst samples' identity reports."""

from __future__ import annotations

import math
from pathlib import Path

from .deps import require

WORST_KEYS = ("Multi-ID", "Overall", "Face-Sim", "DINO-I", "CLIP-I", "CLIP-T", "AES", "mIoU")


def _pyplot():
    matplotlib = require("matplotlib", "the evaluation plots")
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def plot_metric_bars(summaries: dict[str, dict], metrics: list[str], path: Path, title: str = "") -> Path:
    """One panel per metric, one bar per run (value printed on the bar)."""
    plt = _pyplot()
    runs = list(summaries)
    cols = min(4, max(1, len(metrics)))
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax, metric in zip(axes.flat, metrics):
        values = [summaries[r].get(metric) for r in runs]
        heights = [0.0 if v is None or math.isnan(v) else v for v in values]
        bars = ax.bar(range(len(runs)), heights, color=[colours(i % 10) for i in range(len(runs))])
        for bar, value in zip(bars, values):
            text = "n/a" if value is None or math.isnan(value) else f"{value:.3f}"
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                        fontsize=8)
        ax.set_title(metric, fontsize=10)
        ax.set_xticks(range(len(runs)), runs, rotation=20, fontsize=8)
        top = max([h for h in heights] + [0.0])
        ax.set_ylim(min(0.0, min(heights + [0.0])), top * 1.2 if top > 0 else 1.0)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.suptitle(f"{title} (higher is better)" if title else "higher is better", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_worst_samples(results: list, samples: dict, path: Path, count: int = 8, title: str = "") -> Path:
    """The ``count`` lowest-scoring samples (by Multi-ID, else Overall, ...) as identity reports or images."""
    from .manifest import load_image
    from .report import render_identity_report

    plt = _pyplot()
    key = next((k for k in WORST_KEYS if any(r.metrics.get(k) is not None for r in results)), None)
    ranked = sorted((r for r in results if key and r.metrics.get(key) is not None), key=lambda r: r.metrics[key])
    ranked = ranked[:count]
    cols = min(4, max(1, len(ranked)))
    rows = max(1, math.ceil(len(ranked) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, result in zip(axes.flat, ranked):
        sample = samples[(result.run, result.index)]
        image = load_image(sample.image, "generated image")[..., :3]
        if result.identity is not None:
            image = render_identity_report(image, result.identity, sample.subjects)
        ax.imshow(image.numpy())
        ax.set_title(f"{result.run} / {result.id}: {key} {result.metrics[key]:.3f}", fontsize=9)
    if not ranked:
        axes.flat[0].text(0.5, 0.5, "no evaluated samples", ha="center", va="center")
    heading = f"worst samples by {key}" if key else "worst samples"
    fig.suptitle(f"{title}: {heading}" if title else heading, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
