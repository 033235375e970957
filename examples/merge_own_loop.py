"""The Generalist merge alone, around a training loop of your own.

    python examples/merge_own_loop.py
    GENERALIST_EXAMPLES_TINY=1 python examples/merge_own_loop.py   # seconds

Two base learners, a natural one and an adversarial one, start from one initialisation and
take their own optimizer steps on the same batch; ``GeneralistMerge`` keeps an EMA teacher of
each and mixes the teachers into the global model with the weights γ you choose, and
``redistribute`` copies the global model back into the learners. Everything else (data,
losses, optimizers, schedules) is yours.
"""

from __future__ import annotations

import copy
import os

import torch
from sklearn.datasets import load_digits
from torch import nn

import generalist
from generalist.attacks import ThreatModel, pgd

TINY = os.environ.get("GENERALIST_EXAMPLES_TINY") == "1"
THREAT = ThreatModel.parse("Linf:0.1")


def digits() -> tuple[torch.Tensor, ...]:
    data = load_digits()
    x = torch.tensor(data.images[:, None] * 255 / 16).round().div(255).float()  # 8-bit levels
    y = torch.tensor(data.target)
    return x[:1400], y[:1400], x[1400:], y[1400:]


def net() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def main() -> None:
    x_train, y_train, x_test, y_test = digits()
    torch.manual_seed(0)
    base = net()
    natural, robust = copy.deepcopy(base), copy.deepcopy(base)  # one shared initialisation
    global_model = copy.deepcopy(base)
    merge = generalist.GeneralistMerge([natural, robust], global_model, decay_max=0.99)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (natural, robust)]
    steps = 20 if TINY else 600
    for step in range(steps):
        batch = torch.randint(len(x_train), (64,), generator=torch.Generator().manual_seed(step))
        x, y = x_train[batch], y_train[batch]
        x_adv = pgd(robust, x, y, THREAT, steps=5, step_size=THREAT.eps / 4)
        for model, optimizer, inputs in zip((natural, robust), optimizers, (x, x_adv), strict=True):
            loss = nn.functional.cross_entropy(model(inputs), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        gamma_robust = 1.0 if step < steps // 2 else 0.6  # your schedule for the mixing weights
        merge.update(step, [1.0 - gamma_robust, gamma_robust])
        if step >= steps // 2 and step % 10 == 0:
            merge.redistribute()
    n = 64 if TINY else len(x_test)
    table = generalist.evaluate(
        global_model, x_test[:n], y_test[:n], threats=[THREAT], attacks=["pgd-10"]
    )
    print(
        f"global model after {steps} steps: clean {table.clean_accuracy:.1f} %, "
        f"PGD-10 {THREAT} {table.robust_accuracy[str(THREAT)]:.1f} % ({n} test digits)"
    )


if __name__ == "__main__":
    main()
