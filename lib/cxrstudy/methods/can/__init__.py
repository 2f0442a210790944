"""CAN (cross-attention networks): two networks whose feature maps attend to each other through
their Hadamard product, trained with a loss for class imbalance and easy samples (notebook 06).

- ``model.py``: the two networks and the attention, A = σ(conv(F₁ ⊙ F₂)) applied to both maps;
  registered as ``can`` (and ``logit_ensemble``, the same pair without attention).
- ``training.py``: the trainer with its optional attention term.
- ``study.py``: training each arm, the table of the paired comparisons 06 reports (the arms,
  their losses and the pairs are written in 06 itself) and the equations on one batch.

Its loss, ``can_balance`` (class-balanced focal: w_c·(1 − p_t)^γ·BCE), is registered with the
shared imbalance losses in :mod:`cxrstudy.train.imbalance_losses`, because any notebook's ``loss``
parameter may name it.
"""
