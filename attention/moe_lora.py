"""MoE-LoRA: a mixture of low-rank experts added in parallel to an FFN (MultiCrafter §4).

    u = W_g h                                   router logits, one per expert
    y = FFN(h) + strength * Σ_{i ∈ TopK(u)} p_i (α / r) B_i A_i h

Routing (``MoELoRAConfig.routing``), both computed in float32:
  * ``"renormalized"``: p = softmax over the top-k logits only (§4.1 as written; top-1 gives p = 1);
  * ``"switch"``: p = softmax over all logits, the top-k probabilities kept as they are (Switch
    Transformer, §4.2 default: with top-1 the router still receives a gradient through p_{e*}).

Experts are computed grouped: token->expert assignments are sorted by expert once, and each expert
runs one matmul pair over exactly the tokens routed to it (no loop over tokens, one pass per expert).
Parameters are kept in their own dtype/device and cast to the input's on use, so the module works
next to fp16/bf16/fp8 base weights and survives ModelPatcher offloading.

Used by the ComfyUI loader (``nodes/moe_lora.py``) and by the trainers: the parameters are ordinary
trainable ``nn.Parameter``s and ``router_logits_hooks`` exposes the router logits for a
load-balancing loss (``load_balancing_loss``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .hook_keys import MOE_LORA_MODULE

ROUTINGS = ("switch", "renormalized")


@dataclass(frozen=True)
class MoELoRAConfig:
    """Hyper-parameters of the MoE-LoRA branches (shared by every target FFN)."""

    num_experts: int = 4  # E: LoRA experts per target FFN (paper: 4)
    rank: int = 128  # r: rank of every expert (spec default 128; paper's plain LoRA uses 512)
    alpha: float = 128.0  # α: expert output is scaled by α / r (α = r -> scale 1)
    top_k: int = 1  # experts per token (paper: 1)
    routing: str = "switch"  # "switch" (softmax, keep top-k probs) or "renormalized" (softmax over top-k)
    targets: tuple[str, ...] = ()  # FFN module paths in ComfyUI's Flux naming, e.g. "double_blocks.0.img_mlp"

    def __post_init__(self) -> None:
        problems = []
        if not (isinstance(self.num_experts, int) and self.num_experts >= 1):
            problems.append(f"num_experts must be an integer >= 1, got {self.num_experts!r}")
        if not (isinstance(self.rank, int) and self.rank >= 1):
            problems.append(f"rank must be an integer >= 1, got {self.rank!r}")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            problems.append(f"alpha must be a finite number > 0, got {self.alpha!r}")
        if not (isinstance(self.top_k, int) and 1 <= self.top_k <= max(int(self.num_experts), 1)):
            problems.append(f"top_k must be an integer in [1, num_experts={self.num_experts}], got {self.top_k!r}")
        if self.routing not in ROUTINGS:
            problems.append(f"routing must be one of {ROUTINGS}, got {self.routing!r}")
        if not isinstance(self.targets, tuple) or not all(isinstance(t, str) and t for t in self.targets):
            problems.append(f"targets must be a tuple of module paths, got {self.targets!r}")
        elif len(set(self.targets)) != len(self.targets):
            problems.append(f"targets repeat a module: {list(self.targets)}")
        if problems:
            raise ValueError("invalid MoE-LoRA config: " + "; ".join(problems))

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank


def flux_ffn_targets(depth: int, stream: str = "img") -> tuple[str, ...]:
    """The FFN paths of Flux's double blocks for one stream ("img" or "txt"): the spec's default placement."""
    if stream not in ("img", "txt"):
        raise ValueError(f"stream must be 'img' or 'txt', got {stream!r}")
    return tuple(f"double_blocks.{i}.{stream}_mlp" for i in range(depth))


RouterHook = Callable[[Tensor, Tensor], None]  # (router logits (N, E) float32, top-k expert ids (N, k))


class MoELoRA(nn.Module):
    """The MoE-LoRA branch of one FFN: returns Σ p_i (α/r) B_i A_i h (without the FFN itself).

    Parameters (the weight-format tensors, see ``attention.weights``):
        router: (E, C_in)       W_g, no bias
        lora_A: (E, r, C_in)    down projections
        lora_B: (E, C_out, r)   up projections (zero at init: the branch starts at 0)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        config: MoELoRAConfig,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.config = config
        e, r = config.num_experts, config.rank
        self.router = nn.Parameter(torch.empty(e, in_features, dtype=dtype, device=device))
        self.lora_A = nn.Parameter(torch.empty(e, r, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(e, out_features, r, dtype=dtype, device=device))
        self.router_logits_hooks: list[RouterHook] = []
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Spec §4.2 init: A_i Kaiming-uniform (as PEFT), B_i = 0, W_g ~ N(0, 0.02²)."""
        with torch.no_grad():
            for a in self.lora_A:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.lora_B.zero_()
            self.router.normal_(0.0, 0.02)

    @classmethod
    def from_tensors(cls, router: Tensor, lora_A: Tensor, lora_B: Tensor, config: MoELoRAConfig) -> MoELoRA:
        """A module holding the given tensors (copied), e.g. from ``attention.weights.MoEExperts``."""
        module = cls(int(lora_A.shape[2]), int(lora_B.shape[1]), config, dtype=lora_A.dtype, device=lora_A.device)
        with torch.no_grad():
            module.router.copy_(router)
            module.lora_A.copy_(lora_A)
            module.lora_B.copy_(lora_B)
        return module

    def extra_repr(self) -> str:
        c = self.config
        return (f"{self.in_features} -> {self.out_features}, experts={c.num_experts}, rank={c.rank}, "
                f"alpha={c.alpha:g}, top_k={c.top_k}, routing={c.routing}")

    def route(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Router logits, the top-k experts of every token and their weights p.

        Shapes:
            h: (N, C_in)
            returns logits (N, E) float32, experts (N, k) long, gates (N, k) float32
        """
        logits = h.float() @ self.router.to(device=h.device, dtype=torch.float32).t()
        top_logits, experts = logits.topk(self.config.top_k, dim=-1)
        if self.config.routing == "renormalized":
            gates = top_logits.softmax(dim=-1)
        else:
            gates = logits.softmax(dim=-1).gather(-1, experts)
        for hook in self.router_logits_hooks:
            hook(logits, experts)
        return logits, experts, gates

    def forward(self, h: Tensor) -> Tensor:
        """Shapes: h (..., C_in) -> (..., C_out) in h's dtype."""
        if h.shape[-1] != self.in_features:
            raise ValueError(f"MoE-LoRA expects {self.in_features} input features, got shape {tuple(h.shape)}")
        flat = h.reshape(-1, self.in_features)  # (N, C_in)
        _, experts, gates = self.route(flat)
        k = self.config.top_k
        # one (token, expert) pair per row, sorted by expert so each expert reads a contiguous block
        pair_expert = experts.reshape(-1)  # (N*k,)
        order = torch.argsort(pair_expert, stable=True)
        pair_token = order // k  # token of each sorted pair
        pair_gate = gates.reshape(-1)[order] * self.config.scale  # (N*k,) float32
        counts = torch.bincount(pair_expert, minlength=self.config.num_experts).tolist()
        lora_A = self.lora_A.to(device=h.device, dtype=h.dtype)
        lora_B = self.lora_B.to(device=h.device, dtype=h.dtype)
        x = flat.index_select(0, pair_token)  # (N*k, C_in) grouped by expert
        parts = []
        start = 0
        for e, count in enumerate(counts):  # at most one pass per expert; empty experts are skipped
            if count:
                chunk = x[start:start + count]
                parts.append((chunk @ lora_A[e].t()) @ lora_B[e].t())  # (n_e, C_out)
            start += count
        y = torch.cat(parts) if parts else flat.new_zeros(0, self.out_features)
        y = y * pair_gate.to(y.dtype).unsqueeze(1)
        out = flat.new_zeros(flat.shape[0], self.out_features)
        out.index_add_(0, pair_token, y)
        return out.reshape(*h.shape[:-1], self.out_features)


def load_balancing_loss(logits: Tensor, experts: Tensor) -> Tensor:
    """Switch Transformer load-balancing loss ``E · Σ_e f_e · P_e`` (Fedus et al. 2021; multiply by α_b ≈ 0.01).

    f_e is the fraction of (token, slot) assignments routed to expert e, P_e the mean router
    probability of e. Equals 1 for perfectly balanced routing.

    Shapes:
        logits: (N, E) router logits (as passed to ``router_logits_hooks``)
        experts: (N, k) long, the chosen experts
        returns () float32
    """
    num_experts = logits.shape[-1]
    probs = logits.float().softmax(dim=-1).mean(0)  # (E,)
    counts = torch.bincount(experts.reshape(-1), minlength=num_experts).float()
    fraction = counts / counts.sum().clamp(min=1.0)
    return num_experts * (fraction * probs).sum()


class MoELoRAFFN(nn.Module):
    """An FFN plus its MoE-LoRA branch: ``forward(h) = base(h) + strength * moe(h)``.

    The base FFN's children are registered under their own names, so parameter paths such as
    ``img_mlp.0.weight`` still resolve to the base Linear layers (weight LoRAs and offloading keep
    working while this wrapper stands in for the FFN).
    """

    MOE_NAME = MOE_LORA_MODULE

    def __init__(self, base: nn.Module, moe: MoELoRA, strength: float = 1.0) -> None:
        super().__init__()
        names = dict(base.named_children())
        if self.MOE_NAME in names:
            raise ValueError("this FFN already carries a MoE-LoRA; apply one MoE-LoRA file per model")
        object.__setattr__(self, "_base_forward", base)  # not a child: its children are registered below
        for name, child in names.items():
            self.add_module(name, child)
        self.add_module(self.MOE_NAME, moe)
        self.strength = float(strength)

    @property
    def moe(self) -> MoELoRA:
        return getattr(self, self.MOE_NAME)

    @property
    def base(self) -> nn.Module:
        return self._base_forward

    def forward(self, h: Tensor) -> Tensor:
        out = self._base_forward(h)
        if self.strength == 0.0:
            return out
        return out + self.moe(h).to(out.dtype) * self.strength
