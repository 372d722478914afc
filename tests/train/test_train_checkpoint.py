"""Checkpoints: keep-last-K, interrupted writes ignored, RNG restored, config mismatch named, no pickle (a planted
one never runs; the converter reads old ones without running code), crash points leave complete checkpoints."""

import json
import random

import numpy as np
import pytest
import torch
from run_helpers import plant_legacy_checkpoint

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
    with pytest.raises(ValueError, match="not a complete checkpoint folder"):
        load_checkpoint(tmp_path, CONFIG)


# format: safetensors + JSON, nothing pickled


def _adam_state():
    """A real optimizer state: integer keys, tuples (betas), 0-d step tensors."""
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    optimizer = torch.optim.AdamW(params, lr=0.1, betas=(0.8, 0.9))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5)
    for _ in range(2):
        sum(p.square().sum() for p in params).backward()
        optimizer.step()
        scheduler.step()
    return params, optimizer, scheduler


def test_state_round_trips_exactly_through_safetensors_and_json(tmp_path):
    params, optimizer, scheduler = _adam_state()
    state = {"trainable": {"a.lora_A": params[0].detach()}, "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "position": {"step": 2, "epoch": 0, "batch": 2}}
    path = save_checkpoint(tmp_path, 2, state, CONFIG, keep_last=1)
    assert sorted(p.name for p in path.iterdir()) == ["COMPLETE", "config.json", "state.json", "tensors.safetensors"]
    loaded = load_checkpoint(path, CONFIG)
    assert torch.equal(loaded["trainable"]["a.lora_A"], params[0].detach()) and loaded["position"]["step"] == 2
    fresh_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fresh = torch.optim.AdamW(fresh_params, lr=0.1, betas=(0.8, 0.9))
    fresh.load_state_dict(loaded["optimizer"])  # int keys and tuples come back as they were
    for p, q in zip(params, fresh_params):
        assert torch.equal(optimizer.state[p]["exp_avg_sq"], fresh.state[q]["exp_avg_sq"])
        assert torch.equal(optimizer.state[p]["step"], fresh.state[q]["step"])
    assert fresh.param_groups[0]["betas"] == (0.8, 0.9)
    np.random.seed(5)
    expected = np.random.rand(3)
    np.random.seed(6)
    saved = save_checkpoint(tmp_path, 3, {}, CONFIG, keep_last=1)
    np.random.seed(5)
    save_checkpoint(tmp_path, 3, {}, CONFIG, keep_last=1)  # re-save the same step with numpy's state at seed 5
    set_rng_state(load_checkpoint(saved, CONFIG)["rng"])
    assert np.array_equal(np.random.rand(3), expected)


def test_state_that_would_need_a_pickle_is_refused(tmp_path):
    with pytest.raises(TypeError, match="checkpoint state /thing is a object"):
        save_checkpoint(tmp_path, 1, {"thing": object()}, CONFIG, keep_last=1)


def test_a_planted_pickle_is_never_run_by_loading_resuming_or_converting(tmp_path):
    from multisubject.train.checkpoint import convert_legacy
    from multisubject.train.config import RunConfig
    from multisubject.train.run import resume_path

    marker = tmp_path / "payload_ran"
    folder = tmp_path / "run" / "checkpoints" / "step_00000001"
    plant_legacy_checkpoint(folder, marker, CONFIG)
    with pytest.raises(ValueError, match="old pickled format.*convert-checkpoint"):
        load_checkpoint(folder, CONFIG)
    with pytest.raises(ValueError, match="old pickled format.*convert-checkpoint"):
        resume_path(RunConfig(out_dir=str(tmp_path / "run")))
    with pytest.raises(ValueError, match="holds more than tensors.*nothing in it was run"):
        convert_legacy(folder)
    assert not marker.exists()
    assert (folder / "state.pt").is_file() and list_checkpoints(tmp_path / "run") == []  # left as it was


def test_the_converter_rewrites_a_genuine_old_checkpoint_without_pickle(tmp_path):
    from multisubject.train.checkpoint import convert_legacy, rng_state

    params, optimizer, scheduler = _adam_state()
    folder = tmp_path / "checkpoints" / "step_00000002"
    folder.mkdir(parents=True)
    old = {"trainable": {"w": params[0].detach()}, "optimizer": optimizer.state_dict(),
           "scheduler": scheduler.state_dict(), "position": {"step": 2, "epoch": 0, "batch": 2}, "step": 2,
           "rng": rng_state()}
    torch.save(old, folder / "state.pt")  # what the previous version wrote
    (folder / "config.json").write_text(json.dumps(CONFIG))
    assert convert_legacy(tmp_path, upgrade_config=lambda c: {**c, "trainer": "idar"}) == [folder]
    assert not (folder / "state.pt").exists() and list_checkpoints(tmp_path) == [folder]
    loaded = load_checkpoint(folder, {**CONFIG, "trainer": "idar"})
    assert torch.equal(loaded["trainable"]["w"], params[0].detach())
    assert torch.equal(loaded["rng"]["torch"], old["rng"]["torch"])
    assert loaded["optimizer"]["state"][0]["exp_avg"].equal(old["optimizer"]["state"][0]["exp_avg"])


# crash safety


def test_a_folder_counts_only_once_its_completion_marker_is_written(tmp_path):
    path = save_checkpoint(tmp_path, 1, {}, CONFIG, keep_last=3)
    half = tmp_path / "checkpoints" / "step_00000002"  # e.g. a folder half-deleted by an older version
    half.mkdir()
    (half / "tensors.safetensors").write_bytes(b"")
    assert list_checkpoints(tmp_path) == [path]


def test_a_crash_while_overwriting_a_step_leaves_it_recoverable(tmp_path, monkeypatch):
    """Kill between moving the old step aside and renaming the new one in: the only checkpoint is not lost."""
    import multisubject.train.checkpoint as checkpoint

    save_checkpoint(tmp_path, 1, {"w": torch.ones(2)}, CONFIG, keep_last=1)
    real, calls = checkpoint.os.replace, []

    def killed_on_second_rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        real(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", killed_on_second_rename)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 1, {"w": torch.zeros(2)}, CONFIG, keep_last=1)
    monkeypatch.undo()
    assert list_checkpoints(tmp_path) == []  # the step is aside, the new one still temporary
    checkpoint.recover(tmp_path)
    found = list_checkpoints(tmp_path)
    assert [p.name for p in found] == ["step_00000001"]
    assert torch.equal(load_checkpoint(found[0], CONFIG)["w"], torch.ones(2))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000001"]  # temp folder removed


def test_pruning_and_rollback_rename_before_deleting_and_recover_removes_the_leftovers(tmp_path, monkeypatch):
    import multisubject.train.checkpoint as checkpoint

    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, {}, CONFIG, keep_last=10)
    monkeypatch.setattr(checkpoint.shutil, "rmtree", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt("killed")))
    with pytest.raises(KeyboardInterrupt):
        checkpoint.retire_after(tmp_path, 2)  # killed while deleting step 4's files
    monkeypatch.undo()
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names[0].startswith(".trash-step_00000004") and names[1:] == ["step_00000001", "step_00000002", "step_00000003"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001", "step_00000002", "step_00000003"]
    checkpoint.recover(tmp_path)
    assert [p.name for p in checkpoint.retire_after(tmp_path, 2)] == ["step_00000003"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000001", "step_00000002"]
