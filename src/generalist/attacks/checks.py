"""Sanity checks for gradient masking, after AutoAttack's flags (Croce & Hein, 2020).

A model can look robust because the attacks are blind rather than because it is: gradients
that vanish, a forward pass that changes from call to call, or a black-box attack succeeding
where every gradient attack failed. Each check returns warning texts (empty when all is well)
that say what was seen and what to do; the evaluator records them next to the accuracies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from generalist.attacks.mim_cw import cw_margin_loss

if TYPE_CHECKING:
    from generalist.attacks.autoattack import AutoAttackResult

BLACK_BOX = frozenset({"square"})
"""Attacks that only read the model's outputs."""


def check_zero_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[str]:
    """Warn when some examples have an all-zero input gradient of the margin loss.

    The CW margin is used rather than cross-entropy because its gradient cannot vanish through
    a saturated softmax: a zero here means the logits themselves are locally flat.
    """
    with torch.enable_grad():
        x = x.detach().clone().requires_grad_(True)
        loss = cw_margin_loss(model(x), y, kappa=float("inf"))
        (grad,) = torch.autograd.grad(loss.sum(), x)
    zero = grad.flatten(1).abs().sum(dim=1) == 0
    if not zero.any():
        return []
    return [
        f"{int(zero.sum())} of {len(x)} points ({zero.float().mean().item():.1%}) have an all-zero "
        "input gradient: gradient-based attacks cannot move them, so robust accuracy may be "
        "overestimated (gradient masking); check the model or rely on Square for these points"
    ]


def check_randomness(
    model: nn.Module, x: torch.Tensor, n_passes: int = 3, tolerance: float = 1e-4
) -> list[str]:
    """Warn when repeated forward passes on the same input disagree (in the current mode).

    Attacks assume a deterministic model; randomness (dropout left on, stochastic defences)
    makes a single evaluation overestimate robustness.
    """
    with torch.no_grad():
        outputs = [model(x).float() for _ in range(n_passes)]
    normalised = [o / (o.flatten(1).norm(dim=1, keepdim=True) + 1e-10) for o in outputs]
    gap = max((n - normalised[0]).abs().max().item() for n in normalised[1:])
    flips = any(not torch.equal(o.argmax(dim=1), outputs[0].argmax(dim=1)) for o in outputs[1:])
    if gap <= tolerance and not flips:
        return []
    return [
        f"the model's outputs differ between forward passes on the same input (up to {gap:.2g} "
        "after normalising): it seems randomised, so these attacks overestimate its robustness; "
        "disable the randomness in eval mode, or evaluate with AutoAttack's rand version "
        "(--attacks autoattack-rand: APGD-CE and APGD-DLR with expectation over transformation)"
    ]


def black_box_warning(
    n_broken_only_by_black_box: int, n_examples: int, threshold: float = 0.002
) -> list[str]:
    """The warning for points a black-box attack broke after every white-box attack failed;
    like AutoAttack, differences up to ``threshold`` (0.2 pp) are not worth a flag."""
    share = n_broken_only_by_black_box / max(n_examples, 1)
    if n_broken_only_by_black_box == 0 or share <= threshold:
        return []
    return [
        f"the black-box attack broke {n_broken_only_by_black_box} points ({share:.2%}) that every "
        "white-box attack missed: gradients are probably masked, so the evaluation may be "
        "unreliable; run Square with more queries and restarts, or an adaptive attack"
    ]


def check_black_box_beats_white_box(result: AutoAttackResult) -> list[str]:
    """Warn when Square broke points that the gradient attacks before it all failed on.

    AutoAttack runs black-box attacks last, so any point they break is one the white-box
    attacks missed.
    """
    broken = sum(int(result.broken_by[name].sum()) for name in result.attacks if name in BLACK_BOX)
    return black_box_warning(broken, len(result.robust))


CROSS_ENTROPY = frozenset({"apgd-ce", "pgd", "mim"})
"""Attacks that follow the cross-entropy gradient (``pgd-<steps>`` too)."""
MARGIN = frozenset({"apgd-dlr", "apgd-t", "fab-t", "cw"})
"""Attacks on the logit margin, which scaling the logits cannot hide from."""


def is_cross_entropy(name: str) -> bool:
    return name in CROSS_ENTROPY or name.startswith("pgd-")


def cross_entropy_masking_warning(
    n_only_margin: int, n_broken_by_ce: int, n_examples: int, threshold: float = 0.1
) -> list[str]:
    """Warn when margin attacks break far more than cross-entropy ones on the same points.

    Scaling a model's logits (×1e4, a temperature) saturates the softmax, so cross-entropy
    gradients round to zero in float32 and CE attacks find nothing, while margin (DLR, C&W)
    attacks are unaffected. AutoAttack's reference implementation does not check this. Flagged
    when the margin attacks alone break at least ``threshold`` of the points and more points
    than the CE attacks broke at all."""
    share = n_only_margin / max(n_examples, 1)
    if share < threshold or n_only_margin <= n_broken_by_ce:
        return []
    return [
        f"the margin-based attacks broke {n_only_margin} points ({share:.0%}) that the "
        f"cross-entropy attacks missed, which broke only {n_broken_by_ce}: the model's "
        "cross-entropy gradients probably vanish (scaled logits saturate the softmax in "
        "float32), so cross-entropy numbers overstate robustness; trust the margin-based ones"
    ]


def check_cross_entropy_against_margin(result: AutoAttackResult) -> list[str]:
    """:func:`cross_entropy_masking_warning` for AutoAttack, whose later (margin) stages only
    attack what its cross-entropy stage left."""
    ce = sum(int(result.broken_by[n].sum()) for n in result.attacks if is_cross_entropy(n))
    margin = sum(int(result.broken_by[n].sum()) for n in result.attacks if n in MARGIN)
    return cross_entropy_masking_warning(margin, ce, len(result.robust))
