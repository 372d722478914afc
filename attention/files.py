"""Reading model files safely, with errors that say which file, what it is, and what to do.

Every loader of the pack (IP-Adapter, MultiCrafter weights, the scoring models) reads through this
module, so every damaged or wrong file gets the same kind of message:

    <what> file '<path>' <what is wrong with it>. <what to do>

Nothing is ever unpickled: ``.safetensors`` files are parsed by safetensors, and ``.bin``/``.pt``
files by ``torch.load(weights_only=True)``, which only rebuilds tensors and plain containers and
refuses any other pickled object (such an object could run code when loaded).
"""

from __future__ import annotations

import contextlib
import json
import pickle
import re
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor

from .checks import quote, weight_problems

SAFETENSORS_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
REDOWNLOAD = "download it again (check its size against the source)"


class ModelFileError(ValueError):
    """A model file that cannot be used; the message names the file, the problem and the fix."""


def file_error(path: str | Path, what: str, problem: str, fix: str) -> ModelFileError:
    """The one format of loader errors: ``<what> file '<path>' <problem>. <fix>``."""
    return ModelFileError(f"{what} file '{path}' {problem}. {fix[:1].upper()}{fix[1:]}")


@contextlib.contextmanager
def reading(path: str | Path, what: str, fix: str = REDOWNLOAD) -> Iterator[None]:
    """Turn any library error raised while loading ``path`` into a ``ModelFileError`` naming the file."""
    try:
        yield
    except ModelFileError:
        raise
    except Exception as e:  # library loaders raise many types (OSError, RuntimeError, SafetensorError, ...)
        raise file_error(path, what, f"could not be loaded ({type(e).__name__}: {quote(e, 160)})", fix) from None


def _require_file(path: Path, what: str) -> int:
    if not path.is_file():
        raise file_error(path, what, "does not exist", "pick a file from the list, or copy the file there")
    size = path.stat().st_size
    if size == 0:
        raise file_error(path, what, "is empty (0 bytes): the download or copy did not finish", REDOWNLOAD)
    return size


def read_safetensors(path: str | Path, what: str, device: str = "cpu") -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and ``__metadata__`` of a ``.safetensors`` file; truncated or foreign files get a clear error."""
    path = Path(path)
    size = _require_file(path, what)
    with open(path, "rb") as f:
        head = f.read(8)
        header_len = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        header = f.read(min(header_len, size)) if header_len is not None else b""
    not_safetensors = ("is not a safetensors file (no safetensors header at its start)",
                       "check that you picked the right file; if so, " + REDOWNLOAD)
    if header_len is None or not header.startswith(b"{"):
        raise file_error(path, what, *not_safetensors)
    if 8 + header_len > size:
        raise file_error(path, what, f"is truncated: its header alone needs {8 + header_len} bytes but the file has "
                         f"{size}", REDOWNLOAD)
    try:
        entries = json.loads(header)
        end = max((int(v["data_offsets"][1]) for k, v in entries.items() if k != "__metadata__"), default=0)
    except (ValueError, TypeError, KeyError, IndexError):
        raise file_error(path, what, *not_safetensors) from None
    if 8 + header_len + end > size:
        raise file_error(path, what, f"is truncated: it has {size} bytes but its header describes "
                         f"{8 + header_len + end}", REDOWNLOAD)
    from safetensors import safe_open

    with reading(path, what):
        with safe_open(str(path), framework="pt", device=device) as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, metadata


def read_torch_file(path: str | Path, what: str, convert_hint: str = "") -> dict:
    """The dict a ``.bin``/``.pt`` file holds, loaded with ``torch.load(weights_only=True)`` (never unpickled).

    ``convert_hint`` is added to the message when the file holds pickled Python objects (e.g. how
    to turn it into a plain state dict on a machine that trusts the file).
    """
    path = Path(path)
    _require_file(path, what)
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused a global: the file pickles Python objects
        found = re.search(r"(?:Unsupported global|GLOBAL)[:\s]+([\w.]+(?: [\w.]+)?)", str(e))
        problem = (f"holds pickled Python objects{f' ({found.group(1)})' if found else ''}, not just tensors; it is "
                   "refused because loading such objects can run code, and this pack never unpickles files")
        fix = convert_hint or "use the .safetensors release of this file"
        raise file_error(path, what, problem, fix) from None
    except (RuntimeError, EOFError, OSError) as e:
        truncated = any(s in str(e) for s in ("central directory", "unexpected EOF", "Ran out of input", "zip"))
        problem = "is truncated or not a PyTorch file" if truncated else f"could not be read ({quote(e, 160)})"
        raise file_error(path, what, problem, REDOWNLOAD) from None
    if not isinstance(state, dict) or not state:
        got = "an empty dict" if isinstance(state, dict) else f"a {type(state).__name__}"
        raise file_error(path, what, f"holds {got}, expected a dict of named tensors",
                         "check that this is the right file")
    return state


def read_weight_file(path: str | Path, what: str, convert_hint: str = "") -> dict:
    """A state dict from ``.safetensors`` or ``.bin``/``.pt``/``.pth``/``.ckpt``, chosen by suffix."""
    path = Path(path)
    if path.suffix == SAFETENSORS_SUFFIX:
        return read_safetensors(path, what)[0]
    if path.suffix in PICKLE_SUFFIXES:
        return read_torch_file(path, what, convert_hint)
    raise file_error(path, what, f"is not a .safetensors or .bin file (suffix '{quote(path.suffix, 20)}')",
                     f"use a {SAFETENSORS_SUFFIX} file (or {', '.join(PICKLE_SUFFIXES)} holding plain tensors)")


def check_weights(path: str | Path, what: str, tensors: Mapping[str, object]) -> None:
    """Raise unless every value is a finite float32/float16/bfloat16 tensor (nested dicts are walked)."""
    problems = []
    for key, value in tensors.items():
        if isinstance(value, Mapping):
            problems += [p for k, v in value.items() for p in weight_problems(f"{key}.{k}", [v])]
        else:
            problems += weight_problems(str(key), [value])
    if problems:
        shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
        raise file_error(path, what, f"has unusable weights: {shown}", REDOWNLOAD + ", or re-export it in float32, "
                         "float16 or bfloat16")
