"""Checks on untrusted input, shared by the core and the nodes: finite numbers and tensors, short quotes.

Every check raises one ``ValueError`` that names what came, what was expected and the fix, before any
work is done with the value. Values typed or posted by users are quoted through ``quote`` so a 1 MB
input never ends up in an error message (or in ComfyUI's ``/history``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

QUOTE_CHARS = 80  # longest piece of user input an error message repeats
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def quote(text: object, limit: int = QUOTE_CHARS) -> str:
    """``text`` as a string of at most ~``limit`` characters; longer text keeps its head and says how much was cut."""
    text = str(text)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


def check_number(name: str, value: object, low: float | None = None, high: float | None = None) -> float:
    """``value`` as a float, or an error unless it is a finite number within ``[low, high]``.

    ComfyUI's own min/max check lets NaN through (every comparison with NaN is false), and the API
    can post any JSON number, so nodes call this for every FLOAT input they use.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {quote(repr(value))}")
    number = float(value)
    bounds = f" within [{low:g}, {high:g}]" if low is not None and high is not None else ""
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number{bounds}, got {number}; set it to a real value")
    if (low is not None and number < low) or (high is not None and number > high):
        raise ValueError(f"{name} must be{bounds or ' in range'}, got {number:g}")
    return number


def check_finite(what: str, tensor: Tensor) -> Tensor:
    """``tensor`` unchanged, or an error when it holds NaN or inf (e.g. an image from a broken upstream node)."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(
            f"{what} holds {bad} NaN or inf value(s) of {tensor.numel()}; the node that made it produced invalid "
            "numbers. Check its inputs (a NaN strength or blend factor, a broken model) and run again"
        )
    return tensor


def check_image_batch(what: str, image: Tensor, channels: tuple[int, ...] = (1, 3, 4)) -> Tensor:
    """A ComfyUI IMAGE batch (B, H, W, C) with B, H, W >= 1, C in ``channels`` and finite values.

    Shapes:
        image: (B, H, W, C) float in [0, 1]
    """
    if not isinstance(image, Tensor) or image.ndim != 4:
        got = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"{what} must be an image batch (B, H, W, C), got {got}")
    if 0 in image.shape[:3]:
        raise ValueError(
            f"{what} is empty: shape {tuple(image.shape)} (batch, height, width must be at least 1); connect a node "
            "that outputs at least one image"
        )
    if image.shape[-1] not in channels:
        raise ValueError(
            f"{what} has {image.shape[-1]} channel(s), shape {tuple(image.shape)}; expected "
            f"{' or '.join(map(str, channels))} (RGB, RGBA or grayscale). Convert it to RGB first"
        )
    return check_finite(what, image)


def weight_problems(where: str, tensors: list[Tensor]) -> list[str]:
    """Problems of weight tensors read from a file: not a tensor, dtype outside float32/16/bf16, NaN or inf."""
    problems = []
    for t in tensors:
        if not isinstance(t, Tensor):
            problems.append(f"{where}: expected a tensor, got {type(t).__name__}")
        elif t.dtype not in WEIGHT_DTYPES:
            problems.append(f"{where}: dtype {t.dtype} is not one of float32, float16, bfloat16")
        elif not bool(torch.isfinite(t).all()):
            problems.append(f"{where}: holds NaN or inf values")
    return problems
