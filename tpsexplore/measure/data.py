"""Data for fine-tuning and evaluation: an ImageFolder tree, an ImageNet-style labels file, or the
bundled offline proxy task built from scikit-learn's 1,797 real 8x8 handwritten digits, rendered small so a
ViT learns it on a CPU.

Two proxies, chosen by name (`DataSpec.proxy`):

- ``cluttered`` (default): each image is one digit at a random position and scale on a larger canvas, among
  dim fragments cut from other digits (`ClutterSpec`). Which tokens survive a reduction matters here, as on
  ImageNet: the digit covers about 12 to 30 of the 49 patches, somewhere different in every image. Train and
  validation are built from disjoint digits; the validation images are rendered once from the seed; the
  training images are rendered afresh for every batch (new placements and clutter: augmentation).
- ``digits``: the digit upscaled to fill the image (the original proxy; a couple of tokens solve it).

`build_datasets(spec, model)` returns ``(train, val, info)``. ``info`` describes the data (source,
classes, sizes, input geometry, token count, and for the proxy its definition: generator version, seed,
sizes); every result carries it, so a number measured on the proxy task can never pass for an ImageNet
number.
"""
from __future__ import annotations

import csv
import os
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

# The proxy task's geometry, chosen by measurement (benchmarks/proxy_pretrain.py): 56x56 / patch 8 (7x7 = 49
# patch tokens) keeps the pre-training and each search trial cheap on 2 CPU cores; on the original digits
# proxy an 8x8 grid (64 tokens: 48/p6, 64/p8, 32/p4) stayed below 85% in the time 56/p8 needed for 93-95%.
PROXY_IMG_SIZE = 56
PROXY_PATCH_SIZE = 8
#: PVT's canvas: its stages stride 4, 8, 16 and 32, so at 56 px its grids are 14/7/3/1 and the last stage holds one
#: token; at 64 px they are 16/8/4/2. Measured (800 steps, one thread, lr 7e-5): PVT-T 71.4% at 56 px (71.0% at
#: lr 5e-4), 93.3% at 64 px.
PROXY_IMG_SIZE_PVT = 64
PROXY_NUM_CLASSES = 10
PROXIES = ("cluttered", "digits")
PROXY_NAME = "cluttered"  # the default proxy
PROXY_VERSIONS = {"cluttered": 1, "digits": 1}  # bump when a proxy's images change
PROXY_TITLES = {"cluttered": "cluttered digits", "digits": "digits"}
PROXY_NOTES = {
    "cluttered": "proxy task: cluttered digits (scikit-learn's real 8x8 handwritten digits at random positions "
                 "and scales among fragments of other digits, 10 classes), not ImageNet",
    "digits": "proxy task: scikit-learn digits (1,797 real 8x8 handwritten digits, 10 classes), not ImageNet",
}
PROXY_NOTE = PROXY_NOTES[PROXY_NAME]
LABEL_COLUMNS = ("filename", "synset", "class_index")
MAX_CLASSES_IN_INFO = 100
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class DataSpec:
    """Which data to use and how much of it.

    path: an ImageFolder tree (``train/`` and ``val/`` class subfolders) or a flat folder of images with
    a labels file; None selects the offline proxy task named by ``proxy`` (see the module docstring).
    labels: the labels file of a flat folder (columns filename,synset,class_index; default
    ``path/labels.csv``). The train/val split of a flat folder and of the proxy's source digits is drawn
    from ``seed`` with ``val_fraction``; ``train_limit`` / ``val_limit`` keep a seed-fixed random subset
    (of the training digits and of the validation images for the cluttered proxy). num_classes: the
    allowed class-index range (default: the model's head). train_augment: timm's training transform for
    real images (else the eval transform); proxy_shift: random translation of ``digits`` proxy images, as
    a fraction of the image size (the cluttered proxy places its digits at random already).
    """

    path: str | None = None
    labels: str | None = None
    seed: int = 0
    val_fraction: float = 0.2
    train_limit: int | None = None
    val_limit: int | None = None
    num_classes: int | None = None
    train_augment: bool = True
    proxy_shift: float = 0.0
    proxy: str = PROXY_NAME

    def __post_init__(self) -> None:
        if self.proxy not in PROXIES:
            raise ValueError(f"proxy: {self.proxy!r}; allowed: {', '.join(PROXIES)}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction: {self.val_fraction} is outside (0, 1)")
        for name in ("train_limit", "val_limit", "num_classes"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}: {value!r} must be a positive integer or None")
        if not 0.0 <= self.proxy_shift < 0.5:
            raise ValueError(f"proxy_shift: {self.proxy_shift} is outside [0, 0.5)")
        if self.proxy_shift > 0 and self.proxy != "digits":
            raise ValueError(f"proxy_shift: {self.proxy_shift} applies to the 'digits' proxy only; the "
                             f"{self.proxy!r} proxy places its digits at random positions already")

    @property
    def is_proxy(self) -> bool:
        return self.path is None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- data set types
