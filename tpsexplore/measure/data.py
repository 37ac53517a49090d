"""Data for fine-tuning and evaluation: an ImageFolder tree, an ImageNet-style labels file, or the
bundled offline proxy task (scikit-learn's digits, rendered small so a ViT learns it on a CPU).

`build_datasets(spec, model)` returns ``(train, val, info)``. ``info`` describes the data (source,
classes, sizes, input geometry, token count); every result carries it, so a number measured on the
proxy task can never pass for an ImageNet number.
"""
from __future__ import annotations

import csv
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

# The proxy task's geometry, chosen by measurement (benchmarks/proxy_pretrain.py): the largest token count
# at which deit_t, trained from scratch, passes 90% val top-1 within 5 minutes on 2 CPU cores. 56x56 /
# patch 8 (7x7 = 49 patch tokens) reaches 93-95% in ~4.5 minutes (14 epochs); an 8x8 grid (64 tokens:
# 48/p6, 64/p8, 32/p4) stays below 85% in that time.
PROXY_IMG_SIZE = 56
PROXY_PATCH_SIZE = 8
PROXY_NUM_CLASSES = 10
PROXY_NAME = "digits"
PROXY_NOTE = "proxy task: scikit-learn digits (1,797 real 8x8 handwritten digits, 10 classes), not ImageNet"
LABEL_COLUMNS = ("filename", "synset", "class_index")
MAX_CLASSES_IN_INFO = 100
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class DataSpec:
    """Which data to use and how much of it.

    path: an ImageFolder tree (``train/`` and ``val/`` class subfolders) or a flat folder of images with
    a labels file; None selects the offline digits proxy task. labels: the labels file of a flat folder
    (columns filename,synset,class_index; default ``path/labels.csv``). The train/val split of a flat
    folder and of the proxy is drawn from ``seed`` with ``val_fraction``; ``train_limit`` / ``val_limit``
    keep a seed-fixed random subset. num_classes: the allowed class-index range (default: the model's
    head). train_augment: timm's training transform for real images (else the eval transform);
    proxy_shift: random translation of proxy images, as a fraction of the image size.
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

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction: {self.val_fraction} is outside (0, 1)")
        for name in ("train_limit", "val_limit", "num_classes"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}: {value!r} must be a positive integer or None")
        if not 0.0 <= self.proxy_shift < 0.5:
            raise ValueError(f"proxy_shift: {self.proxy_shift} is outside [0, 0.5)")

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
    train_tf, val_tf, data_cfg = _transforms(model, spec.train_augment)
    info = _info(spec, source, num_classes, len(train_s), len(val_s), data_cfg, model)
    if num_classes <= MAX_CLASSES_IN_INFO:  # results carry info; 1,000 synsets live on the data sets only
        info["classes"] = classes
    return ImageListData(train_s, train_tf, classes), ImageListData(val_s, val_tf, classes), info


# ----------------------------------------------------------------------------- proxy task
def proxy_model_kwargs(img_size: int = PROXY_IMG_SIZE, patch_size: int = PROXY_PATCH_SIZE) -> dict[str, int]:
    """timm overrides that build a backbone for the proxy task (its width and depth are kept)."""
    return {"img_size": img_size, "patch_size": patch_size, "num_classes": PROXY_NUM_CLASSES}


def _proxy_datasets(spec: DataSpec, model: torch.nn.Module | None) -> tuple[TensorData, TensorData, dict[str, Any]]:
    from sklearn.datasets import load_digits

    img_size = _model_img_size(model) or PROXY_IMG_SIZE
    limit = _class_limit(spec, model)
    if limit is not None and limit < PROXY_NUM_CLASSES:
        raise ValueError(f"num_classes: the digits proxy has {PROXY_NUM_CLASSES} classes but the model head "
                         f"has {limit}")
    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32))[:, None] / 16.0  # (1797, 1, 8, 8) in [0, 1]
    y = torch.from_numpy(digits.target.astype(np.int64))
    x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
    mean, std = 0.5, 0.5
    x = ((x - mean) / std).expand(-1, 3, -1, -1).contiguous()
    order = list(range(len(y)))
    train_idx, val_idx = _split(order, spec.val_fraction, spec.seed)
    train_idx = _subset(train_idx, spec.train_limit, spec.seed)
    val_idx = _subset(val_idx, spec.val_limit, spec.seed + 1)
    fill = (0.0 - mean) / std  # background value after normalisation
    tr = torch.tensor(train_idx, dtype=torch.long)
    va = torch.tensor(val_idx, dtype=torch.long)
    train = TensorData(x[tr], y[tr], spec.proxy_shift, fill, tr)
    val = TensorData(x[va], y[va], 0.0, fill, va)
    data_cfg = {"input_size": (3, img_size, img_size), "mean": (mean,) * 3, "std": (std,) * 3,
                "interpolation": "bilinear", "crop_pct": 1.0}
    info = _info(spec, PROXY_NAME, PROXY_NUM_CLASSES, len(train), len(val), data_cfg, model)
    info["classes"] = [str(i) for i in range(PROXY_NUM_CLASSES)]
    info["note"] = PROXY_NOTE
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
        return None
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
    if pe is not None:
        ps = pe.patch_size
        info["patch_size"] = int(ps[0]) if isinstance(ps, (tuple, list)) else int(ps)
        info["num_patches"] = int(pe.num_patches)
        info["num_tokens"] = int(pe.num_patches) + int(getattr(model, "num_prefix_tokens", 0))
    return info
