"""Model selection on the validation split: which validated global model is "best".

The official code picks its checkpoint on the *test* set behind a hand-set 88 % clean gate;
here the validation split (carved from the training data) decides, so the test set chooses
nothing and its numbers stay an unbiased estimate (docs/algorithm.md, "Model selection").
"""

from __future__ import annotations

CLEAN = "clean"


def selection_score(
    criterion: str, accuracies: dict[str, float], min_clean: float | None = None
) -> float | None:
    """The score a validated model is ranked by (higher is better), or None if it may not be
    selected (``none``, or below the clean gate of ``clean_gated_robust``).

    ``accuracies`` are one model's validation accuracies (%): ``clean`` and one entry per
    threat. "Robust" is the weakest threat's accuracy, so a model is not preferred for being
    robust to one threat while failing another; without any threat it is the clean accuracy.
    """
    if criterion == "none":
        return None
    clean = accuracies[CLEAN]
    threats = [value for name, value in accuracies.items() if name != CLEAN]
    robust = min(threats) if threats else clean
    if criterion == "clean+robust":
        return clean + robust
    if criterion == "robust":
        return robust
    if criterion == "clean_gated_robust":
        if min_clean is None:
            raise ValueError("clean_gated_robust needs min_clean")
        return robust if clean >= min_clean else None
    raise ValueError(f"unknown selection criterion {criterion!r}")
