"""IDAR trainer config: TOML + --key=value overrides, validation, diffs for resume."""

import pytest

from multisubject.train.config import IDARConfig, config_diff, load_config, parse_override


def _toml(tmp_path, text):
    path = tmp_path / "cfg.toml"
    path.write_text(text)
    return path


BASE = '[model]\ntiny = true\n[data]\nmanifest = "m.jsonl"\n'


def test_overrides_are_parsed_and_typed_against_the_fields(tmp_path):
    cfg = load_config(_toml(tmp_path, BASE + "[optim]\nlr = 1e-4\n"),
                      ["--optim.lr=3e-4", "--run.max_steps=7", "--lora.targets=['img_attn.qkv']", "--run.fsdp=true",
                       "--run.out_dir=/tmp/x", "--optim.betas=[0.9, 0.95]", "--optim.weight_decay=0"])
    assert isinstance(cfg, IDARConfig)
    assert cfg.optim.lr == 3e-4 and cfg.run.max_steps == 7 and cfg.run.fsdp is True and cfg.run.out_dir == "/tmp/x"
    assert cfg.lora.targets == ("img_attn.qkv",) and cfg.optim.betas == (0.9, 0.95)
    assert isinstance(cfg.optim.weight_decay, float)  # int literal accepted for a float field


def test_unknown_keys_and_wrong_types_name_the_key(tmp_path):
    path = _toml(tmp_path, BASE)
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['optim.learning_rate'\]"):
        load_config(path, ["--optim.learning_rate=1"])
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['bogus'\]"):
        load_config(path, ["--bogus.x=1"])
    with pytest.raises(ValueError, match="'run.max_steps' expects int, got str"):
        load_config(path, ["--run.max_steps=lots"])
    with pytest.raises(ValueError, match="must look like --section.key=value"):
        parse_override("--run.max_steps")
    with pytest.raises(ValueError, match="optim.schedule must be one of"):
        load_config(path, ["--optim.schedule=exp"])
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_a_real_model_needs_its_file_and_diffs_name_changed_keys(tmp_path):
    with pytest.raises(ValueError, match="model.diffusion_model is empty"):
        load_config(_toml(tmp_path, '[data]\nmanifest = "m"\n'))
    a = load_config(_toml(tmp_path, BASE)).to_dict()
    b = load_config(_toml(tmp_path, BASE), ["--lora.rank=8", "--run.max_steps=9"]).to_dict()
    assert config_diff(a, b) == ["lora.rank: 512 -> 8", "run.max_steps: 5000 -> 9"]


@pytest.mark.parametrize("section, key, value", [("data", "max_aspect", "nan"), ("loss", "idar_weight", "inf"),
                                                 ("optim", "lr", "nan"), ("optim", "betas", "[0.9, inf]")])
def test_non_finite_floats_are_refused_naming_the_key(tmp_path, section, key, value):
    path = tmp_path / "cfg.toml"
    path.write_text(f"[model]\ntiny = true\n[{section}]\n{key} = {value}\n")
    with pytest.raises(ValueError, match=rf"config key '{section}.{key}' must be a finite number"):
        load_config(path)
    if not value.startswith("["):  # the same from the command line
        with pytest.raises(ValueError, match=rf"config key '{section}.{key}' must be a finite number, got {value}"):
            load_config(None, ["--model.tiny=true", f"--{section}.{key}={value}"])


def test_trainer_sections_convert_to_the_core_adapter_configs_and_reuse_their_checks():
    cfg = load_config(None, ["--model.tiny=true", "--lora.rank=4", "--lora.double_blocks=[1]", "--moe.blocks=[0]"])
    lora, moe = cfg.lora.to_core(2, 1), cfg.moe.to_core(2)
    assert lora.alpha == 4.0 and lora.targets[0] == "double_blocks.1.img_attn.qkv" and lora.targets[-1] == "single_blocks.0.linear2"
    assert moe.targets == ("double_blocks.0.img_mlp",) and moe.alpha == 128.0
    assert load_config(None, ["--model.tiny=true", "--lora.rank=0", "--moe.enabled=false"]).lora.to_core(2, 1) is None
    with pytest.raises(ValueError, match=r"\[moe\] invalid MoE-LoRA config: top_k must be"):
        load_config(None, ["--model.tiny=true", "--moe.top_k=5"])
    with pytest.raises(ValueError, match="moe.blocks \\[3\\] do not exist"):
        load_config(None, ["--model.tiny=true", "--moe.blocks=[3]"]).moe.to_core(2)
