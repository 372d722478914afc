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
"""
