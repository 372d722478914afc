"""The model backend: FLUX built and run through ComfyUI's own code (``comfy.ldm.flux``), so training and
inference execute the same model. This is the only module in ``train/`` that imports ComfyUI.

What it adds on top of ComfyUI's Flux, all through ComfyUI's own extension points (comfyui.md §3-§4):
  * references are passed as ``ref_latents`` with ``ref_latents_method="uxo"`` (UNO's diagonal UnoPE ids);
  * ``patches_replace["dit"]`` tags the supervised double blocks, and ``optimized_attention_override`` reads the
    post-RoPE q/k of exactly those attention calls to compute the IDAR map (``losses.reference_attention_map``);
  * gradient checkpointing wraps every block through the same ``patches_replace`` hook.
"""

from __future__ import annotations

import hashlib
import importlib
import sys
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..attention.families import FLUX, TokenLayout
from ..attention.hook_keys import IDAR_BLOCK
from ..attention.moe_lora import MoELoRA, MoELoRAConfig, MoELoRAFFN
from ..attention.weights import LoRAConfig
from .config import ModelConfig
from .lora import LoRALinear, get_submodule_parent, inject_lora
from .losses import supervised_maps


def import_comfy(comfyui: str = "", cpu: bool | None = None):
    """Put the user's ComfyUI folder on ``sys.path`` and import ``comfy`` headless. Returns the ``comfy`` module."""
    from ..comfyui_locator import comfyui_candidates  # stdlib-only

    places = [Path(comfyui).expanduser()] if comfyui else comfyui_candidates()
    root = next((p for p in places if (p / "comfy" / "model_patcher.py").is_file()), None)
    if root is None:
        raise RuntimeError(f"ComfyUI not found at {', '.join(map(str, places))}: expected a ComfyUI folder containing "
                           "comfy/model_patcher.py; set model.comfyui to your ComfyUI folder")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    if "comfy.model_management" not in sys.modules:
        import comfy.cli_args

        if cpu if cpu is not None else not torch.cuda.is_available():
            comfy.cli_args.args.cpu = True  # must happen before comfy.model_management is imported
    for name in ("comfy.model_management", "comfy.model_detection", "comfy.sd", "comfy.ldm.flux.model"):
        importlib.import_module(name)
    return sys.modules["comfy"]


