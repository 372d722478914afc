"""Hostile input to the pure core (issue 14): NaN, memory bombs, huge or deep text, damaged and planted files."""

import json
import os
import pickle
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from anyms_helpers import adapter_state
from safetensors.torch import save_file

from multisubject.attention.checks import QUOTE_CHARS, check_image_batch, check_number, quote
from multisubject.attention.files import ModelFileError, read_weight_file
from multisubject.attention.ip_adapter import load_adapter_file
from multisubject.attention.layout import MAX_BOXES_CHARS, MAX_REGIONS, Layout, parse_boxes
from multisubject.attention.preview import MAX_PREVIEW_SIDE, render_layout
from multisubject.attention.subjects import Subject
from multisubject.attention.weights import load_multicrafter_weights

# numbers and images


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_numbers_are_refused_with_the_name(value):
    with pytest.raises(ValueError, match=r"strength must be a finite number within \[-2, 2\], got"):
        check_number("strength", value, -2.0, 2.0)


def test_numbers_outside_the_range_and_non_numbers_are_refused():
    assert check_number("scale", 1, 0.0, 5.0) == 1.0
    with pytest.raises(ValueError, match=r"scale must be within \[0, 5\], got 9"):
        check_number("scale", 9.0, 0.0, 5.0)
    with pytest.raises(ValueError, match="scale must be a number"):
        check_number("scale", "1", 0.0, 5.0)


@pytest.mark.parametrize("image, message", [
    (torch.zeros(1, 8, 8, 2), "has 2 channel"),
    (torch.zeros(0, 8, 8, 3), "is empty"),
    (torch.zeros(1, 0, 8, 3), "is empty"),
    (torch.full((1, 8, 8, 3), float("nan")), "holds 192 NaN or inf"),
    (torch.zeros(8, 8, 3), "must be an image batch"),
])
def test_bad_image_batches_are_refused(image, message):
    with pytest.raises(ValueError, match=message):
        check_image_batch("background", image)


def test_nan_reference_image_and_nan_subject_mask_are_refused():
    image = torch.rand(1, 8, 8, 3)
    image[0, 3, 3, 1] = float("nan")
    with pytest.raises(ValueError, match="reference image holds NaN or inf"):
        Subject.from_image(image)
    with pytest.raises(ValueError, match="subject mask holds NaN or inf"):
        Subject.from_image(torch.rand(1, 8, 8, 3), torch.full((1, 8, 8), float("nan")))
    rgba = torch.rand(1, 8, 8, 4)
    rgba[..., 3] = float("inf")
    with pytest.raises(ValueError, match="subject mask holds NaN or inf"):
        Subject.from_image(rgba)


def test_quote_keeps_error_messages_short():
    assert quote("short") == "short"
    long = quote("x" * 1_000_000)
    assert len(long) < QUOTE_CHARS + 40 and "1000000 characters" in long


# layout text and region limits


def _error(text, **kwargs) -> str:
    with pytest.raises(ValueError) as info:
        parse_boxes(text, **kwargs)
    return str(info.value)


def test_a_huge_integer_and_deep_nesting_in_json_boxes_give_clear_errors():
    assert "a number is too large" in _error("[[1" + "0" * 400 + ", 0, 1, 1]]")
    assert "cannot be read" in _error("[[" + "1" * 5000 + ", 0, 1, 1]]")  # past Python's int digit limit
    assert "nested more than" in _error("[" * 30_000 + "]" * 30_000)  # RecursionError without the limit
    # brackets inside labels are text, not nesting
    assert parse_boxes('[{"box": [0, 0, 1, 1], "label": "[[[[[[[[[[[["}]')[0][1] == "[[[[[[[[[[[["


def test_box_text_size_and_region_count_are_capped():
    assert f"at most {MAX_BOXES_CHARS}" in _error("0, 0, 1, 1\n" * 100_000)
    assert f"at most {MAX_REGIONS} regions" in _error("0, 0, 1, 1\n" * (MAX_REGIONS + 1))
    assert len(parse_boxes("0, 0, 1, 1\n" * MAX_REGIONS)) == MAX_REGIONS
    with pytest.raises(ValueError, match=f"at most {MAX_REGIONS} regions"):
        Layout.from_masks(torch.ones(10_000, 2, 2))  # 10k regions: refused before any region is built
    with pytest.raises(ValueError, match=f"at most {MAX_REGIONS} regions"):
        Layout.from_boxes(64, 64, [(0, 0, 1, 1)] * 10_000)


