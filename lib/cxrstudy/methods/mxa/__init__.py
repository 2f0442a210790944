"""MXA (Rand & Ibrahim, arXiv 2504.02277): a Medical X-ray Attention block inside EfficientViT-M,
and knowledge distillation from a stronger teacher (notebooks 02 and 03).

- ``model.py``: the block, MXA(x) = M_s ⊙ (M_c ⊙ x′) with x′ = crop(x, box(x)) (channel
  attention M_c, then spatial M_s), summed beside the window attention (x ← x + LWA(x) + MXA(x)),
  and its two placements in EfficientViT-M; registered as ``efficientvit_m0_mxa`` …
  ``efficientvit_m5_mxa``.
- ``sigmoid_output.py``: the authors' baseline as their code builds it (a sigmoid before
  BCE-with-logits), registered as ``sigmoid_output``.
- ``distillation.py``: the KD loss, L = (1 − α)·BCE(z_cls, y) + α·BCE(z_dist, σ(t/τ)) (only the
  teacher's logits t are divided by τ, and no τ² factor), and its trainer.
- ``study.py``: the arms of 02 and 03, their settings and the papers' numbers they are set beside.
"""
