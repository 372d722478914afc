"""IPPO config: TOML + overrides, the reward weights table, validation messages, and which trainer a file is for."""

from __future__ import annotations

import json

import pytest

from multisubject.train.cli import load_trainer_config
from multisubject.train.config import IDARConfig
from multisubject.train.ippo_config import IPPOConfig, load_ippo_config
from multisubject.train.rewards import RewardConfig, build_rewards

TOML = """
[model]
tiny = true

[sampler]
group_size = 6
window_size = 3

[gspo]
clip_range = 3e-4
aggregation = "normalize_then_sum"

[reward.weights]
multi_id = 2
hpsv2 = 1.0
"""


def test_toml_and_overrides_build_the_config_with_a_weights_table(tmp_path):
    path = tmp_path / "ippo.toml"
    path.write_text(TOML)
    cfg = load_ippo_config(path, ["--reward.weights.hpsv2=0.5", "--optim.lr=3e-6"])
    assert cfg.sampler.rollout.group_size == 6 and cfg.sampler.window.steps(0) == (0, 1, 2)
    assert cfg.gspo.aggregation == "normalize_then_sum" and cfg.gspo.clip_range == 3e-4
    assert dict(cfg.reward.weights) == {"multi_id": 2.0, "hpsv2": 0.5}
    assert cfg.optim.lr == 3e-6 and cfg.run.out_dir == "runs/ippo"  # IPPO's own defaults
    saved = json.loads(json.dumps(cfg.to_dict()))  # goes into checkpoints and weight metadata
    assert saved["reward"]["weights"] == {"multi_id": 2.0, "hpsv2": 0.5}


def test_defaults_follow_the_paper():
    cfg = load_ippo_config(None, ["--model.tiny=true"])
    w = cfg.sampler.window
    assert (w.num_steps, w.size, w.shift_interval, w.stride) == (16, 2, 50, 1)
    assert cfg.gspo.clip_range == 1e-4 and cfg.gspo.kl_coef == 0.0 and cfg.sampler.rollout.noise_level == 0.7


