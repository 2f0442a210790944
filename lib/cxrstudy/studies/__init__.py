"""Per-paper glue for the study notebooks: the arms of each ablation, the paper's reported
numbers, and the small tables a notebook shows. The mechanisms live in ``models``/``train``."""
