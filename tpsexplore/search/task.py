"""The task a search scores configs on: data, starting weights, evaluation and the short fine-tune.

Offline default: the cluttered-digits proxy task (`tpsexplore.measure.data`) with a backbone pre-trained on it
(`tpsexplore.measure.train.proxy_backbone`, trained once and cached). With ``--data PATH`` real images
are used (an ImageFolder tree or a labels file) with hub weights or ``--checkpoint PATH``.

Study-file tables used here: ``[model]`` timm overrides (img_size and patch_size set the proxy geometry,
the rest go to the backbone), ``[proxy]`` `ProxyConfig` fields, ``[train]`` `FinetuneConfig` fields plus
``distill`` (distil from the unreduced model), ``[dataset]`` `DataSpec` fields for real data (labels,
limits, split; the proxy's limits are ``[proxy]`` fields).
"""
from __future__ import annotations

import copy
import zlib
from dataclasses import asdict, fields
from typing import Any, Callable

import torch

from ..measure.data import DataSpec, TensorData, build_datasets
from ..measure.flops import ViTGeometry, model_geometry
from ..measure.train import FinetuneConfig, ProxyConfig, evaluate, finetune, proxy_backbone
from ..stats import Accuracy, eval_set_fingerprint
from .spec import SearchSettings

# lr 1e-4: measured on the proxy (40 steps, batch 64) it lifts reduced models (eTPS 0.93 -> 0.95, random pruning
# 0.47 -> 0.86 top-1) without hurting the converged baseline (3e-4 cost the baseline 2 points).
DEFAULT_FINETUNE = {"batch_size": 64, "lr": 1e-4, "warmup_fraction": 0.1, "weight_decay": 0.05}
_TRAIN_EXTRA = ("distill",)
_PROXY_FROM_MODEL = ("img_size", "patch_size")


def _check_keys(section: str, values: dict[str, Any], cls: type, extra: tuple[str, ...] = ()) -> None:
    known = {f.name for f in fields(cls)} | set(extra)
    for key in values:
        if key not in known:
            raise ValueError(f"{section}.{key}: unknown key; allowed: {', '.join(sorted(known))}")


class _CountingData(TensorData):
    """The proxy training set, calling ``hook(step)`` before each training batch (progress, Ctrl-C).

    Batches come from ``base`` itself, so a set that draws fresh images per batch (the cluttered proxy)
    keeps doing so during a trial's fine-tune.
    """

    def __init__(self, base: TensorData, hook: Callable[[int], None]) -> None:
        super().__init__(base.images, base.labels, base.shift, base.fill, base.indices)
        self.base, self.hook, self.step = base, hook, 0

    def batch(self, idx, generator=None, augment=False):
        self.step += 1
        self.hook(self.step)
        return self.base.batch(idx, generator, augment)


