"""IDAR trainer on ComfyUI's real Flux class at tiny size: the efficient IDAR map against the full attention
matrix, CLI end to end, export -> MultiCrafter loader node, 2-process torchrun (gloo; DDP-style and FSDP) vs 1
process, SIGKILL +
resume, SIGTERM checkpoint, and "it learns"."""

import json
import subprocess
import sys

import pytest
import torch
from idar_synthetic import make_dataset, write_config
from run_helpers import (
    assert_weights_close,
    load_weights,
    loader_node_predictions,
    plant_legacy_checkpoint,
    stop_after_checkpoint,
    subprocess_env,
)

from multisubject.__main__ import main as cli
from multisubject.attention.weights import load_multicrafter_weights
from multisubject.train.checkpoint import list_checkpoints
from multisubject.train.config import LoRAConfig, ModelConfig, MoEConfig, load_config

# tiny and fast: hidden 32, 1 double + 1 single block, 64 px images (4x4 tokens), 32 px references (2x2 tokens)
FAST = ["--model.tiny_hidden=32", "--model.tiny_depth=1", "--data.resolution=64", "--data.ref_size=32",
        "--moe.rank=2", "--lora.rank=2", "--run.log_every=0"]


PORT_RACE = ("EADDRINUSE", "Address already in use", "address already in use")


def _env():
    return subprocess_env()


