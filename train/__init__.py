"""Headless trainers for multisubject. Imports ``attention/``, never ``nodes/``; the only module that
imports ComfyUI is ``train/comfy_backend.py`` (the model backend).

Shape legend (same letters as ``attention/``):
    B   batch                      S   subjects
    H   heads (in attention code)  D   head dim
    L   image tokens (= h * w)     N   joint tokens (T_txt + L + refs)
    h, w  token-grid height/width  C   latent channels
    T_txt text tokens              E   MoE experts
    G   group size (IPPO: images per prompt group)
    K   denoising steps of a rollout   W   steps inside the SDE window

Pieces meant for reuse by other trainers (e.g. stage 2, IPPO):
    config.load_config(path, overrides, cls)   TOML + ``--section.key=value`` into any frozen config dataclass tree
    config.config_diff / to_dict                resolved-config dicts for checkpoints, metadata and resume checks
    comfy_backend.load_flux / FluxBackend       ComfyUI's Flux (patcher), adapters injected, IDAR maps, routing logits
    comfy_backend.ComfyEncoder / latent_to_rgb  VAE + CLIP/T5 through ComfyUI; latent previews
    checkpoint.save_checkpoint / load_checkpoint / list_checkpoints   atomic, keep-last-K, config-checked
    distributed.setup_distributed / average_gradients / shard_flux / full_trainable_state   torchrun, DDP-style, FSDP2
    idar.export_weights / load_run / build_backend   the MultiCrafter weight file; a backend from a checkpoint
"""
