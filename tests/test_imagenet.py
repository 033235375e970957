"""ImageNet: ResNets in the published layout (so published weights load) and the recipe."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from generalist.config import build_config
from generalist.errors import ConfigError
from generalist.models import NormalizedModel, count_parameters, create_model
from generalist.presets import list_presets
from generalist.training.init import initialize_from

IMAGENET_STATS = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


@pytest.mark.parametrize(
    ("name", "parameters", "entries"),
    [("resnet50", 25_557_032, 320), ("resnet18-imagenet", 11_689_512, 122)],
)
def test_the_architectures_have_the_published_size_and_layout(name, parameters, entries):
    """The parameter counts torchvision documents for its ResNet-50 and ResNet-18, and its
    state-dict layout (entry count, names and shapes of the stem, a projection and the head)."""
    net = create_model(name, num_classes=1000, image_size=224)
    state = net.state_dict()
    assert count_parameters(net) == parameters and len(state) == entries
    assert state["conv1.weight"].shape == (64, 3, 7, 7)
    assert "bn1.num_batches_tracked" in state and "maxpool" in dict(net.named_children())
    if name == "resnet50":
        assert state["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
        assert state["layer4.2.conv3.weight"].shape == (2048, 512, 1, 1)
        assert state["fc.weight"].shape == (1000, 2048)
    else:
        assert "layer1.0.downsample.0.weight" not in state
        assert state["layer4.1.conv2.weight"].shape == (512, 512, 3, 3)
        assert state["fc.weight"].shape == (1000, 512)


def test_small_inputs_run_and_normalisation_lives_inside():
    model = create_model("resnet18-imagenet", num_classes=10, image_size=32, **IMAGENET_STATS)
    assert isinstance(model, NormalizedModel)
    assert model.eval()(torch.rand(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_bare_published_layout_weights_load_with_init_from(tmp_path, suffix):
    """What ``--init-from resnet50.pth`` does with a torchvision/timm file: the network's
    weights go inside this run's normalisation, exactly."""
    torch.manual_seed(1)
    published = create_model("resnet18-imagenet", num_classes=1000, image_size=64)
    path = tmp_path / f"weights{suffix}"
    state = published.state_dict()
    if suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save(state, path)
    torch.manual_seed(2)
    model = create_model("resnet18-imagenet", num_classes=1000, image_size=64, **IMAGENET_STATS)
    spec = {"name": "resnet18-imagenet", "num_classes": 1000}
    initialize_from(model, str(path), spec)
    for key, tensor in state.items():
        assert torch.equal(model.net.state_dict()[key], tensor)
    assert torch.equal(model.normalize.mean.flatten(), torch.tensor(IMAGENET_STATS["mean"]))


def test_weights_of_another_head_are_refused_in_one_line(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(create_model("resnet18-imagenet", num_classes=1000).state_dict(), path)
    model = create_model("resnet18-imagenet", num_classes=10)
    with pytest.raises(ConfigError, match=r"fc\.weight is \(1000, 512\), not \(10, 512\)"):
        initialize_from(model, str(path), {"name": "resnet18-imagenet", "num_classes": 10})


@pytest.mark.parametrize("preset", list_presets())
def test_every_method_preset_resolves_to_the_imagenet_recipe(preset):
    """ResNet-50 at 224 px, eps 4/255 with 3-step PGD, and lr 0.1 per 256 examples with weight
    decay 1e-4 for every learner, whatever the method's CIFAR optimizer."""
    unlabeled = ["data.unlabeled=rest", "data.train_limit=100"] if preset == "rst" else []
    config = build_config(preset, dataset="imagenet", overrides=unlabeled)
    assert (config.model.name, config.model.normalize, config.data.image_size) == (
        "resnet50",
        True,
        224,
    )
    assert (config.budgets["Linf"].eps, config.budgets["Linf"].steps) == ("4/255", 3)
    assert config.data.batch_size == 256 and config.epochs == 90
    for learner in config.learners.values():
        assert learner.optimizer.lr["points"][0] == [0, 0.1]
        assert learner.optimizer.weight_decay == 1e-4
