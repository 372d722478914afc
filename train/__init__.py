"""Headless trainers for MultiCrafter (imports ``attention/``, never ``nodes/``).

Shape legend (used in every ``Shapes:`` block of this package):
    B   batch (trajectories)       S   subjects
    G   group size (images per prompt group in GSPO)
    K   denoising steps in a trajectory
    W   steps inside the SDE window
    C   latent channels            h, w  latent height / width
"""
