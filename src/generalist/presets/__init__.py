"""Shipped recipes: method presets (the learners and the merge) and dataset profiles.

Method presets live in ``methods/<name>.yaml`` and may carry ``by_dataset`` sections for values
that differ per benchmark; dataset profiles in ``datasets/<name>.yaml`` hold what is standard for
a benchmark whatever the method (architecture, epochs, batch size, attack budgets).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from generalist.data.probe import ImageProbe, probe_images
from generalist.errors import ConfigError, cut


def _folder(kind: str) -> Any:
    return resources.files(__package__).joinpath(kind)


def _names(kind: str) -> list[str]:
    return sorted(p.name[:-5] for p in _folder(kind).iterdir() if p.name.endswith(".yaml"))


def list_presets() -> list[str]:
    return _names("methods")


def list_profiles() -> list[str]:
    return _names("datasets")


def _load(kind: str, name: str, what: str, known: list[str]) -> dict[str, Any]:
    if name not in known:
        raise ConfigError(f"unknown {what} {cut(name)}; choose one of {', '.join(known)}")
    return yaml.safe_load(_folder(kind).joinpath(f"{name}.yaml").read_text()) or {}


def load_method_preset(name: str) -> dict[str, Any]:
    return _load("methods", name, "preset", list_presets())


@dataclass(frozen=True)
class Band:
    """A resolution band of a user's own images and the benchmark whose recipe it takes."""

    name: str
    rule: str
    like: str
    """The dataset profile (and the method presets' ``by_dataset`` section) it uses."""


BANDS = (
    Band("tiny-gray", "1 channel, at most 16 px", "digits"),
    Band("small-gray", "1 channel, at most 32 px", "mnist"),
    Band("small", "at most 96 px", "cifar10"),
    Band("large", "over 96 px", "imagenet"),
)
"""Checked in order; the side is the images' shorter one. Digits-sized grey images get the
digits recipe (tiny-cnn), MNIST-sized ones MNIST's (small-cnn, ε∞ 0.3), colour or larger ones
up to 96 px CIFAR's (ResNet-18, ε∞ 8/255: also the usual recipe for 64-px Tiny-ImageNet and
96-px STL-10), and anything larger ImageNet's (ResNet-50, ε∞ 4/255, 3-step PGD)."""
IMAGENET_SIZES = (("data", "image_size"), ("data", "val_size"), ("eval", "test_examples"))
"""Profile keys that describe a benchmark's own data, not its recipe: a band leaves them out
(a folder decodes at its images' size; ImageNet's 10,000 validation images and 5,000 test
points would exceed a small folder)."""


def band_of(probe: ImageProbe) -> Band:
    if probe.channels == 1 and probe.side <= 16:
        return BANDS[0]
    if probe.channels == 1 and probe.side <= 32:
        return BANDS[1]
    return BANDS[2] if probe.side <= 96 else BANDS[3]


def dataset_profile(name: str, data_dir: str | Path | None = None) -> tuple[str, dict[str, Any]]:
    """``(recipe, profile)``: the dataset's own profile, or for a dataset without one (``npz``,
    ``imagefolder``) the profile of its images' band (:func:`band_of`, CIFAR-10's when the
    images cannot be looked at yet); ``recipe`` names the benchmark whose recipe it is."""
    known = list_profiles()
    if name in known:
        return name, _load("datasets", name, "dataset", known)
    probe = probe_images(name, data_dir)
    if probe is None:
        return "cifar10", _load("datasets", "cifar10", "dataset", known)
    like = band_of(probe).like
    profile = _load("datasets", like, "dataset", known)
    for section, key in IMAGENET_SIZES:
        profile.get(section, {}).pop(key, None)
    if name == "imagefolder":  # decode at the images' own size unless data.image_size says
        profile.setdefault("data", {})["image_size"] = probe.side
    return like, profile


def load_dataset_profile(name: str, data_dir: str | Path | None = None) -> dict[str, Any]:
    """The profile :func:`dataset_profile` picks."""
    return dataset_profile(name, data_dir)[1]


def recipe_band(name: str, data_dir: str | Path | None) -> tuple[ImageProbe, Band] | None:
    """The images of an ``npz``/``imagefolder`` dataset and the band whose recipe they took
    (None for a benchmark, whose recipe is its name, or for images not readable yet)."""
    if name in list_profiles():
        return None
    probe = probe_images(name, data_dir)
    return None if probe is None else (probe, band_of(probe))
