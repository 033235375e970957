"""PGD, MIM, CW-∞ and APGD: the attack contract, the registry, exactness on linear models, and
agreement with Croce & Hein's reference APGD (``pyautoattack``)."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    DUAL,
    distance_to_boundary,
    images_touching_the_box,
    linear_classifier,
    reference_start_noise,
    robust_flags,
    small_cnn,
)
from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted

from generalist.attacks import (
    APGD,
    APGDTargeted,
    ThreatModel,
    create_attack,
    list_attacks,
)
from generalist.attacks.apgd import checkpoint_lengths, dlr_loss
from generalist.attacks.mim_cw import cw_margin_loss
from generalist.errors import ConfigError

WHITE_BOX = ["pgd", "mim", "cw", "apgd-ce", "apgd-dlr", "apgd-t"]


# --- the contract every attack keeps ------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "threat"),
    [(name, threat) for name in WHITE_BOX for threat in ("Linf:0.3", "L2:2.0", "Linf:8/255")]
    + [(name, "L1:6.0") for name in ("pgd", "mim", "cw")],
)
def test_outputs_stay_in_the_ball_and_the_box_and_repeat(name, threat) -> None:
    attack = create_attack(name, threat, n_iter=10, seed=3)
    model = small_cnn().train()  # train mode must survive: the attack never switches modes
    x = images_touching_the_box()
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    y[::3] = (y[::3] + 1) % 10
    x_before = x.clone()

    x_adv = attack(model, x, y)

    assert model.training
    assert torch.equal(x, x_before)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (attack.threat.norms(x_adv - x) <= attack.threat.eps + 1e-6).all()
    assert torch.equal(attack(model, x, y), x_adv)  # deterministic under its seed
    if attack.threat.eps > 0.1:  # a large budget breaks this random model almost everywhere
        assert robust_flags(model, x_adv, y).float().mean() < 0.5
    if name.startswith("apgd"):
        assert torch.equal(x_adv[::3], x[::3])  # already misclassified: returned untouched


def test_seeds_matter_for_random_starts() -> None:
    model, x = small_cnn(), images_touching_the_box()
    y = torch.zeros(len(x), dtype=torch.long)
    for name in ("pgd", "apgd-ce"):
        first = create_attack(name, "L2:0.3", seed=0, n_iter=3)(model, x, y)
        assert not torch.equal(first, create_attack(name, "L2:0.3", seed=1, n_iter=3)(model, x, y))


# --- the registry and the records ---------------------------------------------------------------


def test_registry_names_parameters_and_records() -> None:
    assert list_attacks() == [
        "pgd", "mim", "cw", "apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square"
    ]  # fmt: skip
    assert create_attack("PGD-7", "Linf:8/255").steps == 7
    assert create_attack("pgd-7", "Linf:8/255", n_iter=50).steps == 7  # the name is explicit
    assert create_attack("pgd", "Linf:8/255", n_iter=50).steps == 50
    assert create_attack("apgd-t", "L2:0.5", n_iter=5).n_iter == 5
    assert create_attack("fab-t", "L2:0.5", n_iter=5).n_iter == 5
    assert create_attack("fab", "L2:0.5", n_restarts=5).targeted is False
    with pytest.raises(ConfigError, match="no parameter targeted"):
        create_attack("fab", "L2:0.5", targeted=True)  # the name says which FAB
    assert create_attack("square", "L2:0.5", n_iter=5).n_queries == 5000  # queries, not iterations
    assert create_attack("apgd-dlr", "L2:0.5").loss == "dlr"
    assert create_attack("cw", "Linf:0.1", kappa=5.0).kappa == 5.0
    for name in list_attacks():
        record = create_attack(name, "Linf:8/255", seed=4).describe()
        assert record["name"] == name and record["version"] and record["seed"] == 4
        assert record["threat"] == "Linf:8/255"
    for name in WHITE_BOX:
        record = create_attack(name, "Linf:8/255").describe()
        assert record["eps_text"] == "8/255" and record["eps"] == pytest.approx(8 / 255)
    assert create_attack("mim", "Linf:0.1").describe()["momentum"] == 1.0
    assert create_attack("cw", "Linf:0.1").describe()["kappa"] == 50.0
    assert create_attack("apgd-t", "Linf:0.1").describe()["n_target_classes"] == 9


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: create_attack("deepfool", "Linf:0.1"), "choose from pgd, mim, cw, apgd-ce"),
        (lambda: create_attack("apgd-ce", "Linf:0.1", steps=3), "apgd-ce has no parameter steps"),
        (lambda: create_attack("pgd-0", "Linf:0.1"), "steps must be at least 1"),
        (lambda: create_attack("apgd-ce", "L1:5"), "apgd-ce for L1 is not implemented"),
        (lambda: create_attack("apgd-t", "Linf:0.1", n_target_classes=0), "n_target_classes"),
        (lambda: create_attack("cw", "Linf:0.1", kappa=0), "kappa"),
        (lambda: create_attack("pgd", "Linf:0.1", n_iter=0), "n_iter must be at least 1"),
        (lambda: create_attack("pgd", "Lfoo:0.1"), "unknown norm"),
    ],
)
def test_bad_requests_fail_before_any_compute(call, message) -> None:
    with pytest.raises(ConfigError, match=message):
        call()


def test_dlr_losses_refuse_models_with_too_few_classes() -> None:
    model, x, y, _ = linear_classifier(2, 8)
    with pytest.raises(ConfigError, match=r"at least 3 classes.*use apgd-ce"):
        APGD("Linf:0.1", loss="dlr")(model, x, y)
    model, x, y, _ = linear_classifier(3, 8)
    with pytest.raises(ConfigError, match="at least 4 classes"):
        APGDTargeted("Linf:0.1")(model, x, y)


def test_losses_and_checkpoints_follow_the_papers() -> None:
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0], [0.0, 4.0, 2.0, 1.0]])
    y = torch.tensor([0, 0])
    assert torch.allclose(dlr_loss(logits, y), torch.tensor([-(3 - 1) / 3, -(0 - 4) / 3]))
    assert torch.allclose(cw_margin_loss(logits, y, kappa=50.0), torch.tensor([-2.0, 4.0]))
    assert torch.allclose(cw_margin_loss(logits, y, kappa=1.0), torch.tensor([-2.0, 1.0]))
    # p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06): 22, 41, 57, 70, 80, 87, 93, 99.
    assert checkpoint_lengths(100) == [22, 19, 16, 13, 10, 7, 6, 6]
    assert sum(checkpoint_lengths(10)) <= 10


# --- exactness on linear classifiers -------------------------------------------------------------


def linear_case(n_classes: int, norm: str):
    """A linear problem at the median distance ε: points within 2 % of the threshold are left
    out of exact comparisons (a step's rounding decides those)."""
    model, x, y, weight = linear_classifier(n_classes, 120)
    distance = distance_to_boundary(model, x, y, weight, norm)
    eps = distance[distance > 0].median().item()
    assert eps < 0.4  # below every point's room to the box: the closed form ignores the box
    clear = ((distance / eps) - 1).abs() > 0.02
    assert clear.float().mean() > 0.95
    return model, x, y, weight, distance, eps, clear


@pytest.mark.parametrize(
    ("name", "norm", "tolerance"),
    [
        ("pgd", "Linf", 1e-6),
        ("mim", "Linf", 1e-6),
        ("cw", "Linf", 1e-6),
        ("apgd-ce", "Linf", 1e-6),
        ("mim", "L2", 1e-4),
        ("apgd-ce", "L2", 1e-4),
        # From a random start, 20 fixed steps only partly rotate the perturbation onto w.
        ("pgd", "L2", 0.02),
        ("cw", "L2", 0.02),
    ],
)
def test_two_class_linear_model_gets_the_analytic_optimum(name, norm, tolerance) -> None:
    """The worst case in the ball is ε·sign(w_other − w_y) (ℓ∞) or ε·(w_other − w_y)/‖·‖₂ (ℓ2);
    a point survives iff its margin exceeds ε·‖w_y − w_other‖_dual."""
    model, x, y, weight, distance, eps, clear = linear_case(2, norm)
    x_adv = create_attack(name, f"{norm}:{eps}")(model, x, y)
    robust = robust_flags(model, x_adv, y)
    assert torch.equal(robust[clear], (distance > eps)[clear])

    w_diff = weight[1 - y] - weight[y]
    delta = (x_adv - x).flatten(1)
    if norm == "Linf":  # the optimum is unique and reached exactly on the surviving points
        assert (delta - eps * w_diff.sign())[robust].abs().max() <= tolerance
    # The attained increase of the wrong logit's lead, relative to the optimum ε·‖w_diff‖_dual.
    attained = (delta * w_diff).sum(dim=1) / (eps * w_diff.norm(p=DUAL[norm], dim=1))
    assert attained[robust].min() >= 1 - max(tolerance, 1e-5)  # float32 sums over 192 terms


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_ten_class_linear_model_exact_robust_accuracy(norm) -> None:
    """Margin-type losses (CW, DLR, targeted DLR) reach the exact robust accuracy; cross-entropy
    need not, since maximising it can favour a class other than the nearest boundary's, so
    the CE attacks are only required to be sound and close (measured: 4–6 of 120 missed)."""
    model, x, y, _, distance, eps, clear = linear_case(10, norm)
    truth = distance > eps
    for name in ("cw", "apgd-dlr", "apgd-t"):
        robust = robust_flags(model, create_attack(name, f"{norm}:{eps}")(model, x, y), y)
        assert torch.equal(robust[clear], truth[clear]), name
    for name in ("pgd", "mim", "apgd-ce"):
        robust = robust_flags(model, create_attack(name, f"{norm}:{eps}")(model, x, y), y)
        assert not (~robust & truth & clear).any(), name  # never breaks a robust point
        assert (robust & ~truth & clear).sum() <= 8, name


# --- APGD against PGD and against the reference ----------------------------------------------


@pytest.mark.parametrize(("norm", "eps"), [("Linf", 0.1), ("L2", 0.5)])
def test_apgd_is_at_least_as_strong_as_pgd_with_the_same_budget(digits_model, norm, eps) -> None:
    model, x, y = digits_model
    for steps in (10, 20):
        apgd = create_attack("apgd-ce", f"{norm}:{eps}", n_iter=steps)
        pgd_ = create_attack("pgd", f"{norm}:{eps}", n_iter=steps)
        assert (
            robust_flags(model, apgd(model, x, y), y).float().mean()
            <= robust_flags(model, pgd_(model, x, y), y).float().mean()
        )


@pytest.mark.parametrize(("norm", "eps"), [("Linf", 0.1), ("L2", 0.5), ("Linf", 0.05)])
@pytest.mark.parametrize("name", ["apgd-ce", "apgd-dlr", "apgd-t"])
def test_apgd_agrees_with_the_reference_point_for_point(digits_model, name, norm, eps) -> None:
    """Given the reference's start points (its seeded draws, through the ``start_noise`` hook),
    our APGD takes the same steps: every point's outcome is the reference's."""
    model, x, y = digits_model
    ours = create_attack(
        name, f"{norm}:{eps}", n_iter=100, start_noise=reference_start_noise(norm, seed=0)
    )(model, x, y)
    if name == "apgd-t":
        reference = APGDAttack_targeted(model, norm=norm, eps=eps, n_iter=100, seed=0, device="cpu")
    else:
        loss = name.removeprefix("apgd-")
        reference = APGDAttack(
            model, norm=norm, eps=eps, n_iter=100, seed=0, loss=loss, device="cpu"
        )
    x_ref = reference.perturb(x, y)
    ours_robust = robust_flags(model, ours, y)
    assert 0.1 < ours_robust.float().mean() < 0.9  # a budget where the comparison means something
    assert torch.equal(ours_robust, robust_flags(model, x_ref, y))
    assert ThreatModel.parse(f"{norm}:{eps}").norms(ours - x).max() <= eps + 1e-6


@pytest.mark.parametrize("name", ["apgd-ce", "apgd-t"])
def test_apgd_with_its_own_starts_matches_the_reference_in_accuracy(digits_model, name) -> None:
    """Our per-point starts are other draws than the reference's, from the same distribution:
    measured 1.0 pp apart (APGD-CE, 2 of 200 points) and 0.0 pp (APGD-T); tolerance 2 pp."""
    model, x, y = digits_model
    ours = create_attack(name, "Linf:0.1", n_iter=100, seed=0)(model, x, y)
    cls = APGDAttack_targeted if name == "apgd-t" else APGDAttack
    x_ref = cls(model, norm="Linf", eps=0.1, n_iter=100, seed=0, device="cpu").perturb(x, y)
    ours_acc = robust_flags(model, ours, y).float().mean().item()
    assert abs(ours_acc - robust_flags(model, x_ref, y).float().mean().item()) <= 0.02 + 1e-6


def test_eot_averages_the_gradient_over_samples() -> None:
    """With EoT the step follows the mean gradient of the samples: on a deterministic model
    the mean is the gradient itself, so EoT-20 takes the EoT-1 steps, at 20 times the passes."""
    model, x, y, _ = linear_classifier(10, 32, seed=1)
    plain = APGD("Linf:0.05", n_iter=10)(model, x, y)
    eot = APGD("Linf:0.05", n_iter=10, eot_iter=20)
    torch.testing.assert_close(eot(model, x, y), plain, rtol=0, atol=1e-6)
    assert eot.describe()["eot_iter"] == 20