def _run(*args, check=True, **kwargs):
    proc = subprocess.run([sys.executable, "-m", "multisubject", *args], env=_env(), capture_output=True, text=True,
                          timeout=300, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A cached 64 px dataset and its config (8 samples, 2 subjects each)."""
    root = tmp_path_factory.mktemp("idar")
    make_dataset(root / "data", num_samples=8, size=64, ref_size=32)
    assert cli(["data", "build", str(root / "data")]) == 0
    config = write_config(root / "cfg.toml", root / "data" / "manifest.jsonl", root / "run")
    assert cli(["data", "cache", "--config", str(config), *FAST]) == 0
    return root, config




# the backend


def test_idar_map_from_the_hook_equals_the_full_attention_matrix_of_the_same_forward(comfy):
    from multisubject.attention.families import TokenLayout
    from multisubject.train.comfy_backend import FluxBackend, FluxInputs, load_flux

    flux = load_flux(ModelConfig(tiny=True)).model.diffusion_model
    backend = FluxBackend(flux, LoRAConfig(rank=2).to_core(2, 1), MoEConfig(rank=2).to_core(2))
    gen = torch.Generator().manual_seed(0)
    inputs = FluxInputs(torch.randn(2, 16, 12, 10, generator=gen), torch.tensor([0.3, 0.8]),
                        torch.randn(2, 6, 32, generator=gen), torch.randn(2, 32, generator=gen),
                        [torch.randn(2, 16, 4, 6, generator=gen), torch.randn(2, 16, 6, 4, generator=gen)])
    v, maps = backend(inputs, idar_blocks=[0, 1])
    _, image_to_reference = backend(inputs, idar_blocks=[0, 1], idar_direction="image_to_reference")
    # record every double block's q/k with a plain attention override and build the full (N, N) matrix
    recorded = []

    def record(func, q, k, v, heads, **kwargs):
        recorded.append((q.detach(), k.detach()))
        return func(q, k, v, heads, **kwargs)

    with torch.no_grad():
        v2 = flux(inputs.x_t, inputs.t, inputs.context, y=inputs.pooled, guidance=torch.ones(2),
                  ref_latents=inputs.refs, ref_latents_method="uxo",
                  transformer_options={"optimized_attention_override": record})
    assert torch.allclose(v, v2, atol=1e-5)  # the hooks do not change the prediction
    layout = TokenLayout.from_latents(6, (12, 10), [(4, 6), (6, 4)])
    img0, img1 = layout.image_span
    for block, (q, k) in enumerate(recorded[:2]):
        full = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1)  # (B, H, N, N)
        expected = torch.stack([full[:, :, s:e, img0:img1].mean((1, 2)) for s, e in layout.reference_spans], 1)
        assert torch.allclose(maps[block], expected, atol=1e-6)
        # loss.idar_direction = image_to_reference: each image row's attention mass on subject i's reference keys
        expected = torch.stack([full[:, :, img0:img1, s:e].sum(-1).mean(1) for s, e in layout.reference_spans], 1)
        assert torch.allclose(image_to_reference[block], expected, atol=1e-6)


def test_switch_balance_loss_reaches_the_routers_and_gradient_checkpointing_changes_nothing(comfy):
    from multisubject.train.comfy_backend import FluxBackend, FluxInputs, load_flux
    from multisubject.train.losses import balance_loss

    grads = []
    for checkpointing in (False, True):
        flux = load_flux(ModelConfig(tiny=True)).model.diffusion_model
        torch.manual_seed(0)
        backend = FluxBackend(flux, LoRAConfig(rank=2).to_core(2, 1), MoEConfig(rank=2).to_core(2),
                              grad_checkpointing=checkpointing)
        gen = torch.Generator().manual_seed(1)
        inputs = FluxInputs(torch.randn(1, 16, 8, 8, generator=gen), torch.tensor([0.5]), torch.randn(1, 4, 32, generator=gen),
                            torch.randn(1, 32, generator=gen), [torch.randn(1, 16, 4, 4, generator=gen)])
        v, maps = backend(inputs, idar_blocks=[0, 1], capture_checkpoint=checkpointing)
        assert len(backend.routing) == 2  # one (logits, experts) per MoE layer
        balance = balance_loss(backend.routing)
        (v.square().mean() + torch.stack(maps).sum() + balance).backward()
        grads.append({n: p.grad.clone() for n, p in backend.trainable_parameters()})
        routers = [g for n, g in grads[-1].items() if n.endswith("router")]
        assert routers and all(g.abs().sum() > 0 for g in routers)
    assert_weights_close(grads[0], grads[1], atol=1e-5)


# end to end


def test_cli_trains_exports_and_the_loader_node_reproduces_the_trained_model(comfy, small, tmp_path):

    from multisubject.train.backend import load_run

    root, config = small
    out = tmp_path / "run"
    run_options = [f"--run.out_dir={out}", "--optim.lr=3e-2", "--run.precision=bf16", "--run.grad_checkpointing=true"]
    assert cli(["train", "idar", "--config", str(config), *FAST, *run_options, "--run.max_steps=3",
                "--run.sample_every=3"]) == 0
    exported = out / "multicrafter_idar.safetensors"
    weights = load_multicrafter_weights(exported)
    assert weights.train_config["run"]["max_steps"] == 3 and weights.train_config["lora"]["rank"] == 2
    assert "double_blocks.0.img_attn.qkv" in weights.lora and list(weights.moe) == ["double_blocks.0.img_mlp"]
    assert (out / "samples" / "step_00000003.png").is_file() and list((out / "tensorboard").iterdir())
    # the loader node on a fresh copy of the same base model gives the trained backend's prediction
    cfg = load_config(config, [*FAST, *run_options])
    trained = load_run(cfg)
    base, patched, mine = loader_node_predictions(comfy, exported, cfg.model, cfg.run.seed, trained)
    assert not torch.allclose(patched, base, atol=1e-4)  # the file changes the model
    assert torch.allclose(patched, mine, atol=1e-5)  # ... into exactly what was trained


def test_uno_single_block_targets_change_only_qkv_and_round_trip_through_export_and_the_loader(comfy, small, tmp_path):
    from multisubject.train.backend import build_backend, export_weights
    from multisubject.train.ippo_flux import load_stage1_weights

    def build(cfg):
        return build_backend(cfg.model, cfg.lora, cfg.moe, cfg.run, torch.device("cpu"))

    _, config = small
    cfg = load_config(config, [*FAST, "--lora.linear1_qkv_only=true", f"--run.out_dir={tmp_path}"])
    backend = build(cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for module in backend.loras.values():
            module.lora_B.normal_(0, 0.1)
    linear1 = backend.loras["single_blocks.0.linear1"]
    hidden = backend.flux.hidden_size
    assert linear1.lora_B.shape == (3 * hidden, 2)  # UNO: q/k/v outputs only, not the MLP input
    x = torch.randn(5, hidden)
    with torch.no_grad():
        change = linear1(x) - linear1.base(x)
    assert change[:, :3 * hidden].abs().max() > 0 and change[:, 3 * hidden:].abs().max() == 0
    exported = export_weights(backend, cfg.to_dict(), tmp_path / "uno_targets.safetensors")
    stored = load_multicrafter_weights(exported).lora["single_blocks.0.linear1"].lora_B
    assert stored.shape == (linear1.out_features, 2) and stored[3 * hidden:].abs().max() == 0
    # the loader node (ComfyUI's stock LoRA path for the attention LoRA) gives the backend's prediction
    base, patched, mine = loader_node_predictions(comfy, exported, cfg.model, cfg.run.seed, backend)
    assert not torch.allclose(patched, base, atol=1e-4) and torch.allclose(patched, mine, atol=1e-5)
    # and IPPO's stage-1 import restores the same adapters, for a qkv-only config and for a whole-linear1 one
    again = build(cfg)
    load_stage1_weights(again, exported)
    assert torch.equal(again.loras["single_blocks.0.linear1"].lora_B, linear1.lora_B)
    whole = build(load_config(config, [*FAST]))
    load_stage1_weights(whole, exported)
    assert torch.equal(whole.loras["single_blocks.0.linear1"].lora_B, stored)
    with torch.no_grad():
        whole.loras["single_blocks.0.linear1"].lora_B.normal_()
    full_file = export_weights(whole, load_config(config, [*FAST]).to_dict(), tmp_path / "whole.safetensors")
    with pytest.raises(ValueError, match="set lora.linear1_qkv_only = false to load it"):
        load_stage1_weights(again, full_file)


def test_two_process_torchrun_ddp_and_fsdp_equal_one_process_with_the_same_global_batch(small, tmp_path):
    root, config = small
    common = ["--config", str(config), *FAST, "--run.max_steps=3", "--run.save_every=0", "--moe.balance_weight=0"]
    _run("train", "idar", *common, f"--run.out_dir={tmp_path / 'one'}", "--optim.micro_batch=2")
    for name, extra in (("ddp", []), ("fsdp", ["--run.fsdp=true"])):
        for attempt in range(2):  # one retry, only for a lost port race with another torchrun on this machine
            proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                   "-m", "multisubject", "train", "idar", *common, f"--run.out_dir={tmp_path / name}",
                                   "--optim.micro_batch=1", *extra], env=_env(), capture_output=True, text=True,
                                  timeout=300)
            if proc.returncode == 0 or not any(s in proc.stderr for s in PORT_RACE):
                break
        assert proc.returncode == 0, proc.stderr[-3000:]
    one, ddp, fsdp = (load_weights(tmp_path / d / "multicrafter_idar.safetensors") for d in ("one", "ddp", "fsdp"))
    assert_weights_close(one, ddp, atol=1e-5)
    assert_weights_close(one, fsdp, atol=1e-5)
    assert max(float(v.abs().max()) for k, v in one.items() if "lora_B" in k) > 1e-3  # it did train


def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_weights(small, tmp_path):
    root, config = small
    common = ["train", "idar", "--config", str(config), *FAST, "--run.max_steps=30", "--run.save_every=1",
              "--run.keep_last=2"]
    _run(*common, f"--run.out_dir={tmp_path / 'straight'}")
    out = tmp_path / "killed"
    stop_after_checkpoint([*common, f"--run.out_dir={out}"], out, 4, _env())
    assert not (out / "multicrafter_idar.safetensors").exists(), "the run finished before it could be killed"
    assert _run(*common, f"--run.out_dir={out}").returncode == 0  # run.resume = auto
    assert_weights_close(load_weights(tmp_path / "straight" / "multicrafter_idar.safetensors"),
                         load_weights(out / "multicrafter_idar.safetensors"), atol=0.0)


def test_sigterm_saves_a_checkpoint_at_the_current_step_and_resume_refuses_a_changed_config(small, tmp_path):
    root, config = small
    out = tmp_path / "run"
    common = ["train", "idar", "--config", str(config), *FAST, f"--run.out_dir={out}"]
    args = [*common, "--run.max_steps=100000", "--run.save_every=3", "--run.keep_last=10"]
    assert stop_after_checkpoint(args, out, 3, _env(), sig="SIGTERM", settle=0.3) == 0
    state = json.loads((list_checkpoints(out)[-1] / "state.json").read_text())
    assert state["step"] >= 3 and state["position"]["step"] == state["step"]  # saved at the step it stopped
    assert not (out / "multicrafter_idar.safetensors").exists()
    changed = _run(*common, "--run.max_steps=100000", "--lora.rank=3", check=False)
    assert changed.returncode == 1 and "lora.rank: 2 -> 3" in changed.stderr


def test_bad_inputs_stop_training_with_a_clear_message(small, tmp_path, capsys):
    root, config = small
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"image": "gone.png", "caption": "x", "references": ["r.png"], "masks": []}) + "\n")
    cases = {
        f"--data.manifest={manifest}": ["line 1: 1 reference(s) but 0 mask(s)", "line 1: image file 'gone.png' not found"],
        "--optim.lrate=1": ["unknown config key(s) ['optim.lrate']"],
        f"--model.comfyui={tmp_path}": ["ComfyUI not found", "set model.comfyui to your ComfyUI folder"],
    }
    for override, messages in cases.items():
        assert cli(["train", "idar", "--config", str(config), override, f"--run.out_dir={tmp_path / 'r'}"]) == 1
        err = capsys.readouterr().err
        assert all(m in err for m in messages), err
    assert cli(["train", "idar", "--config", str(config), "--model.tiny=false", f"--run.out_dir={tmp_path / 'r'}",
                f"--model.diffusion_model={tmp_path / 'flux.safetensors'}"]) == 1
    assert "flux.safetensors does not exist" in capsys.readouterr().err
    assert cli(["data", "cache", "--config", str(config), "--model.tiny=false", "--model.diffusion_model=f",
                f"--model.vae={tmp_path / 'ae.safetensors'}"]) == 1
    err = capsys.readouterr().err
    assert "needs the VAE and both text encoders" in err and "ae.safetensors" in err and "model.t5 = ''" in err


# it learns


def test_idar_raises_attention_mask_dice_well_above_the_flow_only_run(comfy, tmp_path):
    """200 steps on 16 synthetic samples (coloured squares/circles, 64 px, hidden 32, 1 double block, LoRA rank 4,
    no MoE, lr 1e-2, batch 4). Measured when written: Dice 0.68 with lambda = 1 vs 0.22 with lambda = 0
    (0.19 before training)."""
    from idar_synthetic import evaluate_dice

    from multisubject.train.backend import load_run
    from multisubject.train.cache import LatentCache, file_hash
    from multisubject.train.idar import train_idar

    make_dataset(tmp_path / "data", num_samples=16, size=64, ref_size=32)
    assert cli(["data", "build", str(tmp_path / "data")]) == 0
    manifest = tmp_path / "data" / "manifest.jsonl"
    common = [f"--data.manifest={manifest}", *FAST, "--model.tiny=true", "--lora.rank=4", "--moe.enabled=false",
              "--optim.lr=1e-2", "--optim.warmup_steps=0", "--optim.micro_batch=4", "--run.precision=fp32",
              "--run.grad_checkpointing=false", "--run.save_every=0", "--run.progress=false", "--run.max_steps=200",
              "--data.text_dropout=0.0"]
    assert cli(["data", "cache", *common]) == 0
    cache = LatentCache(tmp_path / "data" / "cache", file_hash(manifest))
    dice, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead
    try:
        for lam in (1.0, 0.0):
            cfg = load_config(None, [*common, f"--loss.idar_weight={lam}", f"--run.out_dir={tmp_path / str(lam)}"])
            train_idar(cfg)
            dice[lam] = evaluate_dice(load_run(cfg), cache, cfg)
    finally:
        torch.set_num_threads(threads)
    print(f"attention-vs-mask Dice after 200 steps: lambda=1: {dice[1.0]:.3f}, lambda=0: {dice[0.0]:.3f}")
    assert dice[1.0] > 0.5 and dice[1.0] > dice[0.0] + 0.25, dice


# loop details (in-process, tiny)


def _inprocess_cfg(config, out, *extra):
    return load_config(config, [*FAST, f"--run.out_dir={out}", "--run.save_every=0", "--moe.balance_weight=0", *extra])


def test_gradient_accumulation_equals_the_larger_micro_batch_and_tensorboard_gets_the_scalars(small, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from multisubject.train.idar import train_idar

    root, config = small
    big = train_idar(_inprocess_cfg(config, tmp_path / "big", "--optim.micro_batch=2", "--run.max_steps=2",
                                    "--run.log_every=1"))
    accum = train_idar(_inprocess_cfg(config, tmp_path / "acc", "--optim.micro_batch=1", "--optim.grad_accum=2",
                                      "--run.max_steps=2"))
    assert_weights_close(load_weights(big), load_weights(accum), atol=1e-6)
    events = EventAccumulator(str(tmp_path / "big" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/flow", "train/idar", "train/balance", "train/lr", "train/grad_norm", "train/step_time",
            "dice/subject_0", "dice/subject_1", "router_load/expert_0", "router_load/expert_1"} <= tags


def test_a_non_finite_loss_stops_training_naming_the_step_and_the_batch(small, tmp_path, monkeypatch):
    import multisubject.train.idar as idar

    root, config = small
    calls = {"n": 0}
    real = idar.flow_loss

    def poisoned(v, noise, x0):
        calls["n"] += 1
        loss = real(v, noise, x0)
        return loss * float("nan") if calls["n"] == 2 else loss

    monkeypatch.setattr(idar, "flow_loss", poisoned)
    with pytest.raises(RuntimeError, match=r"non-finite loss at step 2 \(.*'flow': nan.*\) on the batch of manifest "
                                           r"lines \[\d+, \d+\]"):
        idar.train_idar(_inprocess_cfg(config, tmp_path / "nan", "--optim.micro_batch=2", "--run.max_steps=3"))


# no pickle, crash points


def test_a_planted_pickle_is_never_run_by_resume_export_or_convert(small, tmp_path, capsys):
    root, config = small
    out, marker = tmp_path / "run", tmp_path / "payload_ran"
    folder = out / "checkpoints" / "step_00000001"
    plant_legacy_checkpoint(folder, marker, load_config(config, FAST).to_dict())
    common = ["--config", str(config), *FAST, f"--run.out_dir={out}"]
    for args, message in (
        (["train", "idar", *common, f"--run.resume={folder}"], "old pickled format"),
        (["train", "idar", *common], "convert them once with"),  # run.resume = auto
        (["train", "export", *common, "--checkpoint", str(folder), "--out", str(tmp_path / "x.safetensors")],
         "old pickled format"),
        (["train", "export", "--checkpoint", str(folder), "--out", str(tmp_path / "x.safetensors")], "old pickled format"),
        (["train", "convert-checkpoint", str(out)], "nothing in it was run"),
    ):
        assert cli(args) == 1, args
        err = capsys.readouterr().err
        assert message in err, err
    assert not marker.exists()


def _weights_after(cfg) -> dict:
    from multisubject.train.idar import train_idar

    return load_weights(train_idar(cfg))


def test_kills_at_the_rollback_points_resume_to_the_uninterrupted_weights(small, tmp_path, monkeypatch):
    """A run resumed from an older checkpoint of its out_dir (a rollback) retires the newer ones; a kill (here an
    exception at the same place) while it renames or deletes them, or while pruning, leaves only complete
    checkpoints, and re-running the same command ends with the weights of a run never interrupted."""
    import shutil

    import multisubject.train.checkpoint as checkpoint

    root, config = small
    steps = ["--run.max_steps=6", "--run.save_every=1", "--optim.micro_batch=2"]
    straight = _weights_after(_inprocess_cfg(config, tmp_path / "straight", *steps, "--run.keep_last=10"))
    real_replace, real_rmtree = checkpoint.os.replace, shutil.rmtree

    def kill_at(function: str, call: int):
        calls = []

        def killed(path, *args, **kwargs):
            calls.append(path)
            if len(calls) == call:
                raise KeyboardInterrupt(f"killed in {function}")
            return (real_replace if function == "replace" else real_rmtree)(path, *args, **kwargs)

        monkeypatch.setattr(checkpoint.os if function == "replace" else checkpoint.shutil, function, killed)

    cases = {"while renaming the newer checkpoints out": ("replace", 2),
             "while deleting a renamed one": ("rmtree", 1),
             "while pruning after the second new save": ("rmtree", 5)}
    for name, (function, call) in cases.items():
        out = tmp_path / function / str(call)
        _weights_after(_inprocess_cfg(config, out, *steps, "--run.keep_last=10"))  # steps 1..6 on disk
        rollback = _inprocess_cfg(config, out, *steps, "--run.keep_last=3",
                                  f"--run.resume={out / 'checkpoints' / 'step_00000002'}")
        kill_at(function, call)
        with pytest.raises(KeyboardInterrupt):
            _weights_after(rollback)
        monkeypatch.undo()
        for path in list_checkpoints(out):  # whatever is listed is complete
            checkpoint.read_state(path)
        assert_weights_close(straight, _weights_after(rollback), atol=0.0)  # the same command again
        assert [p.name for p in list_checkpoints(out)] == ["step_00000004", "step_00000005", "step_00000006"], name
        assert sorted(p.name for p in (out / "checkpoints").iterdir())[0].startswith("step_"), name  # no leftovers
