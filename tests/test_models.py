"""Model registry and architectures: what training, attacks and checkpoints rely on."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from generalist.errors import ConfigError
from generalist.models import (
    InputNormalization,
    NormalizedModel,
    count_parameters,
    create_model,
    list_models,
)

BIG_MODELS = {"wrn-28-10", "wrn-32-10", "wrn-34-10"}
# Small names cover every code path of the big ones (wrn-10-1 is the same class, 1 block, width 1).
FORWARD_MODELS = [*sorted(set(list_models()) - BIG_MODELS), "wrn-10-1", "wrn-16-2"]


def _batch(channels: int = 3, size: int = 32, n: int = 2) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(0))


def test_registry_lists_the_promised_names():
    assert {"tiny-cnn", "small-cnn", "resnet18", "preact-resnet18"} | BIG_MODELS <= set(
        list_models()
    )


@pytest.mark.parametrize("name", FORWARD_MODELS)
@pytest.mark.parametrize(("channels", "size"), [(3, 32), (1, 28), (1, 8)])
def test_forward_gives_one_logit_row_per_image(name, channels, size):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, in_channels=channels, image_size=size).eval()
    with torch.no_grad():
        logits = model(_batch(channels, size))
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", sorted(BIG_MODELS))
def test_big_models_build_for_any_class_count(name):
    model = create_model(name, num_classes=100)
    assert list(model.modules())[-1].out_features == 100


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("resnet18", 11_173_962),  # kuangliu / RobustBench CIFAR ResNet-18
        ("wrn-34-10", 46_160_474),  # TRADES / RobustBench WRN-34-10
        ("wrn-32-10", 46_160_474),  # Generalist's name for 5 blocks per stage, width 10
        ("wrn-28-10", 36_479_194),
    ],
)
def test_parameter_counts_match_the_literature(name, expected):
    assert count_parameters(create_model(name, num_classes=10)) == expected


def test_madry_mnist_cnn_is_the_mnist_challenge_network():
    # conv32 5x5 (832) + conv64 5x5 (51,264) + fc 7*7*64 -> 1024 (3,212,288) + fc 10 (10,250)
    model = create_model("madry-mnist-cnn", num_classes=10, in_channels=1, image_size=28)
    assert count_parameters(model) == 3_274_634
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size) for c in convs] == [(32, (5, 5)), (64, (5, 5))]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_small_cnn_matches_trades_on_mnist_and_adapts_to_digits():
    # TRADES' SmallCNN on 1x28x28 has 312,202 parameters (64*4*4 features into fc200).
    assert (
        count_parameters(create_model("small-cnn", num_classes=10, in_channels=1, image_size=28))
        == 312_202
    )
    digits = create_model("small-cnn", num_classes=10, in_channels=1, image_size=8).eval()
    assert digits(_batch(1, 8)).shape == (2, 10)
    with pytest.raises(ConfigError, match="at least 4x4"):
        create_model("small-cnn", num_classes=10, in_channels=1, image_size=3)


def test_generic_wrn_names_follow_the_depth_formula():
    # wrn-16-2: (16-4)/6 = 2 blocks per stage, widths 32/64/128.
    model = create_model("wrn-16-2", num_classes=10)
    assert len(model.stages) == 6
    assert model.classifier.in_features == 128
    # wrn-32-10 is special-cased to 5 blocks per stage, like wrn-34-10.
    assert len(create_model("wrn-32-10", num_classes=10).stages) == 15
    with pytest.raises(ConfigError, match="divisible by 6"):
        create_model("wrn-30-2", num_classes=10)


def test_unknown_name_error_lists_known_models_and_the_wrn_pattern():
    with pytest.raises(ConfigError) as info:
        create_model("resnet19", num_classes=10)
    message = str(info.value)
    assert "\n" not in message
    assert all(name in message for name in list_models())
    assert "wrn-DEPTH-WIDTH" in message


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_classes": 0},
        {"num_classes": 10, "in_channels": 0},
        {"num_classes": 10, "mean": [0.5, 0.5, 0.5]},
        {"num_classes": 10, "mean": [0.5, 0.5], "std": [0.2, 0.2]},
        {"num_classes": 10, "mean": [0.5] * 3, "std": [0.2, 0.0, 0.2]},
    ],
)
def test_bad_arguments_raise_one_line_config_errors(kwargs):
    with pytest.raises(ConfigError) as info:
        create_model("tiny-cnn", **kwargs)
    assert "\n" not in str(info.value)


def test_normalisation_inside_model_equals_manual_normalisation():
    mean, std = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]
    torch.manual_seed(0)
    plain = create_model("tiny-cnn", num_classes=10).eval()
    wrapped = create_model("tiny-cnn", num_classes=10, mean=mean, std=std).eval()
    assert isinstance(wrapped, NormalizedModel)
    assert wrapped[0] is wrapped.normalize and wrapped[1] is wrapped.net
    wrapped.net.load_state_dict(plain.state_dict())
    x = _batch()
    manual = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), plain(manual))
        assert not torch.allclose(wrapped(x), plain(x))  # the normalisation really is applied


def test_without_mean_std_the_bare_network_is_returned():
    model = create_model("tiny-cnn", num_classes=10)
    assert not any(isinstance(m, InputNormalization) for m in model.modules())


def test_normalisation_statistics_are_saved_with_the_weights():
    model = create_model("tiny-cnn", num_classes=10, mean=[0.5] * 3, std=[0.25] * 3)
    state = model.state_dict()
    torch.testing.assert_close(state["normalize.std"].flatten(), torch.full((3,), 0.25))
    assert "normalize.mean" in state


@pytest.mark.parametrize("name", FORWARD_MODELS)
def test_state_dict_is_safetensors_saveable_and_round_trips(name, tmp_path):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, image_size=8, mean=[0.5] * 3, std=[0.25] * 3)
    state = model.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    path = tmp_path / "weights.safetensors"
    save_file(state, str(path))  # refuses shared storage between tensors
    torch.manual_seed(1)
    fresh = create_model(name, num_classes=10, image_size=8, mean=[0.5] * 3, std=[0.25] * 3)
    fresh.load_state_dict(load_file(str(path)))
    x = _batch(size=8)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), model.eval()(x))


@pytest.mark.parametrize("name", FORWARD_MODELS)
def test_eval_mode_is_deterministic_and_accepts_channels_last(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, image_size=8)
    model.train()
    model(_batch(size=8, n=4))  # move BN running statistics away from their initial values
    model.eval()
    x = _batch(size=8)
    with torch.no_grad():
        first, second = model(x), model(x)
        channels_last = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(channels_last, first, rtol=1e-4, atol=1e-5)


def test_models_have_no_dropout():
    for name in FORWARD_MODELS:
        model = create_model(name, num_classes=10)
        assert not any(isinstance(m, nn.Dropout | nn.Dropout2d) for m in model.modules()), name


def test_tiny_cnn_has_batchnorm_buffers_for_merge_tests():
    state = create_model("tiny-cnn", num_classes=10).state_dict()
    assert any(key.endswith("running_mean") for key in state)
    assert any(key.endswith("num_batches_tracked") for key in state)
