"""GLoRI (CheXFound, arXiv 2502.05142): class queries cross-attending over a ViT's patch tokens,
fused with its global features, for long-tailed multi-label classification (notebook 05).

- ``model.py``: the decoder, a_c = softmax(q_c K^T / √d) V per class c, its group-linear
  classifier, and the linear probe; registered as ``glori`` and ``linear_probe``.
- ``study.py``: training the arms (their settings are written in 05 itself), the learning-rate
  search, the head/medium/tail tables and the class queries on one image.
"""
