"""Dataset manifest, `data validate`/`data build`, buckets, content-hash cache, per-rank batch order."""

import json

import pytest
import torch
from idar_synthetic import make_dataset
from PIL import Image

from multisubject.train.cache import LatentCache, TinyEncoder, build_cache, file_hash
from multisubject.train.config import DataConfig
from multisubject.train.data import (
    assign_bucket,
    build_manifest,
    epoch_batches,
    make_buckets,
    mask_tokens,
    rank_slice,
    read_training_manifest,
    validate_dataset,
)


@pytest.fixture()
def dataset(tmp_path):
    make_dataset(tmp_path / "data", num_samples=4)
    return build_manifest(tmp_path / "data")


def test_build_writes_one_row_per_sample_folder_with_labels(dataset):
    rows = read_training_manifest(dataset)
    assert len(rows) == 4 and all(r.num_subjects == 2 and len(r.labels) == 2 for r in rows)
    assert rows[0].labels[0].startswith("a ") and rows[0].image.name == "target.png"


def test_manifest_problems_are_reported_with_line_numbers_before_training(dataset):
    lines = dataset.read_text().splitlines()
    broken = json.loads(lines[1])
    broken["references"][0] = "nowhere.png"
    short = json.loads(lines[2])
    short["masks"] = short["masks"][:1]
    dataset.write_text("\n".join([lines[0], json.dumps(broken), json.dumps(short), "{not json"]) + "\n")
    with pytest.raises(ValueError) as info:
        read_training_manifest(dataset)
    text = str(info.value)
    assert "3 problem(s)" in text
    assert "line 2: references[0] file 'nowhere.png' not found" in text
    assert "line 3: 2 reference(s) but 1 mask(s)" in text
    assert "line 4: not valid JSON" in text


def test_validate_summarises_flags_overlap_and_writes_a_preview(dataset, tmp_path):
    folder = dataset.parent / "sample_000"
    Image.open(folder / "mask_0.png").save(folder / "mask_1.png")  # both subjects on the same pixels
    Image.new("L", (128, 128), 0).save(dataset.parent / "sample_001" / "mask_0.png")
    report = validate_dataset(dataset, resolution=128, preview=tmp_path / "p.png", min_side=64)
    assert report.num_samples == 4 and report.subjects_histogram == {2: 4}
    assert any("line 1: masks[0] and masks[1] overlap (IoU 1.00" in w for w in report.warnings)
    assert report.problems == ("line 2: masks[0] is empty (all black)",)
    preview = Image.open(tmp_path / "p.png")
    assert preview.height >= 4 * 192 and preview.width > 192


def test_buckets_keep_area_and_aspect_and_masks_land_on_the_token_grid():
    buckets = make_buckets(512, 2.0)
    assert (512, 512) in buckets and all(w % 16 == 0 and h % 16 == 0 for w, h in buckets)
    assert all(0.85 < w * h / 512**2 < 1.15 and max(w, h) / min(w, h) <= 2.0 for w, h in buckets)
    assert assign_bucket(1920, 1080, buckets)[0] > assign_bucket(1920, 1080, buckets)[1]
    mask = torch.zeros(64, 96)
    mask[:, :48] = 1  # left half
    tokens = mask_tokens(mask, 8, 12).view(4, 6)
    assert tokens[:, :3].all() and not tokens[:, 3:].any()
    assert mask_tokens(torch.zeros(64, 96), 8, 12).sum() == 0  # empty masks stay empty


