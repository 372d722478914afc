"""Atomic checkpoints: keep-last-K, interrupted writes ignored, RNG restored, config mismatch named."""

import random

import pytest
import torch

from multisubject.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint, set_rng_state

CONFIG = {"lora": {"rank": 4}, "run": {"max_steps": 10}}


def test_keeps_the_last_k_and_ignores_half_written_folders(tmp_path):
    for step in range(1, 5):
        save_checkpoint(tmp_path, step, {"w": torch.full((2,), float(step))}, CONFIG, keep_last=2)
    (tmp_path / "checkpoints" / ".tmp-step_00000009-123").mkdir()  # a write killed before its rename
    found = list_checkpoints(tmp_path)
    assert [p.name for p in found] == ["step_00000003", "step_00000004"]
    state = load_checkpoint(found[-1], CONFIG)
    assert state["step"] == 4 and torch.equal(state["w"], torch.full((2,), 4.0))


def test_rng_state_round_trips(tmp_path):
    torch.manual_seed(3)
    random.seed(3)
    path = save_checkpoint(tmp_path, 1, {}, CONFIG, keep_last=1)
    expected = (torch.rand(3), random.random())
    torch.manual_seed(99)
    random.seed(99)
    set_rng_state(load_checkpoint(path, CONFIG)["rng"])
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]


def test_resuming_with_a_different_config_names_the_keys(tmp_path):
    path = save_checkpoint(tmp_path, 1, {}, CONFIG, keep_last=1)
    assert load_checkpoint(path, {"lora": {"rank": 4}, "run": {"max_steps": 50}})["step"] == 1  # run length may grow
    with pytest.raises(ValueError, match=r"differing keys:\n  lora.rank: 4 -> 8"):
        load_checkpoint(path, {"lora": {"rank": 8}, "run": {"max_steps": 10}})
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        load_checkpoint(tmp_path, CONFIG)
