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

Layout (each trainer's file is its loop alone; what both share lives below it):
    idar.py / ippo_trainer.py   the two loops (stage 1: flow + IDAR Dice; stage 2: GSPO rollouts + rewards)
    run.py                      run bookkeeping: Position, resume_path, prepare_checkpoints (crash tidy-up, rollback),
                                restore / save (all ranks), lr schedule, sample_generator, SigtermGuard, Observers
    backend.py                  build_backend(model, lora, moe, run), load_trainable, export_weights, load_run
    comfy_backend.py            ComfyUI's Flux with adapters and the IDAR hooks (the one ComfyUI import)
    config.py / ippo_config.py  frozen configs; sections convert through to_core() to attention/'s configs
                                (FLUX facts: module names, patch, time shift, from attention/families.py)
    checkpoint.py               safetensors + JSON checkpoints, completion marker, rename-before-delete, converter
    rewards.py                  BUILTIN_REWARDS registry {name: (build, check_paths, resumable keys)} + plugins
    data.py / cache.py          manifest, validation, buckets; the latent/text cache
    ippo.py / gspo.py / sde.py  one IPPO iteration, the GSPO objective, the SDE sampler and its window
    distributed.py / reward_ranks.py   torchrun, DDP-style averaging, FSDP2; reward-only ranks
"""
