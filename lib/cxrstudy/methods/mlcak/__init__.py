"""MLCAK (arXiv 2405.13370): ViT students at 28–112 px distilled from a 224 px ViT teacher through
logits and head-averaged attention maps, with local and global heads (notebook 04).

- ``model.py``: the two-task ViT (local findings z and a global abnormal logit g), registered as
  ``deit_tiny_mt``, ``deit_small_mt``, ``vit_small_mt`` and ``multitask``.
- ``training.py``: the loss, L = L_cls + α·MSE(z_s, z_t) + β·MSE(g_s, g_t)
  + γ·Σ MSE(A_s, A_t) with A = (1/N)·Σ_i H_i, and its trainer.
- ``study.py``: the student arms at each resolution (their α, β, γ from notebook 04's
  ``distillation`` table), the loss on one batch, and the tables.
"""
