"""Models and data shared by the attack tests: a small trained digits model and linear problems
whose exact robust accuracy is known in closed form."""

from __future__ import annotations

import math

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

# The models here are tiny: with several threads on a shared 2-core machine, thread hand-offs
# cost up to 70× the arithmetic (measured: APGD on a linear model 8.5 s vs 0.12 s).
torch.set_num_threads(1)

REAL_CUDA_IS_AVAILABLE = torch.cuda.is_available
HAS_CUDA = REAL_CUDA_IS_AVAILABLE()
"""Read before :func:`cpu_unless_marked_cuda` hides the GPU: what ``tests/test_cuda.py`` runs on."""


@pytest.fixture(scope="session", autouse=True)
def cpu_unless_marked_cuda():
    """Every test trains and attacks on the CPU, also on a machine with a GPU, unless it is
    marked ``cuda``: ``device: auto`` would otherwise pick the GPU, and the distributed tests
    fork, which CUDA does not survive. The tests that start fresh interpreters pass
    ``device=cpu`` themselves (``training_runs.TINY_DATA``)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: False)
        yield


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The ``cuda`` tests run last, so no test forks a process after CUDA started."""
    items.sort(key=lambda item: item.get_closest_marker("cuda") is not None)


DUAL = {"Linf": 1.0, "L2": 2.0, "L1": math.inf}
"""The dual norm's p: a linear score moves by at most ε·‖w‖_dual inside an ℓp ball."""


def frozen(model: nn.Module) -> nn.Module:
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def robust_flags(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x_adv).argmax(dim=1) == y


def reference_start_noise(norm: str, seed: int):
    """APGD's ``start_noise`` hook giving pyautoattack's starts: the reference seeds the global
    CPU generator once per ``perturb`` call and draws each run's noise from it in turn, so one
    attack call with this hook starts every run where the reference's call does."""
    generator = torch.Generator().manual_seed(seed)

    def noise(x: torch.Tensor, points: torch.Tensor, round_: str) -> torch.Tensor:
        if norm == "Linf":
            return 2 * torch.rand(x.shape, generator=generator) - 1
        return torch.randn(x.shape, generator=generator)

    return noise


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return frozen(
        nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10)
        )
    )


def images_touching_the_box(n: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, 3, 8, 8, generator=g)
    x[:, 0, :4] = 0.0
    x[:, 1, 4:] = 1.0
    return x


@pytest.fixture(scope="session")
def digits_model():
    """An MLP trained for a fraction of a second on sklearn's 8×8 digits (97 % test accuracy),
    and 200 held-out test images."""
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[200:]), y[200:]).backward()
        optimizer.step()
    return frozen(model.eval()), x[:200], y[:200]


def linear_classifier(n_classes: int, n: int, seed: int = 0):
    """A linear model on 3×8×8 images near 0.5 (in [0.4, 0.6]), labelled by its own prediction
    except every fourth point, which gets a wrong label. Returns (model, x, y, weight)."""
    g = torch.Generator().manual_seed(seed)
    x = 0.4 + 0.2 * torch.rand(n, 3, 8, 8, generator=g)
    linear = nn.Linear(3 * 8 * 8, n_classes)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n_classes, 192, generator=g))
        linear.bias.copy_(-(linear.weight @ x.flatten(1).mean(0)))
    model = frozen(nn.Sequential(nn.Flatten(), linear).eval())
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    y[::4] = (y[::4] + 1) % n_classes
    return model, x, y, linear.weight.detach()


def distance_to_boundary(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, norm: str
) -> torch.Tensor:
    """Signed ℓp distance to the nearest decision boundary, ignoring the [0,1] box:
    min over j≠y of (z_y - z_j) / ‖w_y - w_j‖_dual (negative when misclassified)."""
    with torch.no_grad():
        logits = model(x)
    gaps = logits.gather(1, y[:, None]) - logits
    w_diff = weight[y][:, None, :] - weight[None, :, :]
    dist = gaps / w_diff.norm(p=DUAL[norm], dim=2).clamp_min(1e-12)
    dist.scatter_(1, y[:, None], math.inf)
    return dist.amin(dim=1)
