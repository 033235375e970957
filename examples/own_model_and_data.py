"""Your own model and your own arrays, trained with Generalist-D, then evaluated.

    python examples/own_model_and_data.py          # 15 epochs on the 1,797 digits
    GENERALIST_EXAMPLES_TINY=1 python examples/...  # seconds: what the test suite runs

The arrays could come from anywhere: uint8 images (or floats in [0, 1]) shaped (N, C, H, W) and
integer labels. They are kept in the run directory (``data.npz``), so the run can be evaluated,
reported and resumed from the command line like any other.
"""

from __future__ import annotations

import os

import numpy as np
from my_nets import SmallNet
from sklearn.datasets import load_digits

import generalist

TINY = os.environ.get("GENERALIST_EXAMPLES_TINY") == "1"


def my_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Stand-in for your data: 8x8 digits as uint8 (N, 1, 8, 8) images and their labels."""
    digits = load_digits()
    x = np.rint(digits.images[:, None] * 255 / 16).astype(np.uint8)
    y = digits.target
    return x[:1400], y[:1400], x[1400:], y[1400:]


def main() -> None:
    x_train, y_train, x_test, y_test = my_arrays()
    overrides = {
        "epochs": 15,
        "budgets.Linf.eps": "0.1",
        "budgets.Linf.step_size": "0.025",
        "model.kwargs": {"width": 32},  # SmallNet's own arguments; the sizes come from the data
    }
    if TINY:
        overrides.update(
            {
                "epochs": 1,
                "data.train_limit": 256,
                "eval.test_examples": 64,
                "model.kwargs": {"width": 8},
            }
        )
    result = generalist.train(
        "generalist-d",
        data=(x_train, y_train, x_test, y_test),
        model=SmallNet,  # the class (or an instance, whose weights every learner starts from)
        overrides=overrides,
        out="runs",
        progress=not TINY,
    )
    n = 16 if TINY else len(x_test)
    table = generalist.evaluate(
        result.model,
        x_test[:n],
        y_test[:n],
        threats=["Linf:0.1"],
        n_iter=5 if TINY else None,  # AutoAttack standard; TINY shortens its iterations
    )
    print(table)
    print(
        f"clean {table.clean_accuracy:.1f} %, AutoAttack Linf:0.1 "
        f"{table.robust_accuracy['Linf:0.1']:.1f} % on {table.n_examples} test digits"
    )
    print(f"from the shell, in this folder: generalist eval {result.run.path}")


if __name__ == "__main__":
    main()
