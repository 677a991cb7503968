"""Analyses of branched models and of any model's parts: responses, activity, covariance, gradients, Hessians,
decompositions and their baselines, NAD and its nulls.

The uniform analyses of parts (each ``f(parts, data, target)`` returning a result with ``to_dict()`` and
``figure()``) are exported here; the modules hold the mathematics they use:

    from branchspec.analysis import activity, correlation, contribution, ablation, importance, hessian_blocks
"""

from branchspec.analysis.parts import (Ablation, Activity, Contribution, Correlation, HessianBlocks, Importance,
                                       ablation, activity, contribution, correlation, hessian_blocks, importance,
                                       part_outputs)

__all__ = ["Ablation", "Activity", "Contribution", "Correlation", "HessianBlocks", "Importance", "ablation",
           "activity", "contribution", "correlation", "hessian_blocks", "importance", "part_outputs"]
