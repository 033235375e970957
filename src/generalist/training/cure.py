"""The two mechanisms CURE (Gowda et al., ICLR 2024) adds to TRADES: conserve and revise.

**Conserve-update.** Every step, each layer keeps updating only the weights that matter to
either objective: the *robust gradient prominence* ``α·|∂L_nat/∂w| + (1−α)·|∂L_adv/∂w|`` ranks
the entries of each weight tensor, and the gradients of the lowest ``p`` % are zeroed before
the optimizer step. The percentile is exact: ``k = round(p·numel)`` entries per tensor, ties
broken by position (lower flat index first), so the same gradients always give the same mask.

Which tensors count as a layer's "weights": every parameter with two or more dimensions, i.e.
the convolution kernels and linear weight matrices, the classifier included. BatchNorm scales
and shifts and the biases are left alone: they hold one number per channel, so a 30 % mask
there would switch off whole channels' normalisation rather than conserve individual
connections, and they are a negligible share of the weights. The rule needs no layer names, so
it holds for every architecture of the zoo. (The official code masks by layer name, signed
rather than absolute gradients and with a ``<`` threshold, so its share is only near ``p``.)

**Revise.** A *revision* copy of the model is moved towards the live one with probability
``r`` after each step, ``θ_rev ← d_n·θ_rev + (1−d_n)·θ`` with ``d_n = min(d, n/(n+1))`` at its
``n``-th update: a running average of the models it was updated with until it becomes an EMA of
decay ``d``. (The official code warms the decay up over *all* steps, updated or not; with
r = 0.2 its start model then keeps ~30 % of the weight after 700 steps, which anchors short runs
to where CURE began. Both agree once ``d`` is reached.) The loss pulls the model's predictions
towards the revision's with a KL consistency term. The coin is a CPU generator of the task's
own, seeded from the config, so runs are reproducible and the attacks' random starts never
shift.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from generalist.training.generalist import state_tensors

SEED_SALT = 0x5EED_C0DE_F00D
"""XOR-ed into the seed so the revision coin never shares a stream with a generator seeded
with the same (small) number, such as the learner's attack generator on the CPU."""


def masked_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The weight tensors whose gradients CURE conserves (see the module docstring)."""
    return [p for p in model.parameters() if p.dim() >= 2]


def prominence(
    natural_grads: Sequence[torch.Tensor], robust_grads: Sequence[torch.Tensor], alpha: float
) -> list[torch.Tensor]:
    """Robust gradient prominence ``α·|g_nat| + (1−α)·|g_adv|``, one tensor per parameter."""
    return [
        alpha * g_nat.abs() + (1.0 - alpha) * g_adv.abs()
        for g_nat, g_adv in zip(natural_grads, robust_grads, strict=True)
    ]


def lowest_entries(score: torch.Tensor, fraction: float) -> torch.Tensor:
    """Boolean mask (shaped like ``score``) of its ``round(fraction·numel)`` lowest entries.

    A stable sort over the row-major flattening breaks ties by position, whatever the
    tensor's memory format, so exactly that many entries are chosen, deterministically.
    """
    flat = score.detach().reshape(-1)
    k = round(fraction * flat.numel())
    chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if k > 0:
        order = torch.sort(flat, stable=True).indices
        chosen[order[:k]] = True
    return chosen.view(score.shape)


@torch.no_grad()
def conserve(
    params: Sequence[nn.Parameter], scores: Sequence[torch.Tensor], fraction: float
) -> None:
    """Zero, per tensor, the gradient entries of the ``fraction`` lowest-prominence weights."""
    for param, score in zip(params, scores, strict=True):
        if param.grad is not None:
            param.grad.masked_fill_(lowest_entries(score, fraction), 0.0)


def consistency(
    revision_logits: Sequence[torch.Tensor], model_logits: Sequence[torch.Tensor]
) -> torch.Tensor:
    """``Σ KL(p_rev ‖ p)`` over the given inputs (clean and adversarial), batch-averaged."""
    return sum(
        F.kl_div(
            F.log_softmax(logits.float(), dim=1),
            F.softmax(rev.float(), dim=1),
            reduction="batchmean",
        )
        for rev, logits in zip(revision_logits, model_logits, strict=True)
    )


class RevisionModel:
    """The stochastic EMA copy of a model that CURE's consistency term looks back to.

    It runs in train mode, like the model it is compared with, so identical weights give
    identical predictions and a zero consistency term (BatchNorm uses batch statistics in both).
    """

    def __init__(self, model: nn.Module, *, rate: float, decay: float, seed: int) -> None:
        self.model = copy.deepcopy(model).train().requires_grad_(False)
        self.rate = rate
        self.decay = decay
        self.generator = torch.Generator().manual_seed(seed ^ SEED_SALT)
        self.steps = 0
        """CURE steps seen, updated or not."""
        self.updates = 0
        """Updates made: the ``n`` of the decay warm-up."""
        self._state = state_tensors(self.model)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    @torch.no_grad()
    def restart_from(self, model: nn.Module) -> None:
        """Become a copy of ``model`` (CURE begins after a natural warm-up or a loaded model)."""
        floats, ints = self._state
        source_floats, source_ints = state_tensors(model)
        torch._foreach_copy_(floats, source_floats)
        if ints:
            torch._foreach_copy_(ints, source_ints)

    def decay_at(self, update: int) -> float:
        return min(self.decay, update / (update + 1))

    @torch.no_grad()
    def step(self, model: nn.Module) -> bool:
        """After an optimizer step: with probability ``rate``, move towards ``model``."""
        self.steps += 1
        if torch.rand((), generator=self.generator).item() >= self.rate:
            return False
        floats, ints = self._state
        source_floats, source_ints = state_tensors(model)
        self.updates += 1
        torch._foreach_lerp_(floats, source_floats, 1.0 - self.decay_at(self.updates))
        if ints:
            torch._foreach_copy_(ints, source_ints)
        return True

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything a resumed run needs, as a flat table of tensors (safetensors-ready)."""
        state = {f"model.{k}": v.detach().clone() for k, v in self.model.state_dict().items()}
        state["steps"] = torch.tensor(self.steps)
        state["updates"] = torch.tensor(self.updates)
        state["generator"] = self.generator.get_state()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        weights = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
        self.model.load_state_dict(weights)
        self.steps = int(state["steps"])
        self.updates = int(state["updates"])
        self.generator.set_state(state["generator"].cpu())
