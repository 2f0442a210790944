"""The four papers, one folder each: everything a paper adds to the shared blocks, in one place.

=========  ==============================================  =====================================
folder     paper                                           notebooks
=========  ==============================================  =====================================
``mxa``    MXA block in EfficientViT-M, plus distillation  02_mxa, 03_knowledge_distillation
``mlcak``  low-resolution students of a 224 px ViT        04_low_resolution
``glori``  class-query cross-attention (CheXFound)         05_glori
``can``    two networks cross-attending (CAN)              06_cross_attention
=========  ==============================================  =====================================

Every folder has the same modules: ``model.py`` (the network; its names are registered, so
:func:`cxrstudy.models.create_model` builds them), ``training.py`` (its loss and training step,
where the paper has its own; MXA's is ``distillation.py``) and ``study.py`` (its arms and what
its notebook calls). The shared blocks stay where they were: the registry and ``create_model``,
heads and pretrained weights in :mod:`cxrstudy.models`; the trainer, schedule and losses in
:mod:`cxrstudy.train`; teachers in :mod:`cxrstudy.teachers`. A paper's modules never import another
paper's (``tests/unit/core/test_layering.py``).
"""
