"""Short fine-tuning, evaluation and the proxy pre-training that stands in for ImageNet weights offline.

`finetune` is one training loop for all of it: AdamW, linear warm-up then cosine decay, cross-entropy
plus, when asked, DynamicViT/dTPS's ratio loss and distillation from the unreduced model (logit KL and a
token term over the student's surviving tokens). `evaluate` gives top-1/top-5. `proxy_backbone` trains an
unreduced backbone on the offline proxy task (cluttered digits by default) once and caches the checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..backbones import BackboneSpec, create_backbone, resolve_name
from ..manifest import atomic_write
from ..progressbar import progress_bar
from .data import PROXIES, PROXY_IMG_SIZE, PROXY_NAME, PROXY_PATCH_SIZE, PROXY_VERSIONS, DataSpec, TensorData, \
    build_datasets, proxy_model_kwargs
from .throughput import resolve_device

from ..reduce import ratio_loss

AMP_MODES = ("auto", "bf16", "fp16", "off")
TOKEN_LOSSES = ("kl", "mse")
PROXY_CACHE_VERSION = 2  # 2: the cluttered-digits proxy, length in steps; the key also holds PROXY_VERSIONS


def tps_lr(batch_size: int) -> float:
    """TPS's learning-rate rule: 2.5e-4 at batch 1024, scaled linearly with the batch size."""
    return batch_size / 1024 * 2.5e-4


@dataclass
class FinetuneConfig:
    """A short fine-tune: schedule, losses, precision.

    Length: ``steps``, else ``epochs`` (fractions allowed), else one epoch. lr None uses `tps_lr`.
    warmup_steps None warms up over ``warmup_fraction`` of the steps; the cosine decays to ``min_lr``.
    Weight decay skips biases, norms, cls_token and pos_embed unless ``wd_all_params`` (TPS's code
    decays every parameter). distill_weight / token_distill_weight: None gives 0.5 each when a teacher
    is passed. token_loss: 'kl' over the channel softmax (TPS) or 'mse' (DynamicViT). ratio_weight scales
    `tpsexplore.reduce.ratio_loss` (zero for methods without a learned predictor). amp: on GPU 'auto' =
    bf16 where supported, else fp16 with a GradScaler; on CPU 'auto' runs fp32 and only an explicit 'bf16'
    autocasts (with explicit attention, see `finetune`).
    """

    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 64
    lr: float | None = None
    weight_decay: float = 0.05
    wd_all_params: bool = False
    warmup_steps: int | None = None
    warmup_fraction: float = 0.1
    min_lr: float = 1e-6
    label_smoothing: float = 0.0
    distill_weight: float | None = None
    token_distill_weight: float | None = None
    token_loss: str = "kl"
    ratio_weight: float = 2.0
    grad_clip: float | None = None
    amp: str = "auto"
    device: str | None = None  # None/'auto': cuda when available
    seed: int = 0
    eval_batch_size: int = 256
    num_workers: int = 0
    progress: bool = True
    desc: str = "finetune"

    def __post_init__(self) -> None:
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise ValueError(f"steps: {self.steps!r} must be a positive integer or None")
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"epochs: {self.epochs!r} must be > 0 or None")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size: {self.batch_size!r} must be a positive integer")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr: {self.lr!r} must be a positive number or None")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction: {self.warmup_fraction} is outside [0, 1)")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"warmup_steps: {self.warmup_steps} must be >= 0")
        for name in ("weight_decay", "min_lr", "label_smoothing", "ratio_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: {getattr(self, name)} must be >= 0")
        for name in ("distill_weight", "token_distill_weight", "grad_clip"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name}: {value} must be >= 0 or None")
        if self.token_loss not in TOKEN_LOSSES:
            raise ValueError(f"token_loss: {self.token_loss!r}; allowed: {', '.join(TOKEN_LOSSES)}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp: {self.amp!r}; allowed: {', '.join(AMP_MODES)}")

    @property
    def base_lr(self) -> float:
        return self.lr if self.lr is not None else tps_lr(self.batch_size)

    def total_steps(self, n_train: int) -> int:
        if self.steps is not None:
            return self.steps
        per_epoch = _steps_per_epoch(n_train, self.batch_size)
        return max(1, math.ceil((self.epochs if self.epochs is not None else 1.0) * per_epoch))

    def warmup(self, total: int) -> int:
        if self.warmup_steps is not None:
            return min(self.warmup_steps, total)
        return int(round(self.warmup_fraction * total))