def test_cache_is_keyed_by_content_reuses_entries_and_refuses_a_stale_manifest(dataset):
    cfg = DataConfig(manifest=str(dataset), resolution=128, ref_size=64)
    rows = read_training_manifest(dataset)
    encoder = TinyEncoder(32, 32)
    cache_dir = dataset.parent / "cache"
    added, reused = build_cache(rows, file_hash(dataset), cfg, encoder, cache_dir)
    refs = {file_hash(r) for row in rows for r in row.references}  # identical reference files are encoded once
    captions = {row.caption for row in rows}
    assert len(refs) < 8 and added == 4 + len(refs) + 4 + len(captions) + 1 and reused == 0  # + empty caption
    assert build_cache(rows, file_hash(dataset), cfg, encoder, cache_dir) == (0, added)
    cache = LatentCache(cache_dir, file_hash(dataset))
    keys = cache.samples[0]
    assert cache.get(keys.target).shape == (16, 16, 16) and cache.get(keys.references[1]).shape == (16, 8, 8)
    assert cache.get(keys.masks).shape == (2, 64)
    context, pooled = cache.text(keys.text)
    assert context.shape == (8, 32) and pooled.shape == (32,)
    dataset.write_text(dataset.read_text() + "\n# edited\n")
    with pytest.raises(ValueError, match="built from a different manifest"):
        LatentCache(cache_dir, file_hash(dataset))


def test_batch_order_is_reproducible_grouped_and_split_across_ranks():
    groups = {("a", 2): list(range(10)), ("b", 3): list(range(10, 16))}
    first = epoch_batches(groups, 4, seed=1, epoch=0)
    assert first == epoch_batches(groups, 4, seed=1, epoch=0)
    assert first != epoch_batches(groups, 4, seed=1, epoch=1)
    assert len(first) == 2 + 1  # remainders dropped
    for batch in first:
        assert len({("a" if i < 10 else "b") for i in batch}) == 1  # one group per batch
    assert rank_slice([5, 6, 7, 8], 1, 2) == [7, 8]


# bad files: refused by validate, cache and training alike, naming the file


def _config_args(dataset, tmp_path):
    return [f"--data.manifest={dataset}", "--model.tiny=true", "--data.resolution=128", "--data.ref_size=64",
            f"--run.out_dir={tmp_path / 'run'}"]


def _refused_everywhere(dataset, tmp_path, capsys, *messages):
    from multisubject.__main__ import main as cli
    from multisubject.train.config import load_config
    from multisubject.train.idar import train_idar

    with pytest.raises(ValueError) as info:
        validate_dataset(dataset, resolution=128)
    assert all(m in str(info.value) for m in messages), str(info.value)
    assert cli(["data", "validate", str(dataset)]) == 1
    assert cli(["data", "cache", *_config_args(dataset, tmp_path)]) == 1
    err = capsys.readouterr().err
    assert all(m in err for m in messages), err
    with pytest.raises(ValueError) as info:  # training refuses before it loads a model
        train_idar(load_config(None, _config_args(dataset, tmp_path)))
    assert all(m in str(info.value) for m in messages), str(info.value)


def test_a_mask_of_another_size_than_its_target_is_refused(dataset, tmp_path, capsys):
    Image.new("L", (64, 64), 255).save(dataset.parent / "sample_001" / "mask_0.png")
    _refused_everywhere(dataset, tmp_path, capsys, "line 2: masks[0] is 64x64, target is 128x128",
                        "masks must be the target's size")


def test_an_unreadable_image_is_named(dataset, tmp_path, capsys):
    (dataset.parent / "sample_002" / "ref_1.png").write_bytes(b"not a png at all")
    _refused_everywhere(dataset, tmp_path, capsys, "line 3: references[1]: image file", "ref_1.png cannot be read")


def test_a_truncated_image_stops_data_cache_naming_the_file(dataset, tmp_path, capsys):
    from multisubject.__main__ import main as cli

    target = dataset.parent / "sample_003" / "target.png"
    target.write_bytes(target.read_bytes()[:200])  # the header is intact, the pixels are not
    assert cli(["data", "cache", *_config_args(dataset, tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "sample_003/target.png cannot be read" in err and "replace the file" in err, err


def test_a_manifest_that_is_not_utf8_is_named(dataset, tmp_path, capsys):
    from multisubject.__main__ import main as cli

    dataset.write_bytes(dataset.read_bytes().replace(b"a ", "\u00e9 ".encode("latin-1"), 1))
    with pytest.raises(ValueError, match="manifest .*manifest.jsonl is not UTF-8 text .*save it as UTF-8"):
        read_training_manifest(dataset)
    assert cli(["data", "cache", *_config_args(dataset, tmp_path)]) == 1
    assert "is not UTF-8 text" in capsys.readouterr().err