@pytest.mark.parametrize(
    "override, message",
    [
        ("--sampler.rollout.group_size=1", "undefined for a group of 1"),
        ("--sampler.window.size=16", "window size"),
        ("--gspo.aggregation=mean", "aggregation must be one of"),
        ("--reward.weights={'hpsv2': 'high'}", "reward.weights.hpsv2' expects float"),
        ("--sampler.groups=3", "unknown config key(s) ['sampler.groups']"),
        ("--optim.lr=-1e-5", "optim.lr must be >= 0"),
        ("--run.fsdp=true", "run.fsdp is not supported by the IPPO trainer"),
        ("--reward.plugins=['toy']", "must look like name=package.module:function"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ValueError) as err:
        load_ippo_config(None, [override, "--model.tiny=true"])
    assert message in str(err.value)


def test_learning_rate_zero_is_a_valid_frozen_baseline():
    assert load_ippo_config(None, ["--optim.lr=0", "--model.tiny=true"]).optim.lr == 0.0


def test_a_config_with_rl_sections_is_read_as_ippo(tmp_path):
    path = tmp_path / "ippo.toml"
    path.write_text(TOML)
    assert isinstance(load_trainer_config(path, []), IPPOConfig)
    assert isinstance(load_trainer_config(None, ["--sampler.rollout.group_size=4", "--model.tiny=true"]), IPPOConfig)
    assert isinstance(load_trainer_config(None, ["--model.tiny=true"]), IDARConfig)


def test_reward_plugins_are_imported_by_name():
    rewards = build_rewards(RewardConfig(weights={"toy": 1.0}, plugins=("toy=ippo_toy:image_brightness",)))
    from ippo_toy import image_brightness

    assert rewards == {"toy": image_brightness}
    with pytest.raises(ValueError, match="cannot import no_such_module"):
        build_rewards(RewardConfig(weights={"toy": 1.0}, plugins=("toy=no_such_module:f",)))
    with pytest.raises(ValueError, match="has no function 'nope'"):
        build_rewards(RewardConfig(weights={"toy": 1.0}, plugins=("toy=ippo_toy:nope",)))


def test_reward_ranks_are_the_last_ones_and_serve_generators_round_robin():
    from multisubject.train.reward_ranks import Roles

    roles = Roles.split(world_size=8, reward_ranks=2)
    assert roles.generators == (0, 1, 2, 3, 4, 5) and roles.scorers == (6, 7)
    assert [roles.scorer_of(g) for g in roles.generators] == [6, 7, 6, 7, 6, 7]
    assert roles.clients_of(7) == [1, 3, 5]
    assert Roles.split(1, 0).scorers == ()
    with pytest.raises(ValueError, match="leaves no generating rank"):
        Roles.split(2, 2)


def test_the_trainer_key_says_which_config_and_a_missing_one_is_deprecated(tmp_path, caplog):
    legacy = tmp_path / "ippo.toml"
    legacy.write_text(TOML)  # no `trainer`, flat sampler keys of earlier versions
    with caplog.at_level("WARNING", logger="multisubject.train"):
        cfg = load_trainer_config(legacy, [])
    assert isinstance(cfg, IPPOConfig) and cfg.trainer == "ippo" and cfg.sampler.window.size == 3
    assert "has no `trainer` key" in caplog.text and "Add `trainer = \"ippo\"`" in caplog.text
    assert "'sampler.window_size' is deprecated; write it as 'sampler.window.size'" in caplog.text
    explicit = tmp_path / "explicit.toml"
    explicit.write_text('trainer = "ippo"\n[model]\ntiny = true\n')  # no IPPO section: the key alone decides
    caplog.clear()
    with caplog.at_level("WARNING", logger="multisubject.train"):
        assert isinstance(load_trainer_config(explicit, []), IPPOConfig)
    assert not caplog.text
    with pytest.raises(ValueError, match="trainer = 'ippo', but it is being loaded for the 'idar' trainer"):
        load_trainer_config(explicit, [], expected="idar")
    with pytest.raises(ValueError, match="is not a trainer"):
        load_trainer_config(explicit, ["--trainer=gan"])


def test_a_config_saved_by_an_earlier_version_is_upgraded_to_what_this_version_saves():
    from multisubject.train.cli import upgrade_config_dict

    now = load_ippo_config(None, ["--model.tiny=true", "--sampler.rollout.group_size=6"]).to_dict()
    old = {k: v for k, v in now.items() if k != "trainer"}  # no trainer key, flat sampler keys
    old["sampler"] = {"num_steps": 16, "window_size": 2, "shift_interval": 50, "stride": 1, "roll_back": False,
                      "noise_level": 0.7, "group_size": 6, "groups_per_rank": 1, "same_noise_per_group": False,
                      "guidance": 3.5, "time_shift": True}
    assert upgrade_config_dict(old) == now
    # keys added since: an earlier run took one GSPO step per batch (kept, so a resume is refused on the difference);
    # a removed key is dropped
    earlier = {**old, "gspo": {k: v for k, v in old["gspo"].items() if k not in ("minibatches", "clip_range_high")},
               "reward": {**old["reward"], "use_layout": False}}
    assert upgrade_config_dict(earlier) == {**now, "gspo": {**now["gspo"], "minibatches": 1}}
    idar = load_trainer_config(None, ["--model.tiny=true"]).to_dict()
    assert upgrade_config_dict({k: v for k, v in idar.items() if k != "trainer"}) == idar


@pytest.mark.parametrize("key, value", [("gspo.clip_range_high", "inf"), ("gspo.clip_range", "nan"),
                                        ("reward.detection_threshold", "nan")])
def test_non_finite_ippo_floats_are_refused_naming_the_key(key, value):
    with pytest.raises(ValueError, match=rf"config key '{key}' must be a finite number, got {value}"):
        load_ippo_config(None, ["--model.tiny=true", f"--{key}={value}"])


def test_the_saved_config_holds_every_gspo_and_reward_key():
    saved = load_ippo_config(None, ["--model.tiny=true", "--gspo.minibatches=2", "--gspo.clip_range_high=2e-4"]).to_dict()
    assert saved["gspo"]["minibatches"] == 2 and saved["gspo"]["clip_range_high"] == 2e-4
    assert {"detector_dir", "detection_threshold", "segmenter_dir"} <= set(saved["reward"])
    assert "use_layout" not in saved["reward"] and "linear1_qkv_only" in saved["lora"]