def test_a_one_megabyte_bad_line_is_quoted_in_at_most_80_characters():
    bad = "0, 0, 1, " + "9" * 60_000  # under the size cap, one very long bad line
    for message in (_error(bad), _error(json.dumps([{"box": ["x" * 60_000]}]))):
        # the input is quoted in at most ~80 characters; the rest is our own text (the formats Layout from Boxes reads)
        assert max(len(run) for run in re.findall(r"9{20,}|x{20,}", message)) <= 80, message
        assert "60" in message and "characters" in message, message  # says how much was cut
        assert len(message) < 1000, message


# preview: bounded size, memory independent of the region count

_PEAK_SCRIPT = textwrap.dedent("""
    import json, resource, torch
    from multisubject.attention.layout import Layout
    from multisubject.attention.preview import render_layout
    render_layout(Layout.from_boxes(64, 64, [(0, 0, 1, 1)]))  # warm up code paths and the allocator
    peaks = [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss]
    for regions in (1, 64):
        boxes = [((i % 8) / 8, (i // 8) / 8, (i % 8 + 1) / 8, (i // 8 + 1) / 8) for i in range(regions)]
        image = render_layout(Layout.from_boxes(16384, 16384, boxes))
        peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    print(json.dumps({"shape": list(image.shape), "peaks_mb": [p / 1024 for p in peaks]}))
""")


def test_a_16384_square_preview_stays_under_300_mb_and_does_not_grow_with_the_region_count():
    # peak RSS of a fresh process (ru_maxrss is per process): the old renderer needed S x 16384^2 floats (1 GB each)
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["shape"] == [1, MAX_PREVIEW_SIDE, MAX_PREVIEW_SIDE, 3]
    base, one, sixty_four = result["peaks_mb"]
    assert one - base < 300, result  # ~50 MB canvas + ~50 MB of temporaries + the 12 MB picture
    assert sixty_four - one < 100, result  # 64 regions: a few temporaries more at most, not 64 region rasters (1 GB)


def test_sub_pixel_boxes_render_and_big_backgrounds_are_scaled_down():
    layout = Layout.from_boxes(1024, 1024, [(0.5, 0.5, 0.50001, 0.50001), (0.1, 0.1, 0.9, 0.9)])
    assert render_layout(layout).shape == (1, 1024, 1024, 3)
    wide = Layout.from_boxes(4096, 1024, [(0.25, 0.25, 0.75, 0.75)])
    assert render_layout(wide, background=torch.rand(1024, 4096, 1)).shape == (1, 512, 2048, 3)  # grayscale ok
    with pytest.raises(ValueError, match="has 2 channel"):
        render_layout(wide, background=torch.rand(1024, 4096, 2))
    mask_layout = Layout.from_masks(torch.ones(1, 4096, 4096))
    assert render_layout(mask_layout).shape == (1, 2048, 2048, 3)


# damaged, foreign and planted files: each error names the file and what to do

MARKER = "multisubject-planted-pickle-ran"