# ----------------------------------------------------------------------------- fine-tune
def finetune(model: torch.nn.Module, train: Dataset, val: Dataset | None = None, cfg: FinetuneConfig | None = None,
             teacher: torch.nn.Module | None = None) -> dict[str, Any]:
    """Fine-tune ``model`` in place on ``train`` and evaluate it on ``val``; return the run's record.

    Seeded: the same seed gives the same losses and accuracy on CPU. A non-finite loss raises
    FloatingPointError naming the step, so a search can record the failed trial. bf16 on CPU trains with
    timm's explicit attention: the fused CPU kernel's bf16 backward is slower than fp32 (measured on a
    2-core AMX Xeon: 1.09x vs 1.86x for the explicit form, deit_t 56 px batch 64).
    """
    cfg = cfg or FinetuneConfig()
    if len(train) == 0:
        raise ValueError("train: the training set is empty")
    if teacher is model:
        raise ValueError("teacher: pass a separate unreduced model, not the student itself")
    device = resolve_device(cfg.device or "auto")
    amp_dtype = amp_dtype_for(cfg.amp, device)
    w_kl = cfg.distill_weight if cfg.distill_weight is not None else (0.5 if teacher is not None else 0.0)
    w_tok = cfg.token_distill_weight if cfg.token_distill_weight is not None else (0.5 if teacher is not None else 0.0)
    if teacher is None and (w_kl > 0 or w_tok > 0):
        raise ValueError("teacher: distill_weight/token_distill_weight > 0 need a teacher model")
    model.to(device)
    if teacher is not None:
        teacher.to(device).eval()
    total = cfg.total_steps(len(train))
    warm = cfg.warmup(total)
    lr = cfg.base_lr
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay, cfg.wd_all_params), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine(total, warm, min(1.0, cfg.min_lr / lr)))
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype is torch.float16)
    names = ["loss", "ce", "ratio", "kl", "token"]
    history: list[list[float]] = []
    seen = 0
    was_training = model.training
    start = time.perf_counter()
    explicit = device.type == "cpu" and amp_dtype is torch.bfloat16
    with torch.random.fork_rng(devices=_rng_devices(device)), _explicit_attention(model, explicit):
        torch.manual_seed(cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)
        batches = _train_batches(train, cfg.batch_size, gen, cfg.num_workers, device)
        model.train()
        bar = progress_bar(total=total, desc=cfg.desc, unit="step", disable=not cfg.progress, file=sys.stderr)
        try:
            for step in range(total):
                x, y = next(batches)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with _autocast(device, amp_dtype):
                    parts = _losses(model, teacher, x, y, cfg, w_kl, w_tok)
                loss = parts[0]
                values = torch.stack([p.detach().float() for p in parts]).tolist()
                if not math.isfinite(values[0]):
                    shown = ", ".join(f"{n} {v:.4g}" for n, v in zip(names[1:], values[1:]))
                    kind = "NaN" if math.isnan(values[0]) else "inf"
                    raise FloatingPointError(f"loss: {kind} at step {step + 1} of {total} "
                                             f"(lr {sched.get_last_lr()[0]:.3g}; {shown}); lower the lr, "
                                             "clip gradients or use amp='bf16'/'off'")
                history.append(values)
                seen += y.shape[0]
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.grad_clip:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                scaler.step(opt)
                scaler.update()
                sched.step()
                bar.update(1)
                bar.set_postfix(loss=f"{values[0]:.3f}", refresh=False)
        finally:
            bar.close()
            batches.close()
            model.train(was_training)
    seconds = time.perf_counter() - start
    window = max(1, total // 10)
    record: dict[str, Any] = {
        "steps": total,
        "epochs": seen / len(train),
        "batch_size": cfg.batch_size,
        "lr": lr,
        "warmup_steps": warm,
        "weight_decay": cfg.weight_decay,
        "seed": cfg.seed,
        "device": str(device),
        "amp": _amp_name(amp_dtype),
        "teacher": teacher is not None,
        "weights": {"ce": 1.0, "ratio": cfg.ratio_weight, "kl": w_kl, "token": w_tok},
        "train_seconds": seconds,
        "images_per_s": seen / seconds if seconds > 0 else float("nan"),
        "losses": [h[0] for h in history],
        "loss_start": _mean([h[0] for h in history[:window]]),
        "loss_end": _mean([h[0] for h in history[-window:]]),
        "loss_parts": {n: _mean([h[i] for h in history[-window:]]) for i, n in enumerate(names) if i > 0},
    }
    if val is not None:
        record.update(evaluate(model, val, cfg.eval_batch_size, progress=cfg.progress, device=device,
                               amp=cfg.amp, num_workers=cfg.num_workers))
    return record


def _losses(model: torch.nn.Module, teacher: torch.nn.Module | None, x: torch.Tensor, y: torch.Tensor,
            cfg: FinetuneConfig, w_kl: float, w_tok: float) -> list[torch.Tensor]:
    """[total, ce, ratio, kl, token] for one batch (unweighted parts, weighted total)."""
    feats = model.forward_features(x)
    logits = model.forward_head(feats)
    ce = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
    zero = ce.new_zeros(())
    ratio = ratio_loss(model).float() if cfg.ratio_weight > 0 else zero  # zero for plain timm models
    kl = tok = zero
    if teacher is not None and (w_kl > 0 or w_tok > 0):
        with torch.no_grad():
            t_feats = teacher.forward_features(x)
            t_logits = teacher.forward_head(t_feats)
        if w_kl > 0:
            kl = F.kl_div(F.log_softmax(logits.float(), dim=-1), F.log_softmax(t_logits.float(), dim=-1),
                          reduction="batchmean", log_target=True)
        if w_tok > 0:
            tok = token_distill_loss(model, feats, t_feats, cfg.token_loss)
    total = ce + cfg.ratio_weight * ratio + w_kl * kl + w_tok * tok
    return [total, ce, ratio, kl, tok]


def surviving_tokens(model: torch.nn.Module, n: int, batch: int,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(token_ids (B, N), keep_mask (B, N) or None) of the last forward; arange and None for plain models."""
    info = getattr(model, "tps_last_info", None)  # None when not patched: every token survives in place
    ids = getattr(info, "token_ids", None)
    if ids is None:
        ids = torch.arange(n, device=device).expand(batch, n)
    return ids, getattr(info, "keep_mask", None)


def token_distill_loss(model: torch.nn.Module, s_feats: torch.Tensor, t_feats: torch.Tensor,
                       kind: str = "kl") -> torch.Tensor:
    """Distillation over the student's surviving patch tokens against the teacher's same-index tokens.

    Student token j stands for original token ``token_ids[:, j]`` (a squeezed or merged token keeps its
    host's index); EViT's fused token (index -1) and masked tokens (keep_mask <= 0.5) are left out.
    'kl': per-token KL(teacher || student) over the channel softmax, averaged over tokens (TPS);
    'mse': elementwise mean squared error (DynamicViT).
    """
    b, n, c = s_feats.shape
    p = getattr(model, "num_prefix_tokens", 1)
    ids, mask = surviving_tokens(model, n, b, s_feats.device)
    if tuple(ids.shape) != (b, n):
        raise ValueError(f"token_ids: shape {tuple(ids.shape)} does not match the student's tokens {(b, n)}")
    num_full = p + getattr(getattr(model, "patch_embed", None), "num_patches", t_feats.shape[1] - p)
    if t_feats.shape[1] != num_full:
        raise ValueError(f"teacher: outputs {t_feats.shape[1]} tokens, the token term needs the unreduced "
                         f"model's {num_full}")
    ids = ids[:, p:]
    weight = (ids >= 0).float()
    if mask is not None:
        weight = weight * (mask[:, p:] > 0.5).float()
    t_sel = torch.gather(t_feats, 1, ids.clamp_min(0).unsqueeze(-1).expand(-1, -1, c)).float()
    s_sel = s_feats[:, p:].float()
    if kind == "kl":
        per_token = F.kl_div(F.log_softmax(s_sel, dim=-1), F.log_softmax(t_sel, dim=-1), reduction="none",
                             log_target=True).sum(-1)
    elif kind == "mse":
        per_token = (s_sel - t_sel).pow(2).mean(-1)
    else:
        raise ValueError(f"token_loss: {kind!r}; allowed: {', '.join(TOKEN_LOSSES)}")
    return (per_token * weight).sum() / weight.sum().clamp_min(1.0)


# ----------------------------------------------------------------------------- evaluate
def evaluate(model: torch.nn.Module, val: Dataset, batch_size: int = 256, *, progress: bool = True,
             device: str | torch.device | None = None, amp: str = "auto", num_workers: int = 0) -> dict[str, Any]:
    """Top-1 / top-5 accuracy (fractions in [0, 1]) over ``val`` in eval mode under inference_mode.

    Also returns the counts (``n``, ``correct1``, ``correct5``) and ``top1_bits``: the per-image top-1
    correctness in the set's fixed order (a (n,) bool numpy array), so that two configs evaluated on the
    same set can be compared image by image (`tpsexplore.stats.mcnemar`).
    """
    if len(val) == 0:
        raise ValueError("val: the validation set is empty")
    device = resolve_device(device if device is not None else "auto")
    amp_dtype = amp_dtype_for(amp, device)
    was_training = model.training
    model.to(device).eval()
    hits1: list[torch.Tensor] = []
    correct5 = n = 0
    batches = _eval_batches(val, batch_size, num_workers, device)
    total = math.ceil(len(val) / batch_size)
    try:
        with torch.inference_mode(), _autocast(device, amp_dtype):
            for x, y in progress_bar(batches, total=total, desc="evaluate", unit="batch", disable=not progress,
                                     file=sys.stderr):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                logits = model(x)
                k = min(5, logits.shape[-1])
                top = logits.topk(k, dim=-1).indices
                hit = top == y[:, None]
                hits1.append(hit[:, 0].cpu())
                correct5 += int(hit.any(dim=-1).sum())
                n += y.shape[0]
    finally:
        model.train(was_training)
    bits = torch.cat(hits1).numpy().astype(bool)
    correct1 = int(bits.sum())
    return {"top1": correct1 / n, "top5": correct5 / n, "n": n, "correct1": correct1, "correct5": correct5,
            "top1_bits": bits}


# ----------------------------------------------------------------------------- proxy pre-training
@dataclass
class ProxyConfig:
    """How the unreduced backbone is pre-trained on the proxy task (from random init).

    proxy: the proxy's name (`tpsexplore.measure.data.PROXIES`; 'cluttered' by default, 'digits' the old
    one). Length: ``epochs`` (passes over the training digits) when set, else ``steps``; the cluttered
    proxy renders fresh training images for every batch, so an epoch is a pass over the digits, not over
    fixed images. The defaults are the measured recipe for deit_t at 56x56 / patch 8 on cluttered digits
    (benchmarks/proxy_pretrain.py, benchmarks/proxy_discrimination.py): 800 steps of batch 64, lr 5e-4,
    20% warm-up (900 steps gave 90.6%; 800 keep the main job within 15 minutes), between two measured
    schedules: stretched to 1,500 steps the recipe passed 85% val top-1 near step 750 and ended at 94.5%; cut to 500 steps it ends at 64% (79% with a 30% warm-up). lr None
    uses `proxy_lr` (wider models need a smaller lr from scratch: deit_s stays at chance with deit_t's lr).
    ``model_kwargs`` are extra timm overrides (e.g. depth, embed_dim for a tiny test model); they change
    the cache key.
    min_top1: below this the run raises instead of caching a poor stand-in (None: no check).
    amp: 'auto' pre-trains in bf16 where the hardware computes it natively (CUDA, or a CPU with AMX:
    1.86x per step on a 2-core Xeon), else fp32; evaluation stays fp32 on CPU.
    """

    img_size: int = PROXY_IMG_SIZE
    patch_size: int = PROXY_PATCH_SIZE
    proxy: str = PROXY_NAME
    steps: int = 800
    epochs: float | None = None
    batch_size: int = 64
    lr: float | None = None
    weight_decay: float = 0.05
    warmup_fraction: float = 0.2  # 160 of 800 steps: 30% beat 10% by 15 points at 500 steps (benchmarks/proxy_discrimination.py history)
    min_lr: float = 1e-6
    proxy_shift: float = 0.0
    train_limit: int | None = None
    val_limit: int | None = None
    min_top1: float | None = 0.85
    device: str | None = None
    amp: str = "auto"
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.proxy not in PROXIES:
            raise ValueError(f"proxy: {self.proxy!r}; allowed: {', '.join(PROXIES)}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps: {self.steps!r} must be a positive integer")
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"epochs: {self.epochs!r} must be > 0 or None")
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp: {self.amp!r}; allowed: {', '.join(AMP_MODES)}")

    def data_spec(self, seed: int) -> DataSpec:
        return DataSpec(path=None, seed=seed, train_limit=self.train_limit, val_limit=self.val_limit,
                        proxy_shift=self.proxy_shift, proxy=self.proxy)

    def finetune_config(self, seed: int, progress: bool) -> FinetuneConfig:
        """The pre-training run; amp 'auto' trains in bf16 wherever the hardware has it (AMX CPUs too)."""
        native = self.amp == "auto" and native_bf16(resolve_device(self.device or "auto"))
        return FinetuneConfig(steps=None if self.epochs is not None else self.steps, epochs=self.epochs,
                              batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay,
                              warmup_fraction=self.warmup_fraction, min_lr=self.min_lr, ratio_weight=0.0,
                              amp="bf16" if native else self.amp, device=self.device, seed=seed,
                              progress=progress, desc="proxy pre-train")

    @property
    def length(self) -> str:
        return f"{self.epochs:g} epochs" if self.epochs is not None else f"{self.steps} steps"


def proxy_weights_note(proxy: str) -> str:
    """What proxy-pretrained weights are, for every output that carries them."""
    return f"proxy-pretrained on {proxy} (scikit-learn digits), not ImageNet"


def proxy_lr(embed_dim: int) -> float:
    """From-scratch lr of the proxy recipe: 5e-4 at deit_t's width 192, scaled by (192 / width)^2."""
    return 5e-4 * (192 / embed_dim) ** 2


def default_cache_dir() -> Path:
    """$TPSEXPLORE_CACHE, else ~/.cache/tpsexplore."""
    return Path(os.environ.get("TPSEXPLORE_CACHE") or Path.home() / ".cache" / "tpsexplore")


def resolve_proxy_config(name: str, cfg: ProxyConfig) -> ProxyConfig:
    """``cfg`` with its defaults that depend on the backbone filled in (``lr`` None: `proxy_lr` of the width).

    The cache key is taken over the resolved config, so the search's fingerprint (computed before any
    training) and `proxy_backbone` name the same checkpoint.
    """
    if cfg.lr is not None:
        return cfg
    with torch.device("meta"):  # no weights, no init cost: only the width is needed
        model = create_backbone(name, weights="random",
                                **{**proxy_model_kwargs(cfg.img_size, cfg.patch_size, name), **cfg.model_kwargs})
    width = getattr(model, "embed_dim", None) or model.num_features  # PVT v1, CvT: last width
    from timm.models.swin_transformer import SwinTransformer

    if isinstance(model, SwinTransformer):  # its embed_dim is the first of four widths (96 ... 768 on Swin-T):
        width = math.sqrt(model.embed_dim * model.num_features)  # their geometric mean (271: lr 2.5e-4). Measured
        # on Swin-T's proxy: 2e-3 (first width) stays at chance; 3e-4 reaches 85% val top-1 after 300 steps, 3.1e-5
        # (last width) 52%
    return replace(cfg, lr=proxy_lr(width))


def proxy_cache_path(name: str, seed: int, cache_dir: str | Path, cfg: ProxyConfig) -> Path:
    """The checkpoint path, keyed by backbone, the proxy's definition (name, version: a change to the
    images bumps `PROXY_VERSIONS`), data and geometry, schedule (resolved: `resolve_proxy_config`) and seed."""
    cfg = resolve_proxy_config(name, cfg)
    timm_name = resolve_name(name)
    key = {"version": PROXY_CACHE_VERSION, "proxy_version": PROXY_VERSIONS[cfg.proxy], "timm_name": timm_name,
           "seed": seed, "data": cfg.data_spec(seed).to_dict(),
           "proxy": {k: v for k, v in asdict(cfg).items() if k != "device"}}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
    short = name if name.replace("_", "").isalnum() else timm_name
    return Path(cache_dir) / f"proxy-{short}-{cfg.proxy}{cfg.img_size}p{cfg.patch_size}-seed{seed}-{digest}.pt"


def proxy_backbone(name: str, seed: int = 0, cache_dir: str | Path | None = None, progress: bool = True,
                   cfg: ProxyConfig | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The unreduced backbone pre-trained on the proxy task: trained once, then loaded from the cache.

    It stands in for ImageNet weights offline; ``info['weights_note']`` says so. Pair it with
    ``build_datasets(DataSpec(**info['data_spec']), model)``, which gives the same held-out set.
    """
    cfg = cfg or ProxyConfig()
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    overrides = {**proxy_model_kwargs(cfg.img_size, cfg.patch_size, name), **cfg.model_kwargs}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the random init is part of what the cache key's seed fixes
        model = create_backbone(name, weights="random", **overrides)
    cfg = resolve_proxy_config(name, cfg)
    note = proxy_weights_note(cfg.proxy)
    path = proxy_cache_path(name, seed, cache_dir, cfg)
    if path.is_file():
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
            model.load_state_dict(obj["model"], strict=True)
            info = dict(obj["info"])
        except Exception as exc:  # noqa: BLE001 - a broken cache entry is retrained, not fatal
            warnings.warn(f"proxy: cache {str(path)!r} is unreadable ({type(exc).__name__}); retraining", stacklevel=2)
        else:
            info["cache"] = "loaded"
            if progress:
                print(f"proxy: loading cached {name} proxy weights from {path} "
                      f"(val top-1 {info.get('val_top1', float('nan')):.3f}, {note})", file=sys.stderr)
            _mark_proxy(model, name, path, cfg)
            return model, info
    spec = cfg.data_spec(seed)
    train, val, data_info = build_datasets(spec, model)
    if progress:
        tokens = data_info.get("num_patches")  # None for a hierarchical backbone: its stages set their own grids
        grid = f"patch {cfg.patch_size}, {tokens} patch tokens, " if tokens else ""
        print(f"proxy: training {name} on the {cfg.proxy} proxy ({cfg.img_size}x{cfg.img_size}, {grid}"
              f"{cfg.length}, lr {cfg.lr:.3g}, seed {seed}) from random init; it stands in for ImageNet weights; "
              f"cached at {path}",
              file=sys.stderr)
    record = finetune(model, train, val, cfg.finetune_config(seed, progress))
    if cfg.min_top1 is not None and record["top1"] < cfg.min_top1:
        raise RuntimeError(f"proxy: {name} reached val top-1 {record['top1']:.3f} < {cfg.min_top1} on the "
                           f"{cfg.proxy} proxy after {cfg.length}; nothing cached (raise steps or lr)")
    info = {
        "backbone": name,
        "timm_name": resolve_name(name),
        "weights": "proxy",
        "weights_note": note,
        "seed": seed,
        "val_top1": record["top1"],
        "val_top5": record["top5"],
        "n_val": record["n"],
        "val_correct": record["correct1"],
        "train_seconds": record["train_seconds"],
        "steps": record["steps"],
        "epochs": record["epochs"],
        "lr": cfg.lr,
        "device": record["device"],
        "img_size": cfg.img_size,
        "patch_size": cfg.patch_size,
        "num_patches": data_info.get("num_patches"),
        "num_tokens": data_info.get("num_tokens"),
        "proxy": data_info.get("proxy"),
        "data": {k: v for k, v in data_info.items() if k != "data_spec"},
        "data_spec": spec.to_dict(),
        "proxy_config": asdict(cfg),
        "checkpoint": str(path),
    }
    info = json.loads(json.dumps(info, default=str))  # plain types only: the cache loads with weights_only
    _atomic_save({"model": model.state_dict(), "info": info}, path)
    _mark_proxy(model, name, path, cfg)
    info["cache"] = "trained"
    return model, info


def _mark_proxy(model: torch.nn.Module, name: str, path: Path, cfg: ProxyConfig) -> None:
    model.tps_backbone = BackboneSpec(name, "checkpoint", str(path), cfg.img_size, cfg.patch_size,
                                      proxy_model_kwargs()["num_classes"])


def _atomic_save(obj: Any, path: Path) -> None:
    """torch.save through `tpsexplore.manifest.atomic_write`: readers never see a partial file."""
    atomic_write(path, lambda f: torch.save(obj, f))


# ----------------------------------------------------------------------------- helpers
def amp_dtype_for(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: None (fp32) with amp='off' and on CPU unless amp='bf16'; on GPU bf16 where
    supported for 'auto', else fp16."""
    if amp not in AMP_MODES:
        raise ValueError(f"amp: {amp!r}; allowed: {', '.join(AMP_MODES)}")
    if device.type == "cpu" and amp == "bf16":
        return torch.bfloat16
    if device.type != "cuda" or amp == "off":
        return None
    if amp == "bf16" or (amp == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def native_bf16(device: torch.device) -> bool:
    """True where bf16 matmuls run in hardware: CUDA with bf16 support, or a CPU with AMX tiles."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return device.type == "cpu" and bool(amx and amx())


@contextmanager
def _explicit_attention(model: torch.nn.Module, enabled: bool):
    """Within the block, timm attention modules use their explicit (non-fused) form; restored after."""
    saved = [(m, m.fused_attn) for m in model.modules() if enabled and isinstance(getattr(m, "fused_attn", None), bool)]
    for m, _ in saved:
        m.fused_attn = False
    try:
        yield
    finally:
        for m, fused in saved:
            m.fused_attn = fused


def _amp_name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def _rng_devices(device: torch.device) -> list[int]:
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def _param_groups(model: torch.nn.Module, wd: float, wd_all: bool) -> list[dict[str, Any]]:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("model: no trainable parameters")
    if wd_all or wd == 0:
        return [{"params": [p for _, p in params], "weight_decay": wd}]
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay = [p for n, p in params if p.ndim > 1 and n not in skip]
    no_decay = [p for n, p in params if p.ndim <= 1 or n in skip]
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def _warmup_cosine(total: int, warmup: int, min_ratio: float):
    """LR multiplier per step: linear warm-up from 1/(warmup+1) to 1, then cosine down to ``min_ratio``."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        t = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
    return factor


def _steps_per_epoch(n: int, batch_size: int) -> int:
    return max(1, n // batch_size) if n >= batch_size else 1


def _train_batches(data: Dataset, batch_size: int, gen: torch.Generator, num_workers: int,
                   device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless shuffled batches (full batches only when the set has at least one), epoch after epoch."""
    n = len(data)
    drop_last = n >= batch_size
    if isinstance(data, TensorData):
        while True:
            perm = torch.randperm(n, generator=gen)
            for i in range(_steps_per_epoch(n, batch_size)):
                yield data.batch(perm[i * batch_size:(i + 1) * batch_size], gen, augment=True)
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=gen, drop_last=drop_last,
                        num_workers=num_workers, pin_memory=device.type == "cuda",
                        persistent_workers=num_workers > 0)
    while True:
        yield from loader


def _eval_batches(data: Dataset, batch_size: int, num_workers: int,
                  device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(data, TensorData):
        for i in range(0, len(data), batch_size):
            yield data.images[i:i + batch_size], data.labels[i:i + batch_size]
        return
    yield from DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                          pin_memory=device.type == "cuda")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
