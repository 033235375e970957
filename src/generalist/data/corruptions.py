"""Common corruptions (Hendrycks & Dietterich, ICLR 2019) made at run time, per image.

Why not a library: the maintained packages (``imagecorruptions-imaug`` 1.1.5, the fork of
``imagecorruptions`` 1.1.2, and ``corrupt-tta``) hard-code ImageNet-C's 224-px constants
(Gaussian noise σ .08-.38, where CIFAR-10-C used .04-.10), draw from NumPy's global random
state (no per-image seed), refuse images under 32 px and pull in opencv-python (plus numba
for the fork); the original ``imagecorruptions`` 1.1.2 breaks on current scikit-image and
NumPy 2, and the original scripts need ImageMagick through Wand for motion blur and snow. So
the filters are written here on NumPy, SciPy (``scipy.ndimage``, which every one of those
packages also uses) and Pillow, following the published formulas, with the severity constants
of ``make_cifar_c.py`` for small images and of ``make_imagenet_c.py`` for ImageNet-sized ones.

What differs from the reference scripts, on purpose:

* every random draw comes from a generator seeded by (seed, corruption, severity, image
  index): an image gets the same pixels whatever the batch size, the number of examples or a
  resume (the reference scripts share one global stream, so theirs depend on the order);
* motion blur (also inside snow) is ImageMagick's kernel (a one-sided Gaussian along a random
  direction, edge pixels repeated) computed with NumPy instead of through Wand;
* ``frost`` is left out: it blends crops of six frost photographs that only the
  ``imagecorruptions`` packages ship (with opencv-python), see :data:`LEFT_OUT`.

These are *not* CIFAR-10-C: the noise and the random directions differ from the published
files, so numbers on ``generated`` compare models with each other, not with RobustBench.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from io import BytesIO

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from generalist.errors import ConfigError

CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)
"""The 15 corruptions of CIFAR-10-C / ImageNet-C, in the reference order (its file names)."""
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
LEFT_OUT: dict[str, str] = {
    "frost": "needs Hendrycks' six frost photographs, which only the imagecorruptions packages "
    "ship (with opencv-python); not generated",
}
GENERATED: tuple[str, ...] = tuple(name for name in CORRUPTIONS if name not in LEFT_OUT)
IMAGENET_FROM = 128
"""Images at least this many pixels a side get the ImageNet (224 px) constants, smaller ones
the CIFAR (32 px) constants: the two sizes the reference scripts were tuned for."""

# ------------------------------------------------------------------ severity constants
# One tuple per severity 1-5, as published in make_cifar_c.py and make_imagenet_c.py.

_CIFAR: dict[str, Sequence] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    "shot_noise": (500, 250, 100, 75, 50),
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),
    "glass_blur": ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),
    "motion_blur": ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),
    "zoom_blur": tuple(np.arange(1, top, 0.01) for top in (1.06, 1.11, 1.16, 1.21, 1.26)),
    "snow": (
        (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
        (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
        (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
        (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
    ),
    "fog": ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
    # (displacement scale, displacement smoothing σ, affine jitter), in pixels of a 32-px image
    "elastic_transform": tuple(
        (32 * a, 32 * b, 32 * c)
        for a, b, c in (
            (0, 0, 0.08),
            (0.05, 0.2, 0.07),
            (0.08, 0.06, 0.06),
            (0.1, 0.04, 0.05),
            (0.1, 0.03, 0.03),
        )
    ),
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),
    "jpeg_compression": (80, 65, 58, 50, 40),
}
_IMAGENET: dict[str, Sequence] = {
    "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),
    "shot_noise": (60, 25, 12, 5, 3),
    "impulse_noise": (0.03, 0.06, 0.09, 0.17, 0.27),
    "defocus_blur": ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)),
    "glass_blur": ((0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)),
    "motion_blur": ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15)),
    "zoom_blur": tuple(
        np.arange(1, top, step)
        for top, step in ((1.11, 0.01), (1.16, 0.01), (1.21, 0.02), (1.26, 0.02), (1.31, 0.03))
    ),
    "snow": (
        (0.1, 0.3, 3, 0.5, 10, 4, 0.8),
        (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
        (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
        (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
        (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55),
    ),
    "fog": ((1.5, 2), (2, 2), (2.5, 1.7), (2.5, 1.5), (3, 1.4)),
    "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),
    "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),
    # the reference multiplies by 244 (its comment: "should have been 224"); kept as published
    "elastic_transform": tuple(
        (244 * a, 244 * b, 244 * c)
        for a, b, c in (
            (2, 0.7, 0.1),
            (2, 0.08, 0.2),
            (0.05, 0.01, 0.02),
            (0.07, 0.01, 0.02),
            (0.12, 0.01, 0.02),
        )
    ),
    "pixelate": (0.6, 0.5, 0.4, 0.3, 0.25),
    "jpeg_compression": (25, 18, 15, 10, 7),
}
PROFILES: dict[str, dict[str, Sequence]] = {"cifar": _CIFAR, "imagenet": _IMAGENET}


def profile_for(image_size: int) -> str:
    """``cifar`` (constants for 32 px) below :data:`IMAGENET_FROM` pixels, else ``imagenet``."""
    return "imagenet" if image_size >= IMAGENET_FROM else "cifar"


def check_names(names: Sequence[str]) -> None:
    """One-line error for a name that is not one of the 15, or one that cannot be generated."""
    for name in names:
        if name not in CORRUPTIONS:
            raise ConfigError(f"unknown corruption {name!r}; choose from {', '.join(CORRUPTIONS)}")
        if name in LEFT_OUT:
            raise ConfigError(f"{name} cannot be generated: {LEFT_OUT[name]}")


def image_rng(seed: int, corruption: str, severity: int, index: int) -> np.random.Generator:
    """The generator of one corrupted image: (seed, corruption, severity, index) and nothing
    else, so batch size, subsets and resumes cannot change a single pixel."""
    key = [seed, CORRUPTIONS.index(corruption), severity, index]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(key)))


def corrupt_images(
    images: torch.Tensor,
    corruption: str,
    severity: int,
    *,
    seed: int,
    indices: Sequence[int],
    profile: str | None = None,
) -> torch.Tensor:
    """Corrupted copies of uint8 ``images`` (N, C, H, W); ``indices[i]`` is image i's index
    in the evaluated set (it seeds the image's generator). ``profile`` defaults to the one
    :func:`profile_for` picks from the image size."""
    check_names([corruption])
    if severity not in SEVERITIES:
        raise ConfigError(f"severity {severity}: use 1 to 5")
    if len(indices) != len(images):
        raise ConfigError(f"{len(images)} images but {len(indices)} indices; give one per image")
    profile = profile or profile_for(images.shape[-1])
    constant = PROFILES[profile][corruption][severity - 1]
    filter_ = _FILTERS[corruption]
    hwc = images.detach().cpu().permute(0, 2, 3, 1).numpy()
    out = np.stack(
        [
            _to_uint8(filter_(hwc[i], constant, image_rng(seed, corruption, severity, int(index))))
            for i, index in enumerate(indices)
        ]
    )
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _to_uint8(image: np.ndarray) -> np.ndarray:
    """[0, 255] floats to uint8 by truncation, as the reference scripts store their images."""
    return np.clip(image, 0, 255).astype(np.uint8)


# ------------------------------------------------------------------ helpers
# Images are (H, W, C) arrays, C = 1 or 3; filters return floats in [0, 255].


def _unit(image: np.ndarray) -> np.ndarray:
    return np.asarray(image, dtype=np.float64) / 255.0


def _blur(image: np.ndarray, sigma: float, *, mode: str = "nearest") -> np.ndarray:
    """A Gaussian blur of the two spatial axes only (scikit-image's ``gaussian`` defaults)."""
    return ndimage.gaussian_filter(image, sigma=(sigma, sigma, 0), mode=mode, truncate=4.0)


def _gray(image: np.ndarray) -> np.ndarray:
    """Luma (ITU-R 601, as OpenCV's RGB2GRAY), kept (H, W, 1); a grey image is its own luma."""
    if image.shape[2] == 1:
        return image
    return (image @ np.array([0.299, 0.587, 0.114]))[..., None]


def _clipped_zoom(image: np.ndarray, factor: float) -> np.ndarray:
    """Zoom into the centre by ``factor`` (bilinear), cropped back to the input size."""
    h, w = image.shape[:2]
    ch, cw = math.ceil(h / factor), math.ceil(w / factor)
    top, left = (h - ch) // 2, (w - cw) // 2
    zoomed = ndimage.zoom(image[top : top + ch, left : left + cw], (factor, factor, 1), order=1)
    trim_top, trim_left = (zoomed.shape[0] - h) // 2, (zoomed.shape[1] - w) // 2
    return zoomed[trim_top : trim_top + h, trim_left : trim_left + w]


def _gaussian_taps(sigma: float, size: int) -> np.ndarray:
    """OpenCV's ``getGaussianKernel(size, sigma)``: normalised, centred taps."""
    x = np.arange(size) - (size - 1) / 2
    taps = np.exp(-(x**2) / (2 * sigma**2))
    return taps / taps.sum()


def _disk(radius: float, alias_blur: float) -> np.ndarray:
    """The defocus kernel: an aliased disk, smoothed by a 3×3 (5×5 past radius 8) Gaussian."""
    half = 8 if radius <= 8 else int(radius)
    grid = np.arange(-half, half + 1)
    xx, yy = np.meshgrid(grid, grid)
    disk = (xx**2 + yy**2 <= radius**2).astype(np.float64)
    disk /= disk.sum()
    taps = _gaussian_taps(alias_blur, 3 if radius <= 8 else 5)
    return ndimage.correlate(disk, np.outer(taps, taps), mode="mirror")


def _motion_kernel(radius: float, sigma: float, angle: float) -> list[tuple[float, int, int]]:
    """ImageMagick's MotionBlurImage kernel: (weight, dy, dx) for each of 2⌈radius⌉+1 taps, a
    one-sided Gaussian along ``angle`` degrees."""
    width = 2 * math.ceil(radius) + 1
    weights = np.exp(-(np.arange(width) ** 2) / (2 * sigma**2))
    weights /= weights.sum()
    y, x = width * math.sin(math.radians(angle)), width * math.cos(math.radians(angle))
    hypot = math.hypot(x, y)
    return [
        (float(weights[i]), math.ceil(i * y / hypot - 0.5), math.ceil(i * x / hypot - 0.5))
        for i in range(width)
    ]


def _motion_blur(image: np.ndarray, radius: float, sigma: float, angle: float) -> np.ndarray:
    """Each pixel the weighted sum of the pixels along the kernel, edge pixels repeated."""
    h, w = image.shape[:2]
    rows, cols = np.arange(h), np.arange(w)
    out = np.zeros(image.shape, dtype=np.float64)
    for weight, dy, dx in _motion_kernel(radius, sigma, angle):
        out += weight * image[np.clip(rows + dy, 0, h - 1)][:, np.clip(cols + dx, 0, w - 1)]
    return out


def _plasma_fractal(size: int, decay: float, rng: np.random.Generator) -> np.ndarray:
    """A diamond-square height map in [0, 1] on a ``size`` × ``size`` grid (a power of two)."""
    heights = np.zeros((size, size))
    step, wibble = size, 100.0
    while step >= 2:
        half = step // 2
        corners = heights[0:size:step, 0:size:step]
        squares = corners + np.roll(corners, -1, axis=0)
        squares = squares + np.roll(squares, -1, axis=1)
        heights[half:size:step, half:size:step] = (
            squares / 4 + rng.uniform(-wibble, wibble, squares.shape) * wibble
        )
        centres = heights[half:size:step, half:size:step]
        corners = heights[0:size:step, 0:size:step]
        across = centres + np.roll(centres, 1, axis=0) + corners + np.roll(corners, -1, axis=1)
        heights[0:size:step, half:size:step] = (
            across / 4 + rng.uniform(-wibble, wibble, across.shape) * wibble
        )
        down = centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=0)
        heights[half:size:step, 0:size:step] = (
            down / 4 + rng.uniform(-wibble, wibble, down.shape) * wibble
        )
        step //= 2
        wibble /= decay
    heights -= heights.min()
    return heights / heights.max()


def _pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(image[..., 0] if image.shape[2] == 1 else image)


def _from_pil(picture: Image.Image, channels: int) -> np.ndarray:
    array = np.asarray(picture, dtype=np.float64)
    return array[..., None] if channels == 1 else array


# ------------------------------------------------------------------ the corruptions


def _gaussian_noise(image, sigma, rng):
    x = _unit(image)
    return np.clip(x + rng.normal(scale=sigma, size=x.shape), 0, 1) * 255


def _shot_noise(image, photons, rng):
    return np.clip(rng.poisson(_unit(image) * photons) / photons, 0, 1) * 255


def _impulse_noise(image, amount, rng):
    """Salt and pepper on each value independently (scikit-image's ``random_noise`` s&p)."""
    x = _unit(image)
    flipped = rng.random(x.shape) <= amount
    salt = rng.random(x.shape) <= 0.5
    x[flipped & salt], x[flipped & ~salt] = 1.0, 0.0
    return x * 255


def _defocus_blur(image, constant, rng):
    kernel = _disk(*constant)
    x = _unit(image)
    channels = [ndimage.correlate(x[..., c], kernel, mode="mirror") for c in range(x.shape[2])]
    return np.clip(np.stack(channels, axis=2), 0, 1) * 255


def _glass_blur(image, constant, rng):
    """Blur, then swap each pixel with a random neighbour within ``delta`` (sequentially, bottom
    right to top left, ``iterations`` times), then blur again."""
    sigma, delta, iterations = constant
    x = (_blur(_unit(image), sigma) * 255).astype(np.uint8)
    h, w = x.shape[:2]
    for _ in range(iterations):
        rows, cols = range(h - delta, delta, -1), range(w - delta, delta, -1)
        offsets = rng.integers(-delta, delta, size=(len(rows), len(cols), 2))
        for i, row in enumerate(rows):
            for j, col in enumerate(cols):
                dx, dy = offsets[i, j]
                other = (row + dy, col + dx)
                x[row, col], x[other] = x[other].copy(), x[row, col].copy()
    return np.clip(_blur(x / 255.0, sigma), 0, 1) * 255


def _motion_blur_image(image, constant, rng):
    radius, sigma = constant
    blurred = _motion_blur(np.asarray(image, dtype=np.float64), radius, sigma, rng.uniform(-45, 45))
    return np.round(np.clip(blurred, 0, 255))  # ImageMagick hands back 8-bit pixels


def _zoom_blur(image, factors, rng):
    x = _unit(image)
    total = x + sum(_clipped_zoom(x, factor) for factor in factors)
    return np.clip(total / (len(factors) + 1), 0, 1) * 255


def _snow(image, constant, rng):
    loc, scale, zoom, threshold, radius, sigma, keep = constant
    x = _unit(image)
    h, w = x.shape[:2]
    flakes = rng.normal(loc=loc, scale=scale, size=(h, w, 1))
    flakes = _clipped_zoom(flakes, zoom)
    flakes[flakes < threshold] = 0
    flakes = (np.clip(flakes, 0, 1) * 255).astype(np.uint8).astype(np.float64)  # an 8-bit layer
    flakes = np.round(_motion_blur(flakes, radius, sigma, rng.uniform(-135, -45))) / 255
    x = keep * x + (1 - keep) * np.maximum(x, _gray(x) * 1.5 + 0.5)
    return np.clip(x + flakes + np.rot90(flakes, k=2), 0, 1) * 255


def _fog(image, constant, rng):
    strength, decay = constant
    x = _unit(image)
    h, w = x.shape[:2]
    size = 1 << (max(h, w) - 1).bit_length()  # the next power of two
    peak = x.max()
    x = x + strength * _plasma_fractal(size, decay, rng)[:h, :w, None]
    return np.clip(x * peak / (peak + strength), 0, 1) * 255


def _brightness(image, shift, rng):
    """Raise HSV value by ``shift``: with hue and saturation fixed every channel scales with V
    (a black pixel, saturation 0, becomes grey)."""
    x = _unit(image)
    value = x.max(axis=2, keepdims=True)
    raised = np.clip(value + shift, 0, 1)
    scaled = np.divide(
        x * raised, value, out=np.broadcast_to(raised, x.shape).copy(), where=value > 0
    )
    return np.clip(scaled, 0, 1) * 255


def _contrast(image, factor, rng):
    x = _unit(image)
    means = x.mean(axis=(0, 1), keepdims=True)
    return np.clip((x - means) * factor + means, 0, 1) * 255


def _affine_reflect(x: np.ndarray, jitter: float, rng: np.random.Generator) -> np.ndarray:
    """The random affine warp: three points around the centre moved by up to ``jitter`` px,
    bilinear, borders mirrored (OpenCV's getAffineTransform + warpAffine, REFLECT_101)."""
    h, w = x.shape[:2]
    centre = np.array([w // 2, h // 2], dtype=np.float64)
    side = min(h, w) // 3
    src = np.array([centre + side, [centre[0] + side, centre[1] - side], centre - side])
    dst = src + rng.uniform(-jitter, jitter, size=src.shape).astype(np.float32)
    forward = np.linalg.solve(np.c_[src, np.ones(3)], dst).T  # (x, y) -> (x', y'), 2×3
    inverse = np.linalg.inv(np.r_[forward, [[0, 0, 1]]])
    # scipy maps output (row, col) to input (row, col): swap x/y of the inverse transform
    matrix = inverse[[1, 0]][:, [1, 0]]
    offset = inverse[[1, 0], 2]
    return np.stack(
        [
            ndimage.affine_transform(x[..., c], matrix, offset=offset, order=1, mode="mirror")
            for c in range(x.shape[2])
        ],
        axis=2,
    )


def _elastic_transform(image, constant, rng):
    scale, smoothing, jitter = constant
    x = _affine_reflect(_unit(image), jitter, rng)
    h, w, c = x.shape
    field = [
        ndimage.gaussian_filter(
            rng.uniform(-1, 1, size=(h, w)), smoothing, mode="reflect", truncate=3
        )
        * scale
        for _ in range(2)
    ]
    dx, dy = (f.astype(np.float32)[..., None] for f in field)
    cols, rows, planes = np.meshgrid(np.arange(w), np.arange(h), np.arange(c))
    coordinates = [(rows + dy).reshape(-1), (cols + dx).reshape(-1), planes.reshape(-1)]
    warped = ndimage.map_coordinates(x, coordinates, order=1, mode="reflect").reshape(x.shape)
    return np.clip(warped, 0, 1) * 255


def _pixelate(image, factor, rng):
    h, w = image.shape[:2]
    small = _pil(image).resize((int(w * factor), int(h * factor)), Image.Resampling.BOX)
    return _from_pil(small.resize((w, h), Image.Resampling.BOX), image.shape[2])


def _jpeg_compression(image, quality, rng):
    buffer = BytesIO()
    _pil(image).save(buffer, "JPEG", quality=quality)
    with Image.open(buffer) as decoded:
        return _from_pil(decoded.convert("L" if image.shape[2] == 1 else "RGB"), image.shape[2])


_FILTERS: dict[str, Callable[[np.ndarray, object, np.random.Generator], np.ndarray]] = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "defocus_blur": _defocus_blur,
    "glass_blur": _glass_blur,
    "motion_blur": _motion_blur_image,
    "zoom_blur": _zoom_blur,
    "snow": _snow,
    "fog": _fog,
    "brightness": _brightness,
    "contrast": _contrast,
    "elastic_transform": _elastic_transform,
    "pixelate": _pixelate,
    "jpeg_compression": _jpeg_compression,
}
