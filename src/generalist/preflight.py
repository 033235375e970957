"""What a run says before its first step: the first-hour traps, each as one line.

A config can be valid and still not do what its author thinks: an ``npz`` whose recipe was
chosen from its images, an image folder decoded at a size it was not stored at, float pixels
stored as uint8, a PGD attack too short to reach its ε, a validation split too small to choose
a model by. None of these is an error, so none stops the run; each is said once, at the start
of the run and by ``--dry-run``, with the key that changes it.
"""

from __future__ import annotations

from generalist.config.schema import MIN_VALIDATION_IMAGES, Config
from generalist.data.probe import probe_images
from generalist.errors import DataError
from generalist.presets import list_profiles, recipe_band

UINT8_ROUNDING = 1 / 510
"""Half a uint8 level in [0, 1]: the most a float pixel moves when stored as uint8."""


def start_notes(config: Config) -> list[str]:
    """The lines a run (or ``--dry-run``) prints before training; empty when all is plain."""
    notes = []
    recipe = _recipe_note(config)
    if recipe is not None:
        notes.append(recipe)
    notes += _image_notes(config)
    notes += attack_reach_warnings(config)
    return notes


def _recipe_note(config: Config) -> str | None:
    """Which band's recipe an ``npz``/``imagefolder`` run took, and what it came to."""
    data = config.data
    if data.dataset in list_profiles():
        return None
    found = recipe_band(data.dataset, data.data_dir)
    if found is None:
        return (
            f"recipe: no {data.dataset} images readable at {data.data_dir} yet, so the cifar10 "
            "recipe; change any of it with --set"
        )
    probe, band = found
    low, high = probe.sides
    size = f"{probe.side} px" + (f" ({low}-{high} px)" if low != high else "")
    linf = config.budgets.get("Linf")
    budget = f", Linf ε {linf.eps} in {linf.steps} steps" if linf is not None else ""
    return (
        f"recipe: {probe.source} holds {probe.channels}-channel {size} images, band "
        f"{band.name!r} ({band.rule}), so the {band.like} recipe; this run: {config.model.name}, "
        f"{config.epochs} epochs, batch {data.batch_size}{budget}; change any of it with --set"
    )


def _image_notes(config: Config) -> list[str]:
    data = config.data
    probe = probe_images(data.dataset, data.data_dir)
    if probe is None:
        return []
    if data.dataset == "npz":
        if probe.dtype == "uint8":
            return []
        return [
            f"data: {probe.source} holds {probe.dtype} pixels; they are stored as uint8 (256 "
            f"levels, as every dataset here), which moves each pixel by at most half a level, "
            f"{UINT8_ROUNDING:.5f}; save uint8 pixels (np.rint(x * 255)) to train on exactly "
            "what you store"
        ]
    size, side = data.image_size, probe.side
    spread = (
        f" (shorter sides from {probe.sides[0]} to {probe.sides[1]} px)"
        if probe.sides[0] != probe.sides[1]
        else ""
    )
    if size > side:
        return [
            f"warning: data.image_size={size} upsamples the {side}-px images of "
            f"{probe.source}{spread} {size / side:.1f}x, so every decode, step and attack costs "
            f"{(size / side) ** 2:.0f}x the pixels; --set data.image_size={side} decodes them "
            "at their own size"
        ]
    verb = "decoded at their own size" if size == side else f"downsampled to {size} px"
    return [f"data: images of {probe.source} are {side} px{spread}, {verb} (data.image_size)"]


def attack_reach_warnings(config: Config) -> list[str]:
    """A learner whose PGD cannot get from the clean image to the edge of its ε-ball:
    steps × step size < ε (ℓ∞ and ℓ2 steps move at most step size each)."""
    warnings = []
    for name, learner in config.learners.items():
        if learner.task.type == "natural":
            continue
        key = f"learners.{name}.task"
        threat, steps, step_size = config.threat_of(learner.task, key)
        reach = steps * step_size
        if threat.norm != "L1" and reach < threat.eps * (1 - 1e-9):
            warnings.append(
                f"warning: {key}: {steps} PGD steps of {step_size:.4g} reach {reach:.4g}, short "
                f"of ε = {threat.eps:.4g} ({threat}); the attack never gets to the edge of its "
                f"ball; write the step size relative to ε (budgets.{threat.norm}.step_size=eps/4 "
                f"or {key}.step_size=eps/4) or give more steps"
            )
    return warnings


def validation_split_warning(val_images: int, config: Config) -> str | None:
    """The line a run with a validation split under :data:`MIN_VALIDATION_IMAGES` starts with.

    ``data.val_size: 0`` asks for no split: the run validates nothing and selects no model,
    which is said here once. A positive size that leaves no image (a fraction that rounds to
    0) is an error: validation was asked for and would silently not happen.
    """
    val_size = config.data.val_size
    if val_size == 0:
        return (
            "data: data.val_size=0, so no validation split: no epoch is validated and no "
            f"model-best is chosen (eval.select={config.eval.select} is not used); the last model "
            "is the run's result"
        )
    if val_images == 0:
        raise DataError(
            f"data.val_size={val_size:g} leaves no validation image, which every epoch's "
            f"validation and the choice of model-best read; use a count such as "
            f"data.val_size={MIN_VALIDATION_IMAGES}"
        )
    if val_images >= MIN_VALIDATION_IMAGES:
        return None
    return (
        f"warning: the validation split holds {val_images} images (data.val_size={val_size:g}): "
        f"one image moves its accuracies by {100 / val_images:.1f} points, so model-best is "
        f"chosen mostly by chance; use data.val_size={MIN_VALIDATION_IMAGES} or more"
    )