class _CountingDataset(torch.utils.data.Dataset):
    """Real-image training set wrapper: ``hook(step)`` every ``batch_size`` samples (num_workers=0)."""

    def __init__(self, base: Any, batch_size: int, hook: Callable[[int], None]) -> None:
        self.base, self.batch_size, self.hook, self.n = base, batch_size, hook, 0

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> Any:
        if self.n % self.batch_size == 0:
            self.hook(self.n // self.batch_size + 1)
        self.n += 1
        return self.base[i]


class Task:
    """Data, starting weights and the two measurements of accuracy a trial needs.

    Construction is cheap and checks the inputs (paths, section keys); `prepare` pre-trains or loads the
    weights and builds the data sets.
    """

    def __init__(self, settings: SearchSettings, device: torch.device) -> None:
        self.settings, self.device = settings, device
        self.proxy = settings.data is None
        if settings.checkpoint is not None and settings.data is None:
            raise ValueError("checkpoint: --checkpoint needs --data (real images); the offline proxy task uses "
                             "its own proxy-pretrained weights")
        for flag in ("data", "checkpoint"):
            path = getattr(settings, flag)
            if path is not None:
                from pathlib import Path

                if not Path(path).exists():
                    raise FileNotFoundError(f"{flag}: {path!r} does not exist")
        _check_keys("train", settings.train, FinetuneConfig, _TRAIN_EXTRA)
        _check_keys("proxy", settings.proxy, ProxyConfig)
        _check_keys("dataset", settings.dataset, DataSpec)
        if "path" in settings.dataset:
            raise ValueError("dataset.path: give the data path with --data / data = ... instead")
        model_kw = dict(settings.model)
        if self.proxy:
            geo = {k: model_kw.pop(k) for k in _PROXY_FROM_MODEL if k in model_kw}
            model_kw.pop("num_classes", None)
            proxy_kw = {**settings.proxy, **geo}
            if "img_size" not in proxy_kw:
                from ..measure.data import proxy_img_size

                proxy_kw["img_size"] = proxy_img_size(settings.backbone)
            proxy_kw["model_kwargs"] = {**proxy_kw.get("model_kwargs", {}), **model_kw}
            try:
                self.proxy_cfg = ProxyConfig(**{**proxy_kw, "device": str(device)})
            except TypeError as e:
                raise ValueError(f"proxy: {' '.join(str(e).split())}") from None
            from ..measure.data import proxy_model_kwargs

            self.model_kwargs = {**proxy_model_kwargs(self.proxy_cfg.img_size, self.proxy_cfg.patch_size,
                                                      settings.backbone),
                                 **self.proxy_cfg.model_kwargs}
        else:
            self.proxy_cfg = None
            self.model_kwargs = model_kw
        train_kw = {k: v for k, v in settings.train.items() if k not in _TRAIN_EXTRA}
        self.distill = bool(settings.train.get("distill", False))
        self.finetune_kwargs = {**DEFAULT_FINETUNE, **train_kw}
        try:
            FinetuneConfig(**{**self.finetune_kwargs, "steps": 1})
        except TypeError as e:
            raise ValueError(f"train: {' '.join(str(e).split())}") from None
        self.geometry: ViTGeometry = self._meta_geometry()
        self._state: dict[str, torch.Tensor] | None = None
        self.train_set = self.val_set = None
        self._subsets: dict[int, Any] = {}
        self._eval_sets: dict[int, str] = {}
        self.data_info: dict[str, Any] = {}
        self.weights_info: dict[str, Any] = {}
        if self.proxy:
            from ..measure.data import PROXY_TITLES
            from ..measure.train import default_cache_dir, proxy_cache_path

            cache = proxy_cache_path(settings.backbone, settings.seed, default_cache_dir(), self.proxy_cfg)
            grid = (f"patch {self.proxy_cfg.patch_size} ({self.geometry.num_patches} patches)"
                    if isinstance(self.geometry, ViTGeometry) else f"{self.geometry.name}'s own stage grids")
            self.data_description = (f"proxy: {PROXY_TITLES[self.proxy_cfg.proxy]} {self.proxy_cfg.img_size}x"
                                     f"{self.proxy_cfg.img_size} {grid}, seed {settings.seed}")
            self.weights_description = f"proxy-pretrained (cache {cache.name})"
        else:
            self.data_description = f"real: {settings.data}"
            self.weights_description = f"checkpoint: {settings.checkpoint}" if settings.checkpoint else \
                "random init (not pretrained)" if settings.weights == "random" else "hub pretrained"

    # ------------------------------------------------------------------ setup
    def _meta_geometry(self) -> ViTGeometry:
        """The backbone's `ViTGeometry`, or a `hier_flops.HierGeometry` for a hierarchical one (issue 13), read on
        `meta`."""
        from ..backbones import build_timm_model, is_hierarchical_name, resolve_name, vit_name

        hier = is_hierarchical_name(self.settings.backbone)  # PVT v1/v2, CvT: token reduction takes them
        name = resolve_name(self.settings.backbone) if hier else vit_name(self.settings.backbone)  # else: one line
        try:
            with torch.device("meta"):
                model = build_timm_model(name, **self.model_kwargs)
        except (TypeError, ValueError, AssertionError, RuntimeError) as e:
            raise ValueError(f"model: {self.model_kwargs} cannot build {name}: {' '.join(str(e).split())[:200]}") \
                from None
        return model_geometry(model)

    def prepare(self, progress: bool = True) -> None:
        """Pre-train (first time) or load the starting weights; build the data sets."""
        if self._state is not None:
            return
        s = self.settings
        if self.proxy:
            model, info = proxy_backbone(s.backbone, seed=s.seed, progress=progress, cfg=self.proxy_cfg)
            spec = DataSpec(**info["data_spec"])
            self.weights_info = {"source": "proxy-pretrained", "checkpoint": info.get("checkpoint"),
                                 "val_top1": info.get("val_top1"), "note": info.get("weights_note"),
                                 "cache": info.get("cache"), "train_seconds": info.get("train_seconds")}
        else:
            from ..backbones import create_backbone

            model = create_backbone(s.backbone, weights="checkpoint" if s.checkpoint else s.weights,
                                    checkpoint=s.checkpoint, **self.model_kwargs)
            spec = DataSpec(**{"seed": s.seed, **s.dataset, "path": s.data})
            source = "checkpoint" if s.checkpoint else "random" if s.weights == "random" else "hub"
            self.weights_info = {"source": source, "checkpoint": s.checkpoint}
        train, val, info = build_datasets(spec, model)
        self.train_set, self.val_set = train, val
        self.data_info = {k: v for k, v in info.items() if k != "classes"}
        self._state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self._template = model.to("cpu")

    # ------------------------------------------------------------------ per trial
    def new_model(self) -> torch.nn.Module:
        """A fresh copy of the starting model on the task's device, in eval mode."""
        if self._state is None:
            self.prepare(progress=False)
        model = copy.deepcopy(self._template)
        model.load_state_dict(self._state)
        return model.to(self.device).eval()

    def evaluate(self, model: torch.nn.Module, limit: int | None = None) -> dict[str, Any]:
        """Top-1/top-5 on the fixed validation set, or on its first ``limit`` images (the zero-shot gate's
        cheaper look); ``["accuracy"]`` is an `Accuracy` with per-image bits and the set's fingerprint."""
        val = self._val_subset(limit)
        out = evaluate(model, val, self.finetune_kwargs.get("eval_batch_size", 256), progress=False,
                       device=self.device, num_workers=self.finetune_kwargs.get("num_workers", 0))
        out["provenance"] = f"proxy-{self.proxy_cfg.proxy}" if self.proxy else "real-data"
        out["accuracy"] = Accuracy.from_bits(out.pop("top1_bits"), self._fingerprint(val))
        return out

    @property
    def eval_set(self) -> str:
        """Fingerprint of the fixed evaluation set: every trial of a study is scored on these images."""
        return self._fingerprint(self.val_set)

    def _val_subset(self, limit: int | None) -> Any:
        """The first ``limit`` validation images (all of them for None or a limit >= the set's size)."""
        val = self.val_set
        if limit is None or limit >= len(val):
            return val
        if limit not in self._subsets:
            if isinstance(val, TensorData):
                self._subsets[limit] = TensorData(val.images[:limit], val.labels[:limit], 0.0, val.fill,
                                                  val.indices[:limit])
            else:
                self._subsets[limit] = torch.utils.data.Subset(val, range(limit))
        return self._subsets[limit]

    def _fingerprint(self, val: Any) -> str:
        key = id(val)
        if key not in self._eval_sets:
            if isinstance(val, TensorData):
                fp = eval_set_fingerprint(val.labels.numpy(), val.indices.numpy())
            else:
                base, rows = (val.dataset, list(val.indices)) if isinstance(val, torch.utils.data.Subset) \
                    else (val, range(len(val)))
                samples = [base.samples[i] for i in rows]
                fp = eval_set_fingerprint([t for _, t in samples], [zlib.crc32(p.encode()) for p, _ in samples])
            self._eval_sets[key] = fp
        return self._eval_sets[key]

    def finetune(self, model: torch.nn.Module, steps: int, seed: int,
                 on_step: Callable[[int, float], None] | None = None) -> dict[str, Any]:
        """``steps`` of AdamW (CE + ratio loss for learned predictors; distillation if [train] distill)."""
        cfg = FinetuneConfig(**{**self.finetune_kwargs, "steps": steps, "seed": seed, "progress": False,
                                "device": str(self.device)})
        hook = (lambda step: on_step(step, 0.0)) if on_step is not None else (lambda step: None)
        if isinstance(self.train_set, TensorData):
            train = _CountingData(self.train_set, hook)
        elif cfg.num_workers == 0:
            train = _CountingDataset(self.train_set, cfg.batch_size, hook)
        else:  # loader worker processes must not write to the Optuna storage: no per-step progress then
            train = self.train_set
        teacher = self.new_model() if self.distill else None
        record = finetune(model, train, None, cfg, teacher=teacher)
        keep = ("steps", "epochs", "batch_size", "lr", "train_seconds", "loss_start", "loss_end", "amp")
        return {k: record[k] for k in keep if k in record}

    def describe(self) -> dict[str, Any]:
        return {"data": self.data_description, "weights": self.weights_description,
                "model_kwargs": self.model_kwargs, "finetune": self.finetune_kwargs, "distill": self.distill,
                "proxy": asdict(self.proxy_cfg) if self.proxy_cfg else None}
