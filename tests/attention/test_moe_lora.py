"""MoE-LoRA module: routing, grouped expert compute against a per-token reference, dtypes, gradients, hooks."""

import pytest
import torch
from torch import nn

from multisubject.attention.moe_lora import (
    MoELoRA,
    MoELoRAConfig,
    MoELoRAFFN,
    flux_ffn_targets,
    load_balancing_loss,
)


def _moe(c_in=16, c_out=12, **overrides):
    torch.manual_seed(0)
    cfg = MoELoRAConfig(**{"num_experts": 4, "rank": 3, "alpha": 6.0, "top_k": 1, **overrides})
    moe = MoELoRA(c_in, c_out, cfg)
    with torch.no_grad():
        moe.lora_B.normal_()  # non-zero experts (B starts at 0)
        moe.router.normal_()
    return moe


def _reference(moe: MoELoRA, h: torch.Tensor) -> torch.Tensor:
    """Σ_i p_i (α/r) B_i A_i h computed token by token from the formula."""
    cfg = moe.config
    out = torch.zeros(h.shape[0], moe.out_features, dtype=torch.float64)
    for n, x in enumerate(h.double()):
        logits = moe.router.double() @ x
        top = logits.topk(cfg.top_k).indices
        if cfg.routing == "renormalized":
            p = logits[top].softmax(0)
        else:
            p = logits.softmax(0)[top]
        for weight, e in zip(p, top):
            out[n] += weight * cfg.scale * (moe.lora_B[e].double() @ (moe.lora_A[e].double() @ x))
    return out


@pytest.mark.parametrize("routing", ["switch", "renormalized"])
@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_grouped_experts_equal_the_per_token_formula(routing, top_k):
    moe = _moe(routing=routing, top_k=top_k)
    h = torch.randn(37, 16)
    assert torch.allclose(moe(h).double(), _reference(moe, h), atol=1e-5)


def test_top1_routing_picks_the_argmax_expert():
    moe = _moe()
    h = torch.randn(64, 16)
    _, experts, gates = moe.route(h)
    assert torch.equal(experts[:, 0], (h @ moe.router.t()).argmax(-1))
    assert torch.allclose(gates[:, 0], (h @ moe.router.t()).softmax(-1).max(-1).values)
    renorm = _moe(routing="renormalized")
    assert torch.equal(renorm.route(h)[2], torch.ones(64, 1))


def test_fresh_module_adds_exactly_zero():
    moe = MoELoRA(16, 12, MoELoRAConfig(rank=3, alpha=3.0))
    h = torch.randn(2, 5, 16)
    assert torch.equal(moe(h), torch.zeros(2, 5, 12))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_keep_their_dtype_and_stay_close(dtype):
    moe = _moe()
    h = torch.randn(2, 9, 16)
    out = moe(h.to(dtype))
    assert out.dtype == dtype and out.shape == (2, 9, 12) and torch.isfinite(out).all()
    assert torch.allclose(out.float(), moe(h), atol=0.1, rtol=0.05)


def test_batch_dims_are_kept_and_tokens_are_independent():
    moe = _moe(top_k=2)
    h = torch.randn(3, 7, 16)
    assert torch.allclose(moe(h)[1], moe(h[1]), atol=1e-6)


def test_gradients_reach_router_and_every_routed_expert():
    moe = _moe(num_experts=2, top_k=1)
    h = torch.randn(200, 16)
    moe(h).square().sum().backward()
    assert moe.router.grad.abs().sum() > 0
    assert (moe.lora_A.grad.flatten(1).abs().sum(1) > 0).all()
    assert (moe.lora_B.grad.flatten(1).abs().sum(1) > 0).all()


def test_router_hook_sees_logits_and_load_balance_loss_is_one_when_balanced():
    moe = _moe()
    seen = []
    moe.router_logits_hooks.append(lambda logits, experts: seen.append((logits, experts)))
    moe(torch.randn(10, 16))
    assert seen[0][0].shape == (10, 4) and seen[0][1].shape == (10, 1)
    uniform = torch.zeros(8, 4)
    assert torch.isclose(load_balancing_loss(uniform, torch.arange(8).remainder(4)[:, None]), torch.tensor(1.0))
    collapsed = torch.tensor([[5.0, 0, 0, 0]]).repeat(8, 1)
    assert load_balancing_loss(collapsed, torch.zeros(8, 1, dtype=torch.long)) > 2.0


def test_wrapper_adds_strength_times_branch_and_exposes_base_parameters():
    base = nn.Sequential(nn.Linear(16, 32), nn.GELU(approximate="tanh"), nn.Linear(32, 12))
    moe = _moe()
    h = torch.randn(4, 16)
    wrapped = MoELoRAFFN(base, moe, strength=0.5)
    assert torch.allclose(wrapped(h), base(h) + 0.5 * moe(h), atol=1e-6)
    assert wrapped.get_submodule("0") is base[0] and "0.weight" in dict(wrapped.named_parameters())
    assert torch.equal(MoELoRAFFN(base, moe, strength=0.0)(h), base(h))
    with pytest.raises(ValueError, match="already carries a MoE-LoRA"):
        MoELoRAFFN(wrapped, moe)


@pytest.mark.parametrize("bad, message", [
    ({"num_experts": 0}, "num_experts"), ({"rank": 0}, "rank"), ({"top_k": 5}, "top_k"),
    ({"routing": "hash"}, "routing"), ({"alpha": float("nan")}, "alpha"), ({"targets": ("a", "a")}, "repeat"),
])
def test_bad_config_names_the_field(bad, message):
    with pytest.raises(ValueError, match=message):
        MoELoRAConfig(**bad)


def test_default_flux_targets_are_the_double_block_image_ffns():
    assert flux_ffn_targets(2) == ("double_blocks.0.img_mlp", "double_blocks.1.img_mlp")