class _Planted:
    """Unpickling this runs ``open(marker, 'w')``: what a malicious checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _planted(path: Path, marker: Path) -> Path:
    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": _Planted(marker)}, str(path))
    return path


def _corrupt_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    good = tmp_path / "good.safetensors"
    save_file({"w": torch.zeros(64, 64)}, str(good))
    data = good.read_bytes()
    files = {
        "truncated safetensors": ("truncated.safetensors", data[: len(data) // 2], "is truncated"),
        "truncated header": ("cut.safetensors", data[:20], "is truncated"),
        "empty safetensors": ("empty.safetensors", b"", "is empty"),
        "random safetensors": ("random.safetensors", os.urandom(4096), "is not a safetensors file"),
        "empty bin": ("empty.bin", b"", "is empty"),
        "truncated bin": ("cut.bin", None, "is truncated or not a PyTorch file"),
        "bin holding a list": ("list.bin", None, "holds a list"),
    }
    out = {}
    for case, (name, content, message) in files.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        out[case] = (path, message)
    torch.save([torch.zeros(2)], str(tmp_path / "list.bin"))
    torch.save({"w": torch.zeros(64, 64)}, str(tmp_path / "whole.bin"))
    (tmp_path / "cut.bin").write_bytes((tmp_path / "whole.bin").read_bytes()[:300])
    return out


@pytest.mark.parametrize("loader, what", [
    (load_adapter_file, "IP-Adapter"),
    (lambda p: load_multicrafter_weights(p) if p.suffix == ".safetensors" else read_weight_file(p, "any"), "file"),
])
def test_each_damaged_file_is_named_with_what_is_wrong_and_the_fix(tmp_path, loader, what):
    for case, (path, message) in _corrupt_files(tmp_path).items():
        with pytest.raises(ModelFileError) as info:
            loader(path)
        text = str(info.value)
        assert str(path) in text and message in text and what in text, (case, text)
        assert "download it again" in text.lower() or "right file" in text, (case, text)


def test_a_planted_pickle_never_runs_and_is_refused_with_the_reason(tmp_path):
    marker = tmp_path / MARKER
    path = _planted(tmp_path / "adapter.bin", marker)
    with pytest.raises(ModelFileError) as info:
        load_adapter_file(path)
    assert not marker.exists()
    text = str(info.value)
    assert str(path) in text and "refused because loading such objects can run code" in text
    assert "weights_only=False" not in text  # never advise turning the protection off


def test_hps_checkpoint_with_a_planted_pickle_never_runs_and_says_how_to_convert(tmp_path):
    from multisubject.scoring.metrics import HPSv2Scorer

    marker = tmp_path / MARKER
    path = _planted(tmp_path / "HPS_v2.1_compressed.pt", marker)
    with pytest.raises(ModelFileError) as info:
        HPSv2Scorer.load(path)
    assert not marker.exists()
    assert "HPSv2 checkpoint file" in str(info.value) and "convert it once" in str(info.value).lower()


def test_the_planted_payload_does_run_when_unpickled(tmp_path):
    # guards the tests above: "marker absent" only means something if unpickling the payload creates it
    marker = tmp_path / MARKER
    pickle.loads(pickle.dumps(_Planted(marker)))
    assert marker.exists()


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.__setitem__("ip_adapter.1.to_k_ip.weight", s["ip_adapter.1.to_k_ip.weight"] * float("nan")),
     "ip_adapter.1.to_k_ip.weight: holds NaN or inf"),
    (lambda s: s.__setitem__("image_proj.latents", s["image_proj.latents"].to(torch.int32)),
     "image_proj.latents: dtype torch.int32"),
])
def test_ip_adapter_files_with_nan_or_integer_weights_are_refused(tmp_path, edit, message):
    state = adapter_state("sdxl", "plus")
    edit(state)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ModelFileError, match=message) as info:
        load_adapter_file(tmp_path / "bad.safetensors")
    assert "bad.safetensors" in str(info.value)


def test_a_file_of_another_family_is_named_with_the_fix(tmp_path):
    save_file({"diffusion_model.x.lora_A.weight": torch.zeros(2, 2)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(ValueError, match="lora.safetensors is not an IP-Adapter.*models/ipadapter"):
        load_adapter_file(tmp_path / "lora.safetensors")
    save_file(adapter_state("sdxl", "plus"), str(tmp_path / "adapter.safetensors"))
    with pytest.raises(ValueError, match="adapter.safetensors is not a MultiCrafter weight file.*LoraLoader"):
        load_multicrafter_weights(tmp_path / "adapter.safetensors")


def test_canvas_sized_mask_batches_are_bounded():
    from multisubject.attention.layout import check_mask_batch_size

    check_mask_batch_size(Layout.from_boxes(2048, 2048, [(0, 0, 1, 1)] * 64))  # the largest allowed: 1 GiB
    with pytest.raises(ValueError, match=r"64 canvas-sized masks of 16384x16384 would take 64\.0 GiB; at most 1 GiB"):
        check_mask_batch_size(Layout.from_boxes(16384, 16384, [(0, 0, 1, 1)] * 64))