class TensorData(Dataset):
    """An in-memory data set of normalised images (N, 3, H, W) and labels (N,).

    `batch` gathers a whole batch with one indexing op (no per-image Python loop) and applies the
    optional random shift on the batch, drawing from the caller's generator.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, shift: float = 0.0, fill: float = 0.0,
                 indices: torch.Tensor | None = None) -> None:
        if images.dim() != 4 or images.shape[0] != labels.shape[0]:
            raise ValueError(f"images: shape {tuple(images.shape)} does not fit labels {tuple(labels.shape)}")
        self.images = images
        self.labels = labels
        self.shift = shift
        self.fill = fill
        self.indices = indices if indices is not None else torch.arange(labels.shape[0])  # into the source set

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])

    def batch(self, idx: torch.Tensor, generator: torch.Generator | None = None,
              augment: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.images[idx], self.labels[idx]
        if augment and self.shift > 0:
            x = random_shift(x, self.shift, generator, self.fill)
        return x, y


def random_shift(x: torch.Tensor, fraction: float, generator: torch.Generator | None, fill: float) -> torch.Tensor:
    """Translate each image by up to ``fraction`` of its size (bilinear, ``fill`` outside), vectorised."""
    b = x.shape[0]
    t = (torch.rand(b, 2, generator=generator) * 2 - 1) * (2 * fraction)  # grid units span [-1, 1]
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, :, 2] = t
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill


class ImageListData(Dataset):
    """Images on disk as (path, class index) pairs; every image is read as RGB (greyscale, CMYK converted)."""

    def __init__(self, samples: list[tuple[str, int]], transform: Callable | None = None,
                 classes: list[str] | None = None) -> None:
        self.samples = samples
        self.transform = transform
        self.classes = classes  # class index -> name (folder name or synset)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        from PIL import Image

        path, target = self.samples[i]
        with Image.open(path) as im:
            img = im.convert("RGB")
        if self.transform is not None:
            img = self.transform(img)
        return img, target

    @property
    def targets(self) -> list[int]:
        return [t for _, t in self.samples]


# ----------------------------------------------------------------------------- entry point
def build_datasets(spec: DataSpec, model: torch.nn.Module | None = None) -> tuple[Dataset, Dataset, dict[str, Any]]:
    """Build the (train, val) data sets for ``spec`` and the ``info`` dict that every result carries.

    The model gives the input size, the normalisation (timm's data config) and the class-index range.
    """
    if spec.is_proxy:
        return _proxy_datasets(spec, model)
    root = Path(spec.path)
    if not root.exists():
        raise FileNotFoundError(f"data: {str(root)!r} does not exist")
    if not root.is_dir():
        raise ValueError(f"data: {str(root)!r} is not a folder (expected train/ and val/ subfolders or "
                         "a folder of images with labels.csv)")
    limit = _class_limit(spec, model)
    if spec.labels is None and (root / "train").is_dir() and (root / "val").is_dir():
        train_s, val_s, classes, source = *_image_folder_samples(root), "imagefolder"
    else:
        labels = Path(spec.labels) if spec.labels else root / "labels.csv"
        if not labels.is_file():
            if spec.labels:
                raise FileNotFoundError(f"labels: {str(labels)!r} does not exist")
            raise ValueError(f"data: {str(root)!r} has neither train/ and val/ subfolders nor a labels.csv "
                             "(columns filename,synset,class_index)")
        samples, classes = _labels_file_samples(root, labels, limit)
        train_s, val_s = _split(samples, spec.val_fraction, spec.seed)
        source = "labels"
    num_classes = len(classes)
    if limit is not None and num_classes > limit:
        raise ValueError(f"num_classes: the data has {num_classes} classes but the model head has {limit}")
    train_s = _subset(train_s, spec.train_limit, spec.seed)
    val_s = _subset(val_s, spec.val_limit, spec.seed + 1)
    if not train_s or not val_s:
        raise ValueError(f"data: {str(root)!r} gives {len(train_s)} train and {len(val_s)} val images; "
                         "both must be non-empty")
    check_decodable(train_s[0][0])  # one image of each split, before any training or writing
    check_decodable(val_s[0][0])
    train_tf, val_tf, data_cfg = _transforms(model, spec.train_augment)
    info = _info(spec, source, num_classes, len(train_s), len(val_s), data_cfg, model)
    if num_classes <= MAX_CLASSES_IN_INFO:  # results carry info; 1,000 synsets live on the data sets only
        info["classes"] = classes
    info["warnings"] = split_warnings(train_s, val_s, classes)
    return ImageListData(train_s, train_tf, classes), ImageListData(val_s, val_tf, classes), info


def check_decodable(path: str) -> None:
    """Open and decode one image; a file PIL cannot read fails here with one line naming it."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.convert("RGB").load()
    except (OSError, ValueError, SyntaxError) as e:  # PIL.UnidentifiedImageError is an OSError
        raise ValueError(f"data: {path!r} cannot be decoded as an image ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:160]}); every image under --data must be readable by PIL") \
            from None


def chance_warning(correct: int, n: int, num_classes: int, what: str = "the unreduced baseline") -> str | None:
    """A warning when a top-1 of ``correct`` / ``n`` is not above chance (1 / num_classes): its 95% Wilson
    interval reaches down to chance. Such a baseline means the weights do not fit the data (wrong checkpoint,
    label order, or a head never trained on these classes), and every accuracy compared with it is noise."""
    from ..stats import wilson_interval

    if n <= 0 or num_classes < 2:
        return None
    chance = 1.0 / num_classes
    lo, hi = wilson_interval(int(correct), int(n))
    if lo > chance:
        return None
    return (f"accuracy: {what} scores {100.0 * correct / n:.1f}% top-1 on {n} validation images (95% interval "
            f"{100.0 * lo:.1f}-{100.0 * hi:.1f}%), not above chance ({100.0 * chance:.3g}% for {num_classes} "
            "classes): the weights do not fit this data, so accuracy comparisons in this study are meaningless")


def split_warnings(train_s: list[tuple[str, int]], val_s: list[tuple[str, int]], classes: list[str]) -> list[str]:
    """Why this split cannot measure what it should: validation classes that never appear in training
    (a fine-tune cannot learn them; typical of a flat folder with one or two images per class)."""
    seen = {t for _, t in train_s}
    val_classes = sorted({t for _, t in val_s})
    missing = [t for t in val_classes if t not in seen]
    if not missing:
        return []
    n_img = sum(1 for _, t in val_s if t not in seen)
    names = ", ".join(str(classes[t]) if t < len(classes) and classes[t] else str(t) for t in missing[:5])
    return [f"data: {len(missing)} of {len(val_classes)} validation classes ({names}"
            f"{', ...' if len(missing) > 5 else ''}; {n_img} of {len(val_s)} validation images) never appear in "
            "training: fine-tuning cannot learn them, so fine-tuned accuracy is capped; give more images per class "
            "or an ImageFolder with train/ and val/"]


# ----------------------------------------------------------------------------- proxy task
def proxy_img_size(backbone: str) -> int:
    """The proxy canvas a backbone trains on when the study sets none: `PROXY_IMG_SIZE`, `PROXY_IMG_SIZE_PVT` for
    PVT v1 and v2."""
    from ..backbones import resolve_name

    name = resolve_name(backbone)
    return PROXY_IMG_SIZE_PVT if name.startswith(("pvt_v1_", "pvt_v2_")) else PROXY_IMG_SIZE


def proxy_model_kwargs(img_size: int = PROXY_IMG_SIZE, patch_size: int = PROXY_PATCH_SIZE,
                       backbone: str | None = None) -> dict[str, int]:
    """timm overrides that build a backbone for the proxy task (its width and depth are kept). The hierarchical
    backbones (``backbone`` PVT v1/v2, CvT, Swin) have their own patch embeddings: no patch_size for them."""
    out = {"img_size": img_size, "patch_size": patch_size, "num_classes": PROXY_NUM_CLASSES}
    if backbone is not None:
        from ..backbones import is_hierarchical_name

        if is_hierarchical_name(backbone):
            del out["patch_size"]
    return out


@dataclass(frozen=True)
class ClutterSpec:
    """How the cluttered-digits proxy draws an image; sizes are fractions of the canvas side, so the task
    scales with the model's img_size (on the default 56 px canvas the digit is 28 to 42 px: 3.5 to 5.25
    patches of 8 px, at any sub-patch offset).

    digit_size: the digit's side, uniform in [lo, hi]; its position is uniform with the digit fully on the
    canvas. fragments: clutter fragments per image, uniform in [lo, hi]; each is a square crop of
    ``fragment_crop`` source pixels (of an 8x8 digit) from another digit of the same split, drawn at the
    image's digit scale at a uniform position, its ink scaled by ``fragment_intensity`` (uniform in [lo,
    hi]). The image is the pixelwise maximum of the digit and its fragments on a black background.
    val_images: size of the fixed validation set (the held-out digits cycled, each at several placements).

    The defaults were chosen by measurement (deit_t 56x56 / patch 8 from random init, batch 64, lr 5e-4):
    small digits (16-28 px) among bright 3x3-5x5 fragments stayed at chance (16% after 500 steps); small
    digits without clutter reached 60%; these larger digits among dim 2x2-4x4 fragments reach 64% after 500
    steps (warm-up 10%), 79% with a 30% warm-up, 94% after 1,500. On them the published-default random
    pruning at 35% of the GMACs scores 11 to 40 points below Top-K (more for better-trained models), zero-shot
    and after the search's fine-tune; Top-K keeping 1 patch token after block 4 costs only 2 to 5 points
    after the fine-tune (the class token has gathered the digit by then), on every design tried.
    """

    digit_size: tuple[float, float] = (0.5, 0.75)
    fragments: tuple[int, int] = (1, 3)
    fragment_crop: tuple[int, int] = (2, 4)
    fragment_intensity: tuple[float, float] = (0.3, 0.6)
    val_images: int = 4000

    def __post_init__(self) -> None:
        for name, lo_ok, hi_ok in (("digit_size", 0.0, 1.0), ("fragment_intensity", 0.0, 1.0)):
            lo, hi = getattr(self, name)
            if not lo_ok < lo <= hi <= hi_ok:
                raise ValueError(f"{name}: ({lo}, {hi}) must satisfy {lo_ok} < lo <= hi <= {hi_ok}")
        lo, hi = self.fragments
        if not 0 <= lo <= hi:
            raise ValueError(f"fragments: ({lo}, {hi}) must satisfy 0 <= lo <= hi")
        lo, hi = self.fragment_crop
        if not 1 <= lo <= hi <= 8:
            raise ValueError(f"fragment_crop: ({lo}, {hi}) must satisfy 1 <= lo <= hi <= 8 (source pixels)")
        if self.val_images < 1:
            raise ValueError(f"val_images: {self.val_images} must be >= 1")

    def describe(self, canvas: int) -> dict[str, Any]:
        """The definition as JSON-ready fields (with the digit size in pixels of this canvas)."""
        out: dict[str, Any] = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        out["digit_px"] = [round(f * canvas, 2) for f in self.digit_size]
        return out


# The cluttered proxy's definition, version PROXY_VERSIONS["cluttered"]: a change to it (or to the renderer,
# _RENDER_CHUNK included) must bump that version, which is part of the proxy cache key.
CLUTTER = ClutterSpec()
_RENDER_CHUNK = 256  # images per grid_sample call for a whole set (bounds memory; part of the set's definition)


class ClutteredData(TensorData):
    """The cluttered proxy's training set: a pool of one rendering per training digit (``images``, used
    when a batch is not augmented) and fresh renderings for augmented batches.

    ``batch(idx, generator, augment=True)`` draws the digits ``idx`` again at new positions and scales among
    new fragments (one vectorised grid_sample, no per-image loop), so every pass sees new images.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, digits: torch.Tensor,
                 clutter: ClutterSpec, mean: float, std: float) -> None:
        super().__init__(images, labels, 0.0, (0.0 - mean) / std, indices)
        self.digits, self.clutter, self.mean, self.std = digits, clutter, mean, std

    def batch(self, idx: torch.Tensor, generator: torch.Generator | None = None,
              augment: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        if not augment:
            return super().batch(idx, generator, augment)
        x = render_cluttered(self.digits, idx, self.images.shape[-1], self.clutter, generator)
        return _to_rgb(x, self.mean, self.std), self.labels[idx]


def render_cluttered(digits: torch.Tensor, index: torch.Tensor, size: int, clutter: ClutterSpec,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw ``digits[index]`` as cluttered images (B, 1, size, size), ink in [0, 1] on a black background.

    digits: (M, 8, 8) ink in [0, 1], the split's source digits; fragments come from the other M - 1.
    Every random draw comes from ``generator``, in a fixed order, so a seed fixes the images.
    """
    index = torch.as_tensor(index, dtype=torch.long).reshape(-1)
    b, m, src = index.numel(), digits.shape[0], digits.shape[-1]
    nf = clutter.fragments[1]

    def uniform(bounds: tuple[float, float], *shape: int) -> torch.Tensor:
        return bounds[0] + (bounds[1] - bounds[0]) * torch.rand(*shape, generator=generator)

    side = uniform(clutter.digit_size, b) * size                      # digit side, canvas px
    unit = side / src                                                  # canvas px per source px
    origin = torch.rand(b, 2, generator=generator) * (size - side)[:, None]
    count = torch.randint(clutter.fragments[0], nf + 1, (b,), generator=generator)
    other = (index[:, None] + torch.randint(1, max(m, 2), (b, nf), generator=generator)) % m
    crop = torch.randint(clutter.fragment_crop[0], clutter.fragment_crop[1] + 1, (b, nf), generator=generator)
    start = (torch.rand(b, nf, 2, generator=generator) * (src - crop + 1)[..., None]).floor()
    crop = crop.float()
    f_origin = torch.rand(b, nf, 2, generator=generator) * (size - crop * unit[:, None]).clamp_min(0)[..., None]
    ink = uniform(clutter.fragment_intensity, b, nf) * (torch.arange(nf) < count[:, None])
    # one draw call for the digit and its fragments: layer 0 is the whole digit, layers 1.. the crops
    layers = 1 + nf
    which = torch.cat([index[:, None], other], 1).reshape(-1)
    window = torch.cat([torch.zeros(b, 1, 2), start], 1).reshape(-1, 2)
    extent = torch.cat([torch.full((b, 1), float(src)), crop], 1).reshape(-1)
    place = torch.cat([origin[:, None], f_origin], 1).reshape(-1, 2)
    scale = unit[:, None].expand(b, layers).reshape(-1)
    drawn = _draw(digits[which][:, None], window, extent, place, scale, size).view(b, layers, size, size)
    weight = torch.cat([torch.ones(b, 1), ink], 1)[..., None, None]
    return (drawn * weight).amax(1, keepdim=True).clamp_(0.0, 1.0)


def _draw(src: torch.Tensor, window: torch.Tensor, extent: torch.Tensor, place: torch.Tensor, unit: torch.Tensor,
          size: int) -> torch.Tensor:
    """Draw the square window [window, window + extent) (source px) of each source image (N, 1, s, s) onto a
    black (N, 1, size, size) canvas with its top-left corner at ``place`` (canvas px, x then y), ``unit``
    canvas px per source px, bilinear."""
    s = src.shape[-1]
    centres = torch.arange(size, dtype=torch.float32) + 0.5
    sx = window[:, :1] + (centres - place[:, :1]) / unit[:, None]     # (N, size) source x of each canvas column
    sy = window[:, 1:] + (centres - place[:, 1:]) / unit[:, None]     # (N, size) source y of each canvas row
    in_x = (sx >= window[:, :1]) & (sx <= window[:, :1] + extent[:, None])
    in_y = (sy >= window[:, 1:]) & (sy <= window[:, 1:] + extent[:, None])
    gx, gy = sx * (2.0 / s) - 1.0, sy * (2.0 / s) - 1.0
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out * (in_y[:, :, None] & in_x[:, None, :])[:, None]


def _render_set(digits: torch.Tensor, index: torch.Tensor, size: int, clutter: ClutterSpec,
                generator: torch.Generator) -> torch.Tensor:
    """`render_cluttered` over a whole set, in chunks (a loop over a few chunks, not over images)."""
    out = torch.empty(index.numel(), 1, size, size)
    for i in range(0, index.numel(), _RENDER_CHUNK):
        out[i:i + _RENDER_CHUNK] = render_cluttered(digits, index[i:i + _RENDER_CHUNK], size, clutter, generator)
    return out


def _render_seed(name: str, part: str, seed: int) -> int:
    """The generator seed of one rendered set: fixed by proxy name, version, part and the data seed."""
    return zlib.crc32(f"{name}/v{PROXY_VERSIONS[name]}/{part}/{seed}".encode())


def _to_rgb(x: torch.Tensor, mean: float, std: float, inplace: bool = False) -> torch.Tensor:
    """Normalise (B, 1, H, W) ink and view it as 3 identical channels (an expand: no copy)."""
    x = x.sub_(mean).div_(std) if inplace else (x - mean) / std
    return x.expand(-1, 3, -1, -1)


def _source_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 digits: ink (1797, 8, 8) in [0, 1] and labels (1797,)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (torch.from_numpy(digits.images.astype(np.float32)) / 16.0,
            torch.from_numpy(digits.target.astype(np.int64)))


def _proxy_datasets(spec: DataSpec, model: torch.nn.Module | None) -> tuple[TensorData, TensorData, dict[str, Any]]:
    img_size = _model_img_size(model) or PROXY_IMG_SIZE
    limit = _class_limit(spec, model)
    if limit is not None and limit < PROXY_NUM_CLASSES:
        raise ValueError(f"num_classes: the {spec.proxy} proxy has {PROXY_NUM_CLASSES} classes but the model head "
                         f"has {limit}")
    x, y = _source_digits()
    train_idx, val_idx = _split(list(range(len(y))), spec.val_fraction, spec.seed)
    tr = torch.tensor(_subset(train_idx, spec.train_limit, spec.seed), dtype=torch.long)
    va = torch.tensor(val_idx, dtype=torch.long)
    mean, std = 0.5, 0.5
    fill = (0.0 - mean) / std  # background value after normalisation
    definition: dict[str, Any] = {"name": spec.proxy, "version": PROXY_VERSIONS[spec.proxy], "seed": spec.seed,
                                  "canvas": img_size, "source": "sklearn.datasets.load_digits (1,797 8x8 digits)",
                                  "val_fraction": spec.val_fraction}
    if spec.proxy == "digits":
        x = F.interpolate(x[:, None], size=(img_size, img_size), mode="bilinear", align_corners=False)
        x = _to_rgb(x.clamp_(0.0, 1.0), mean, std).contiguous()
        va = torch.tensor(_subset(val_idx, spec.val_limit, spec.seed + 1), dtype=torch.long)
        train = TensorData(x[tr], y[tr], spec.proxy_shift, fill, tr)
        val = TensorData(x[va], y[va], 0.0, fill, va)
        definition.update({"digit_px": [img_size, img_size], "shift": spec.proxy_shift,
                           "train_rendering": "fixed images"})
    else:  # "cluttered"
        clutter = CLUTTER
        which = torch.arange(clutter.val_images) % len(va)  # the held-out digits, cycled
        gen = torch.Generator().manual_seed(_render_seed(spec.proxy, "val", spec.seed))
        val_x = _render_set(x[va], which, img_size, clutter, gen)
        if spec.val_limit is not None and spec.val_limit < clutter.val_images:
            keep = torch.tensor(_subset(list(range(clutter.val_images)), spec.val_limit, spec.seed + 1))
            val_x, which = val_x[keep], which[keep]
        val = TensorData(_to_rgb(val_x, mean, std, inplace=True), y[va][which], 0.0, fill, va[which])
        gen = torch.Generator().manual_seed(_render_seed(spec.proxy, "train-pool", spec.seed))
        pool = _render_set(x[tr], torch.arange(len(tr)), img_size, clutter, gen)
        train = ClutteredData(_to_rgb(pool, mean, std, inplace=True), y[tr], tr, x[tr], clutter, mean, std)
        definition.update(clutter.describe(img_size))
        definition["train_rendering"] = "fresh positions, scales and fragments for every training batch"
    definition.update({"n_train_digits": len(tr), "n_val_digits": int(va.unique().numel()), "n_val": len(val)})
    data_cfg = {"input_size": (3, img_size, img_size), "mean": (mean,) * 3, "std": (std,) * 3,
                "interpolation": "bilinear", "crop_pct": 1.0}
    info = _info(spec, spec.proxy, PROXY_NUM_CLASSES, len(train), len(val), data_cfg, model)
    info["classes"] = [str(i) for i in range(PROXY_NUM_CLASSES)]
    info["note"] = PROXY_NOTES[spec.proxy]
    info["proxy"] = definition
    return train, val, info


# ----------------------------------------------------------------------------- real images
def _image_folder_samples(root: Path) -> tuple[list[tuple[str, int]], list[tuple[str, int]], list[str]]:
    classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
    if not classes:
        raise ValueError(f"data: {str(root / 'train')!r} has no class subfolders")
    val_classes = sorted(d.name for d in (root / "val").iterdir() if d.is_dir())
    extra = [c for c in val_classes if c not in classes]
    if extra:
        raise ValueError(f"data: val/ has classes not in train/: {', '.join(extra[:5])}")
    index = {c: i for i, c in enumerate(classes)}

    def scan(split: str) -> list[tuple[str, int]]:
        out = []
        for c in classes:
            folder = root / split / c
            if folder.is_dir():
                for dirpath, _, files in sorted(os.walk(folder)):
                    out += [(os.path.join(dirpath, f), index[c]) for f in sorted(files)
                            if f.lower().endswith(IMAGE_EXTENSIONS)]
        return out

    return scan("train"), scan("val"), classes


def _labels_file_samples(root: Path, labels: Path, limit: int | None) -> tuple[list[tuple[str, int]], list[str]]:
    with open(labels, newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        missing = [c for c in LABEL_COLUMNS if c not in columns]
        if missing:
            raise ValueError(f"labels: {str(labels)!r} lacks column(s) {', '.join(missing)}; "
                             f"has {', '.join(columns) or 'none'}; expected {','.join(LABEL_COLUMNS)}")
        rows = list(reader)
    if not rows:
        raise ValueError(f"labels: {str(labels)!r} lists no images")
    samples: list[tuple[str, int]] = []
    synsets: dict[int, str] = {}
    for line, row in enumerate(rows, start=2):
        name, synset, raw = row["filename"], row["synset"], row["class_index"]
        try:
            idx = int(raw)
        except (TypeError, ValueError):
            raise ValueError(f"class_index: {raw!r} (line {line} of {labels.name}) is not an integer") from None
        if idx < 0 or (limit is not None and idx >= limit):
            allowed = f"[0, {limit})" if limit is not None else ">= 0"
            raise ValueError(f"class_index: {idx} for {name!r} (line {line} of {labels.name}) is out of range "
                             f"{allowed}")
        if synsets.setdefault(idx, synset) != synset:
            raise ValueError(f"class_index: {idx} is given to two synsets, {synsets[idx]!r} and {synset!r} "
                             f"(line {line} of {labels.name})")
        path = root / name if name else root
        if not name or not path.is_file():
            raise FileNotFoundError(f"labels: {name!r} (line {line} of {labels.name}) is not a file in {str(root)!r}")
        samples.append((str(path), idx))
    n = limit if limit is not None else max(synsets) + 1
    classes = [synsets.get(i, "") for i in range(n)]
    return samples, classes


def _transforms(model: torch.nn.Module | None, train_augment: bool) -> tuple[Callable, Callable, dict[str, Any]]:
    """timm's eval and training transforms for the model's data config, at the model's input size."""
    from timm.data import create_transform, resolve_data_config

    args: dict[str, Any] = {}
    size = _model_img_size(model)
    if size is not None:
        args["input_size"] = (3, size, size)
    cfg = resolve_data_config(args, model=model) if model is not None else resolve_data_config(args)
    val_tf = create_transform(**cfg, is_training=False)
    if train_augment:
        keys = ("input_size", "interpolation", "mean", "std")
        train_tf = create_transform(**{k: cfg[k] for k in keys if k in cfg}, is_training=True)
    else:
        train_tf = val_tf
    return train_tf, val_tf, dict(cfg)


# ----------------------------------------------------------------------------- helpers
def _split(items: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """A seed-fixed random train/val split (numpy's PCG64, the same on every platform)."""
    perm = np.random.default_rng(seed).permutation(len(items))
    n_val = max(1, int(round(len(items) * val_fraction))) if len(items) > 1 else 0
    val = [items[i] for i in sorted(perm[:n_val])]
    train = [items[i] for i in sorted(perm[n_val:])]
    return train, val


def _subset(items: list, limit: int | None, seed: int) -> list:
    if limit is None or limit >= len(items):
        return items
    keep = np.random.default_rng(seed + 7919).choice(len(items), size=limit, replace=False)
    return [items[i] for i in sorted(keep)]


def _model_img_size(model: torch.nn.Module | None) -> int | None:
    pe = getattr(model, "patch_embed", None)
    size = getattr(pe, "img_size", None)
    if size is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}  # PVT v1/v2, CvT: the size they were built for
        return int(cfg["input_size"][-1]) if "input_size" in cfg else None
    return int(size[0]) if isinstance(size, (tuple, list)) else int(size)


def _class_limit(spec: DataSpec, model: torch.nn.Module | None) -> int | None:
    if spec.num_classes is not None:
        return spec.num_classes
    n = getattr(model, "num_classes", None)
    return int(n) if n else None


def _info(spec: DataSpec, source: str, num_classes: int, n_train: int, n_val: int, data_cfg: dict[str, Any],
          model: torch.nn.Module | None) -> dict[str, Any]:
    size = data_cfg.get("input_size", (3, None, None))
    info: dict[str, Any] = {
        "source": source,
        "path": spec.path,
        "labels": spec.labels,
        "seed": spec.seed,
        "num_classes": num_classes,
        "n_train": n_train,
        "n_val": n_val,
        "img_size": size[-1],
        "mean": list(data_cfg.get("mean", ())),
        "std": list(data_cfg.get("std", ())),
        "data_spec": spec.to_dict(),
    }
    pe = getattr(model, "patch_embed", None)
    if pe is not None and hasattr(pe, "num_patches"):  # a ViT's (PVT v2's overlapping embedding has no count)
        ps = pe.patch_size
        info["patch_size"] = int(ps[0]) if isinstance(ps, (tuple, list)) else int(ps)
        info["num_patches"] = int(pe.num_patches)
        info["num_tokens"] = int(pe.num_patches) + int(getattr(model, "num_prefix_tokens", 0))
    return info
