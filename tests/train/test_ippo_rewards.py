"""IPPO rewards: one signature, config checks with clear errors, per-reward timing."""

from __future__ import annotations

import time

import pytest
import torch

from multisubject.attention.subjects import Subject, Subjects
from multisubject.train.rewards import (
    RewardConfig,
    RewardInputs,
    build_rewards,
    check_reward_config,
    compute_rewards,
    repeat_per_image,
)


def _subjects() -> Subjects:
    return Subjects((Subject(images=torch.rand(1, 8, 8, 3), label="cat"),))


def _inputs(batch: int = 4) -> RewardInputs:
    return RewardInputs(
        images=torch.rand(batch, 16, 16, 3),
        prompts=repeat_per_image(["a cat", "a dog"], batch // 2),
        subjects=(_subjects(),) * batch,
    )


def test_rewards_share_one_signature_and_each_is_timed():
    def brightness(inputs: RewardInputs) -> torch.Tensor:
        return inputs.images.mean((1, 2, 3))

    def slow(inputs: RewardInputs) -> torch.Tensor:
        time.sleep(0.02)
        return torch.tensor([float(len(p)) for p in inputs.prompts])

    config = RewardConfig(weights={"brightness": 1.0, "slow": 0.5})
    rewards = build_rewards(config, extra={"brightness": brightness, "slow": slow})
    inputs = _inputs()
    result = compute_rewards(rewards, inputs)
    torch.testing.assert_close(result.scores["brightness"], inputs.images.mean((1, 2, 3)))
    assert result.scores["slow"].tolist() == [5.0, 5.0, 5.0, 5.0]
    assert result.seconds["slow"] >= 0.02 and set(result.seconds) == {"brightness", "slow"}


def test_zero_weight_rewards_are_not_built():
    config = RewardConfig(weights={"toy": 1.0, "hpsv2": 0.0})
    assert set(build_rewards(config, extra={"toy": lambda i: torch.zeros(len(i.prompts))})) == {"toy"}


def test_weight_for_a_reward_that_is_not_configured_is_named():
    with pytest.raises(ValueError, match=r"\['pickscore'\], which are not configured rewards.*clip_text"):
        check_reward_config(RewardConfig(weights={"pickscore": 1.0}))


def test_unset_model_paths_are_all_listed():
    with pytest.raises(ValueError) as err:
        check_reward_config(RewardConfig())
    message = str(err.value)
    assert "clip_dir" in message and "hps_checkpoint" in message and "insightface_root" in message


def test_missing_reward_model_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "HPS_v2.1_compressed.pt"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        check_reward_config(RewardConfig(weights={"hpsv2": 1.0}, hps_checkpoint=str(missing)))
    with pytest.raises(FileNotFoundError, match="clip_dir"):
        check_reward_config(RewardConfig(weights={"clip_text": 1.0}, clip_dir=str(tmp_path / "clip")))


def test_reward_returning_the_wrong_shape_or_nan_is_reported():
    inputs = _inputs()
    with pytest.raises(ValueError, match=r"'bad' returned \(3,\) scores for 4 images"):
        compute_rewards({"bad": lambda i: torch.zeros(3)}, inputs)
    with pytest.raises(ValueError, match="'nan' returned NaN"):
        compute_rewards({"nan": lambda i: torch.full((4,), float("nan"))}, inputs)


def test_reward_inputs_need_one_entry_per_image():
    with pytest.raises(ValueError, match="4 images but"):
        RewardInputs(images=torch.rand(4, 8, 8, 3), prompts=("a",) * 2, subjects=(_subjects(),) * 4)
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
        RewardInputs(images=torch.rand(4, 3, 8, 8), prompts=("a",) * 4, subjects=(_subjects(),) * 4)


def test_negative_or_all_zero_weights_are_rejected():
    with pytest.raises(ValueError, match=">= 0"):
        RewardConfig(weights={"hpsv2": -1.0})
    with pytest.raises(ValueError, match="positive weight"):
        RewardConfig(weights={"hpsv2": 0.0})


# the built-in rewards, on the scoring package's tiny fake models


def test_builtin_rewards_load_from_local_files_and_score(tmp_path):
    pytest.importorskip("insightface", reason="needs the eval extra: pip install -e '.[eval]'")
    pytest.importorskip("open_clip", reason="needs the eval extra: pip install -e '.[eval]'")
    from scoring_fakes import TINY_HPS_ARCH, built, face_canvas

    config = RewardConfig(
        weights={"multi_id": 1.0, "clip_text": 1.0, "hpsv2": 1.0},
        clip_dir=str(built("clip")),
        hps_checkpoint=str(built("hps")),
        hps_arch=TINY_HPS_ARCH,
        insightface_root=str(built("face_root")),
        face_pack="buffalo_l",
        device="cpu",
    )
    rewards = build_rewards(config)
    assert set(rewards) == {"multi_id", "clip_text", "hpsv2"}
    subjects = Subjects((Subject(images=face_canvas([(11, 10, 10)])[None], label="anna"),))
    images = torch.stack([face_canvas([(11, 6, 8)]), face_canvas([(99, 6, 8)]), face_canvas([])])
    inputs = RewardInputs(images=images, prompts=("the cat",) * 3, subjects=(subjects,) * 3)
    result = compute_rewards(rewards, inputs)
    identity = result.scores["multi_id"]
    assert identity[0] == pytest.approx(1.0, abs=1e-4) and identity[1] < 0.95 and identity[2] == 0.0
    for name in ("clip_text", "hpsv2"):
        assert result.scores[name].shape == (3,) and (result.scores[name].abs() <= 1.0 + 1e-5).all()
    assert set(result.seconds) == {"multi_id", "clip_text", "hpsv2"}
    # the clip reward is the cosine of the CLIP image and text embeddings
    from multisubject.scoring.objects import ImageEmbedder

    clip = ImageEmbedder.load(built("clip"), device="cpu")
    expected = (clip.embed_images(list(images)) * clip.embed_texts(["the cat"] * 3)).sum(-1)
    torch.testing.assert_close(result.scores["clip_text"], expected)


def test_clip_reward_refuses_a_dinov2_folder():
    pytest.importorskip("transformers")
    from scoring_fakes import built

    with pytest.raises(ValueError, match="expected CLIP"):
        build_rewards(RewardConfig(weights={"clip_text": 1.0}, clip_dir=str(built("dinov2")), device="cpu"))
