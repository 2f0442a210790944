"""CAN (cross-attention networks): two networks whose feature maps attend to each other through
their Hadamard product, trained with a loss for class imbalance and easy samples (notebook 06).

- ``model.py``: the two networks and their attention, a_i = σ(W_i ∗ (p₁ ⊙ p₂) + b_i) on the
  projected maps p_i, gating each, g_i = p_i ⊙ a_i; registered as ``can`` (and
  ``logit_ensemble``, the two networks' logits averaged, without attention).
- ``training.py``: the trainer with its optional attention term.
- ``study.py``: training each arm, the table of the paired comparisons 06 reports (the arms,
  their losses and the pairs are written in 06 itself) and the equations on one batch.

Its loss, ``can_balance``, −(1 − p_t)^γ·[w⁺·y·log p + w⁻·(1 − y)·log(1 − p)] over the known labels, is registered with the
shared imbalance losses in :mod:`cxrstudy.train.imbalance_losses`, because any notebook's ``loss``
parameter may name it.
"""
