"""Metrics every notebook reports: per-class/macro/micro AUC, AP, F1, patient-level bootstrap
CIs, DeLong tests, and the summary tables built from them.

>>> per_class, overall = summarize(y_true, y_score, classes, mask=mask, patient_ids=pids)
>>> compare_models(y_true, {"baseline": s0, "mxa": s1}, reference="baseline", classes=classes)
>>> per_class_delta, set_deltas = paired_auc_difference(y_true, s1, s0, classes, patient_ids=pids,
...                                                     class_sets={"small": ["Nodule", "Mass"]})

Arrays are [N, C]; ``mask`` (1 = label known) or NaN in ``y_true`` marks unknown labels, which
are excluded per class. Classes with an undefined AUC are NaN and left out of macro averages;
a bootstrap resample averages the same classes as its point estimate (or is skipped).
"""
from .bootstrap import bootstrap_ci, group_codes, resample_counts
from .classification import (check_inputs, constant_score_classes, f1_at_threshold,
                             label_counts, macro_ap, macro_auc, macro_auc_over,
                             macro_auc_weighted, mean_over_classes, micro_auc,
                             micro_auc_weighted, midranks, per_class_ap, per_class_auc,
                             per_class_auc_weighted, rank_auc, weighted_auc)
from .delong import (delong_ci, delong_covariance, delong_per_class, delong_test,
                     pooled_delong_p, structural_components)
from .summary import compare_models, json_ready, paired_auc_difference, summarize

__all__ = [
    "bootstrap_ci", "group_codes", "resample_counts",
    "check_inputs", "constant_score_classes", "f1_at_threshold", "label_counts", "macro_ap",
    "macro_auc", "macro_auc_over", "macro_auc_weighted", "mean_over_classes", "micro_auc",
    "micro_auc_weighted", "midranks",
    "per_class_ap", "per_class_auc", "per_class_auc_weighted", "rank_auc", "weighted_auc",
    "delong_ci", "delong_covariance", "delong_per_class", "delong_test", "pooled_delong_p",
    "structural_components",
    "compare_models", "json_ready", "paired_auc_difference", "summarize",
]