def tiny_unet_config(cfg: ModelConfig) -> dict:
    """ComfyUI Flux config at tiny sizes (comfyui.md §6): real class, random weights."""
    head_dim = cfg.tiny_hidden // cfg.tiny_heads
    side = (head_dim // 4) * 3 // 2 // 2 * 2  # two equal even spatial axes, the rest for the index axis
    return dict(image_model="flux", in_channels=FLUX.latent_channels, out_channels=FLUX.latent_channels,
                vec_in_dim=cfg.tiny_vec_dim,
                context_in_dim=cfg.tiny_context_dim, hidden_size=cfg.tiny_hidden, mlp_ratio=4.0,
                num_heads=cfg.tiny_heads, depth=cfg.tiny_depth, depth_single_blocks=cfg.tiny_depth_single,
                axes_dim=[head_dim - 2 * side, side, side], theta=10000, patch_size=FLUX.patch, qkv_bias=True,
                guidance_embed=True)


def init_tiny_weights(model: nn.Module, seed: int) -> None:
    """comfy.ops layers are created without initialisation: norms' scale = 1, everything else N(0, 0.02)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith(".scale"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def load_flux(cfg: ModelConfig, dtype: torch.dtype = torch.float32, seed: int = 0):
    """A ComfyUI ``ModelPatcher`` around FLUX (``.model.diffusion_model`` is ``comfy.ldm.flux.model.Flux``): from
    ``cfg.diffusion_model`` through ``comfy.sd.load_diffusion_model`` (ComfyUI's detection and key conversion), or
    tiny with random weights (``init_tiny_weights(seed)``)."""
    import_comfy(cfg.comfyui)
    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd

    if cfg.tiny:
        model_config = comfy.model_detection.model_config_from_unet_config(tiny_unet_config(cfg))
        model_config.set_inference_dtype(dtype, None)
        model = model_config.get_model({}, "")
        init_tiny_weights(model.diffusion_model, seed)
        patcher = comfy.model_patcher.ModelPatcher(model, comfy.model_management.get_torch_device(),
                                                   comfy.model_management.unet_offload_device())
    else:
        path = Path(cfg.diffusion_model).expanduser()
        if not path.is_file():
            raise ValueError(f"model.diffusion_model {path} does not exist; point it at your FLUX.1 transformer "
                             "(ComfyUI/models/diffusion_models/flux1-dev.safetensors)")
        patcher = comfy.sd.load_diffusion_model(str(path), model_options={"dtype": dtype})
    flux = patcher.model.diffusion_model
    if type(flux).__name__ != "Flux":
        raise RuntimeError(f"{cfg.diffusion_model} loaded as {type(flux).__module__}.{type(flux).__name__}; the IDAR "
                           "trainer needs a FLUX.1 model (comfy.ldm.flux.model.Flux)")
    return patcher


def inject_moe(model: nn.Module, config: MoELoRAConfig) -> dict[str, MoELoRA]:
    """Wrap each target FFN as ``MoELoRAFFN(base, MoELoRA)``; returns the MoE modules by path."""
    out = {}
    for path in config.targets:
        parent, name = get_submodule_parent(model, path)
        ffn = getattr(parent, name)
        first, last = ffn[0], ffn[-1]  # Flux FFN: Linear, GELU, Linear
        moe = MoELoRA(first.weight.shape[1], last.weight.shape[0], config, device=first.weight.device)
        setattr(parent, name, MoELoRAFFN(ffn, moe))
        out[path] = moe
    return out


@dataclass
class IDARCapture:
    """Collects, per forward, each supervised double block's reference->image map (B, S, L)."""

    layout: TokenLayout
    use_checkpoint: bool = False
    direction: str = "reference_to_image"  # loss.idar_direction (attention.attention_maps.DIRECTIONS)
    maps: list[Tensor] = field(default_factory=list)


@dataclass(frozen=True)
class FluxInputs:
    """One forward's conditioning.

    Shapes:
        x_t: (B, C, h, w) noisy target latent; t: (B,) in [0, 1]
        context: (B, T_txt, D_ctx); pooled: (B, D_vec)
        refs: list of S tensors (B, C, h_s, w_s), clean reference latents
    """

    x_t: Tensor
    t: Tensor
    context: Tensor
    pooled: Tensor
    refs: list[Tensor]
    guidance: float = 1.0


def token_layout(inputs: FluxInputs) -> TokenLayout:
    """Where txt, image and reference tokens sit in Flux's joint sequence ``[txt | img | ref_0 | ...]``."""
    return FLUX.token_layout(inputs.context.shape[1], tuple(inputs.x_t.shape[-2:]),
                             [tuple(r.shape[-2:]) for r in inputs.refs])


class FluxBackend(nn.Module):
    """ComfyUI's Flux with attention LoRA, run with the hooks IDAR needs. ``trainable_parameters()`` is what the
    optimizer sees; the base stays frozen."""

    def __init__(self, diffusion_model: nn.Module, lora: LoRAConfig | None, moe: MoELoRAConfig | None = None,
                 grad_checkpointing: bool = False, lora_rows: Mapping[str, int] | None = None) -> None:
        """``lora``/``moe``: the core adapter configs with their module paths (a trainer config's ``to_core``);
        None = no such adapter. ``lora_rows``: LoRA paths that change only their Linear's first outputs (a trainer
        config's ``LoRAConfig.out_rows``, e.g. UNO's single-block q/k/v LoRA); exported zero-padded."""
        super().__init__()
        self.flux = diffusion_model.requires_grad_(False)  # the base stays frozen; only the adapters below train
        self.grad_checkpointing = grad_checkpointing
        self.lora_config, self.moe_config = lora, moe
        self.loras: dict[str, LoRALinear] = inject_lora(self.flux, list(lora.targets), lora.rank, lora.alpha,
                                                        dict(lora_rows or {})) if lora is not None else {}
        self.moes: dict[str, MoELoRA] = inject_moe(self.flux, moe) if moe is not None else {}
        self.routing: list[tuple[Tensor, Tensor]] = []  # (router logits (T, E), experts (T, k)) of the last forward
        for module in self.moes.values():
            module.router_logits_hooks.append(lambda logits, experts: self.routing.append((logits, experts)))

    @property
    def double_blocks(self) -> nn.ModuleList:
        """The dual-stream blocks (the family registry names their attribute)."""
        return getattr(self.flux, FLUX.double_blocks)

    @property
    def num_double_blocks(self) -> int:
        return len(self.double_blocks)

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def forward(self, inputs: FluxInputs, idar_blocks: list[int] | None = None,
                capture_checkpoint: bool = True, idar_direction: str = "reference_to_image") -> tuple[Tensor, list[Tensor]]:
        """Predict the velocity; with ``idar_blocks`` also return those blocks' per-subject attention maps in
        ``idar_direction`` (``losses.supervised_maps``).
        ``capture_checkpoint`` recomputes the maps' (B, H, rows, N) probabilities in backward instead of keeping them
        (one extra matmul + softmax per subject and block; q and k are stored anyway).

        Shapes:
            returns v (B, C, h, w) and a list of (B, S, L), one per supervised block
        """
        capture = IDARCapture(token_layout(inputs), capture_checkpoint, idar_direction) if idar_blocks else None
        self.routing.clear()
        options = self._transformer_options(capture, set(idar_blocks or ()))
        batch = inputs.x_t.shape[0]
        guidance = torch.full((batch,), inputs.guidance, device=inputs.x_t.device, dtype=inputs.x_t.dtype)
        v = self.flux(inputs.x_t, inputs.t.to(inputs.x_t.dtype), inputs.context, y=inputs.pooled, guidance=guidance,
                      ref_latents=list(inputs.refs) or None, transformer_options=options, ref_latents_method="uxo")
        # with checkpointing, recomputation in backward re-appends maps/routing; only the first pass's are this step's
        del self.routing[len(self.moes):]
        return v, (capture.maps[:len(idar_blocks)] if capture is not None else [])

    def _transformer_options(self, capture: IDARCapture | None, idar_blocks: set[int]) -> dict:
        # every block goes through our runner when gradients are on: ComfyUI's blocks add to their inputs in place
        # (``txt +=``, ``x +=``), which autograd refuses; the runner hands them copies (see _saved_copies_of)
        grad = torch.is_grad_enabled()
        replace = {}
        for i in range(len(self.double_blocks)):
            if i in idar_blocks or grad:
                replace[("double_block", i)] = self._block_runner("double", i, i in idar_blocks)
        if grad:
            for i in range(len(self.flux.single_blocks)):
                replace[("single_block", i)] = self._block_runner("single", i, False)
        options = {"patches_replace": {"dit": replace}}
        if capture is not None:
            options["optimized_attention_override"] = _IDARAttention(capture)
        return options

    def _block_runner(self, kind: str, index: int, supervised: bool):
        """A ``patches_replace["dit"]`` entry. It calls the block module itself rather than ``extra["original_block"]``:
        ComfyUI's ``block_wrap`` closes over the loop variable, so calling it later (checkpoint recompute) would run
        the last block."""
        grad = torch.is_grad_enabled()
        use_checkpoint = self.grad_checkpointing and grad
        block = (self.double_blocks if kind == "double" else self.flux.single_blocks)[index]
        keys = ("img", "txt") if kind == "double" else ("img",)

        def run(args: dict, extra: dict) -> dict:
            options = args["transformer_options"]
            if supervised:
                options = {**options, IDAR_BLOCK: index}

            def body(*xs: Tensor) -> tuple[Tensor, ...]:
                common = dict(vec=args["vec"], pe=args["pe"], attn_mask=args.get("attn_mask"), transformer_options=options)
                if not grad:
                    return block(img=xs[0], txt=xs[1], **common) if kind == "double" else (block(xs[0], **common),)
                xs = [x.clone() for x in xs]
                with _saved_copies_of(xs, enabled=not use_checkpoint):
                    return block(img=xs[0], txt=xs[1], **common) if kind == "double" else (block(xs[0], **common),)

            inputs = [args[k] for k in keys]
            out = checkpoint(body, *inputs, use_reentrant=False) if use_checkpoint else body(*inputs)
            return dict(zip(keys, out))

        return run


def _saved_copies_of(tensors: list[Tensor], enabled: bool):
    """ComfyUI's blocks add to their inputs in place (``txt +=``, ``x +=``) after a norm has saved them for
    backward, which autograd refuses. Under this context anything saved that shares storage with ``tensors`` is
    saved as a copy. (Not needed under checkpointing: there saved tensors are recomputed, never kept.)"""
    if not enabled:
        return nullcontext()
    storages = {t.untyped_storage().data_ptr() for t in tensors}

    def pack(t: Tensor) -> Tensor:
        return t.clone() if t.untyped_storage().data_ptr() in storages else t

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)


class _IDARAttention:
    """``optimized_attention_override``: runs the normal attention, and for tagged double blocks also computes the
    reference->image map from the same (post-RoPE) q and k."""

    def __init__(self, capture: IDARCapture) -> None:
        self.capture = capture

    def __call__(self, func, q, k, v, heads, **kwargs):
        options = kwargs.get("transformer_options") or {}
        if options.get(IDAR_BLOCK) is not None:
            self.capture.maps.append(supervised_maps(q, k, self.capture.layout, self.capture.use_checkpoint,
                                                     self.capture.direction))
        return func(q, k, v, heads, **kwargs)


def latent_to_rgb(latent: Tensor) -> Tensor:
    """Fast preview of Flux latents with ComfyUI's own latent->RGB factors (what its live previews use).

    Shapes:
        latent: (C, h, w) model-space latent; returns (3, h, w) in [0, 1]
    """
    import comfy.latent_formats

    fmt = comfy.latent_formats.Flux()
    factors = torch.tensor(fmt.latent_rgb_factors, dtype=torch.float32)  # (C, 3)
    bias = torch.tensor(fmt.latent_rgb_factors_bias or [0.0, 0.0, 0.0], dtype=torch.float32)
    rgb = torch.einsum("chw,cr->rhw", latent.float().cpu(), factors) + bias[:, None, None]
    return ((rgb + 1) / 2).clamp(0, 1)


class ComfyEncoder:
    """The cache's encoder for real models: FLUX VAE and CLIP-L + T5-XXL through ComfyUI's loaders."""

    def __init__(self, cfg: ModelConfig) -> None:
        import_comfy(cfg.comfyui)
        import comfy.latent_formats
        import comfy.sd
        import comfy.utils

        paths = {"model.vae": cfg.vae, "model.clip_l": cfg.clip_l, "model.t5": cfg.t5}
        missing = [f"{k} = '{v}'" for k, v in paths.items() if not v or not Path(v).expanduser().is_file()]
        if missing:
            raise ValueError("`data cache` needs the VAE and both text encoders; these files do not exist: "
                             + ", ".join(missing) + " (ComfyUI/models/vae/ae.safetensors, models/text_encoders/...)")
        self.vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(Path(cfg.vae).expanduser())))
        self.clip = comfy.sd.load_clip([str(Path(cfg.clip_l).expanduser()), str(Path(cfg.t5).expanduser())],
                                       clip_type=comfy.sd.CLIPType.FLUX)
        self.latent_format = comfy.latent_formats.Flux()
        self.name = "comfy-flux-" + hashlib.sha256("|".join(
            f"{Path(p).name}:{Path(p).stat().st_size}" for p in paths.values()).encode()).hexdigest()[:12]

    def encode_images(self, pixels: Tensor) -> Tensor:
        raw = self.vae.encode(((pixels + 1) / 2).permute(0, 2, 3, 1))  # ComfyUI IMAGE is (B, H, W, 3) in [0, 1]
        return self.latent_format.process_in(raw)

    def encode_texts(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        contexts, pooled = [], []
        for caption in captions:
            cond, pool = self.clip.encode_from_tokens(self.clip.tokenize(caption), return_pooled=True)
            contexts.append(cond[0])
            pooled.append(pool[0])
        return torch.stack(contexts), torch.stack(pooled)


def load_vae_decoder(cfg: ModelConfig, device: torch.device):
    """IPPO's decoder for real models: model-space Flux latents -> RGB through ComfyUI's FLUX VAE (``model.vae``).

    Returns a function: latents (B, C, h, w) -> images (B, H, W, 3) float RGB in [0, 1] on ``device``.
    """
    import_comfy(cfg.comfyui)
    import comfy.latent_formats
    import comfy.sd
    import comfy.utils

    path = Path(cfg.vae).expanduser()
    if not cfg.vae or not path.is_file():
        raise ValueError(f"model.vae = '{cfg.vae}' does not exist; IPPO decodes its rollouts for the rewards and "
                         "needs the FLUX VAE (ComfyUI/models/vae/ae.safetensors)")
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(path)))
    latent_format = comfy.latent_formats.Flux()

    def decode(latents: Tensor) -> Tensor:
        with torch.no_grad():
            images = vae.decode(latent_format.process_out(latents.float()))  # (B, H, W, 3) in [0, 1]
        return images.float().clamp(0, 1).to(device)

    return decode
