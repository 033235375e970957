"""AutoAttack on any PyTorch model: one call, with the sanity checks of ``generalist eval``.

    python examples/autoattack_any_model.py
    GENERALIST_EXAMPLES_TINY=1 python examples/autoattack_any_model.py   # seconds

The model here is trained by a plain PyTorch loop in a few seconds; use your own instead.
``evaluate`` attacks it in eval mode and gives it back in the mode it had; a warning says
when a sanity check fires (zero gradients, randomness in the forward pass, black-box attacks
beating white-box ones): then the robust accuracy is not to be trusted.
"""

from __future__ import annotations

import os

import torch
from sklearn.datasets import load_digits
from torch import nn

import generalist

TINY = os.environ.get("GENERALIST_EXAMPLES_TINY") == "1"


def digits() -> tuple[torch.Tensor, ...]:
    data = load_digits()
    x = torch.tensor(data.images[:, None] * 255 / 16).round().div(255).float()  # in [0, 1]
    y = torch.tensor(data.target)
    return x[:1400], y[:1400], x[1400:], y[1400:]


def plainly_trained(x: torch.Tensor, y: torch.Tensor, steps: int) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(steps):
        batch = torch.randint(len(x), (128,), generator=torch.Generator().manual_seed(step))
        loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def main() -> None:
    x_train, y_train, x_test, y_test = digits()
    model = plainly_trained(x_train, y_train, steps=30 if TINY else 300)
    n = 16 if TINY else len(x_test)
    table = generalist.evaluate(
        model,
        x_test[:n],
        y_test[:n],
        threats=["Linf:0.1", "L2:1.0"],  # AutoAttack standard under each, and their union
        n_iter=5 if TINY else None,
        out="autoattack-eval",  # eval.json, results.md, model_info.json (RobustBench format)
    )
    print(table)
    for threat, accuracy in table.robust_accuracy.items():
        print(f"{threat}: {accuracy:.1f} % robust (clean {table.clean_accuracy:.1f} %)")
    print(f"robust to both at once: {table.union:.1f} %")


if __name__ == "__main__":
    main()
