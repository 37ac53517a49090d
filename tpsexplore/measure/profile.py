"""Profile one reduction config: GMACs, parameters, throughput, energy and accuracy, with provenance.

`profile(ProfileConfig)` returns one JSON-ready dict; `format_profile` renders it as the table that
`tpsexplore profile` prints.

``runtime`` says what the speed is measured on; the reduced model and the baseline always run side by side on the
same runtime, through the same paired protocol (`measure_pair`):

- ``eager``: the PyTorch modules as they are;
- ``compile``: ``torch.compile(fullgraph=True, dynamic=False)`` of each (`tpsexplore.deploy.compile_model`), compiled
  for every batch size before the protocol's own warm-up, so compilation is never timed;
- ``onnxruntime``: each exported to ONNX with a fixed batch per batch size (`tpsexplore.deploy.export_onnx`: every
  shape static, as one deploys for a known batch) and run by an onnxruntime CPU session with torch's thread count,
  wrapped in `OnnxRuntimeModule` so the protocol times it like any module. fp32 on the CPU only.

Accuracy is always measured on the eager modules (the exported forms give the same logits: tests/test_deploy.py).
"""
from __future__ import annotations

import copy
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..backbones import create_backbone
from ..reduce import ReductionConfig, apply
from ..reduce.schedule import check_merge_r, distinct_counts
from ..stats import Accuracy, PairedDifference, PairedTest, format_accuracy, format_difference, paired_difference
from .data import DataSpec, build_datasets, chance_warning
from .environment import environment_info
from .flops import analytic_macs, analytic_params, geometry, geometry_from_model, traced_macs
from .throughput import Speedup, ThroughputConfig, ThroughputResult, measure_pair, resolve_device
from .train import FinetuneConfig, ProxyConfig, evaluate, finetune, proxy_backbone


RUNTIMES = ("eager", "compile", "onnxruntime")


@dataclass
class ProfileConfig:
    """What to profile and how hard to measure it.

    data None uses the offline digits proxy task with proxy-pretrained weights (trained once, cached;
    ``proxy`` overrides the pre-training recipe and geometry); with data, weights come from the timm hub
    (``weights='pretrained'``), a ``checkpoint`` or random init.
    finetune_steps 0 skips the fine-tune (zero-shot only). runtime: eager, compile or onnxruntime (module
    docstring); compile and onnxruntime default to fp32 only, and onnxruntime measures on the CPU.
    """

    backbone: str
    reduction: ReductionConfig
    data: str | None = None
    labels: str | None = None
    checkpoint: str | None = None
    weights: str = "pretrained"
    finetune_steps: int = 50
    finetune_batch: int = 64
    distill: bool = False
    device: str = "auto"
    batch_sizes: tuple[int, ...] | None = None
    dtypes: tuple[str, ...] | None = None
    window_s: float | None = None
    windows: int | None = None
    val_limit: int | None = None
    train_limit: int | None = None
    seed: int = 0
    cache_dir: str | None = None
    proxy: ProxyConfig | None = None
    progress: bool = True
    runtime: str = "eager"

    def __post_init__(self) -> None:
        if self.finetune_steps < 0:
            raise ValueError(f"finetune_steps: {self.finetune_steps} must be >= 0")
        check_runtime(self.runtime, self.dtypes, self.device)
        if self.data is not None and self.weights == "pretrained" and self.checkpoint:
            self.weights = "checkpoint"

    def throughput_config(self, device: torch.device) -> ThroughputConfig:
        """The full protocol (>= 10 warm-up iterations and >= 1 s, windows of >= 2 s) on every device; on CPU
        fewer cells (batch 1 and 64; fp32 and bf16, since CPU fp16 kernels are slow emulation) and 3 windows
        instead of 5, so that a profile stays interactive."""
        gpu = device.type == "cuda"
        eager = self.runtime == "eager"
        return ThroughputConfig(
            batch_sizes=tuple(self.batch_sizes or ((1, 64, 256) if gpu else (1, 64))),
            dtypes=tuple(self.dtypes or (("fp32",) if not eager else ("fp32", "bf16", "fp16") if gpu
                                         else ("fp32", "bf16"))),
            window_s=self.window_s if self.window_s is not None else 2.0,
            windows=self.windows if self.windows is not None else (5 if gpu else 3),
            warmup_s=1.0, device=str(device), progress=self.progress)


def check_runtime(runtime: str, dtypes: tuple[str, ...] | None = None, device: str = "auto") -> str:
    """``runtime`` when it is known and fits the dtypes and device, else a one-line ValueError."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime: {runtime!r} is not supported; allowed: {', '.join(RUNTIMES)}")
    if runtime == "onnxruntime":
        if dtypes and tuple(dtypes) != ("fp32",):
            raise ValueError(f"dtypes: {','.join(dtypes)} with --runtime onnxruntime; the exported model runs in "
                             "fp32 (allowed: fp32)")
        if str(device) not in ("auto", "cpu"):
            raise ValueError(f"device: {device!r} with --runtime onnxruntime; onnxruntime is measured on the CPU "
                             "here (allowed: cpu, auto)")
    return runtime


class OnnxRuntimeModule(nn.Module):
    """onnxruntime sessions as one module, so that the throughput protocol times them like any model.

    ``sessions`` maps a batch size to the session of the model exported at that fixed batch (None: a
    dynamic-batch session for any other). Input: a float image batch; output: the logits as a CPU tensor.
    ``patch_embed`` is the exported model's, so the protocol reads the input geometry from it. ``paths``: the
    ONNX file of each session (same keys), for tools that open their own session (e.g. to profile it).
    """

    def __init__(self, sessions: dict[int | None, Any], patch_embed: nn.Module,
                 paths: dict[int | None, Path] | None = None) -> None:
        super().__init__()
        self.sessions = sessions
        self.paths = dict(paths or {})
        self.patch_embed = copy.deepcopy(patch_embed)  # geometry only (img_size, proj.in_channels); never run

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..deploy import run_onnx

        session = self.sessions.get(int(x.shape[0]), self.sessions.get(None))
        if session is None:
            raise ValueError(f"batch_size: {int(x.shape[0])} was not exported; exported: "
                             f"{', '.join(str(b) for b in self.sessions)}")
        return run_onnx(session, x)


def runtime_model(model: nn.Module, runtime: str, batch_sizes: tuple[int, ...], folder: str | Path,
                  device: torch.device | str = "cpu", name: str = "model") -> tuple[nn.Module, dict[str, Any]]:
    """``model`` in the form ``runtime`` runs it, and what was done to get there.

    eager: the module itself. compile: `tpsexplore.deploy.compile_model` (fullgraph, ``dynamic=False``), then one
    call per batch size so that the graphs exist before any timing. onnxruntime: exported once per batch size with
    that fixed batch into ``folder`` (``<name>_bs<B>.onnx``; it must outlive the module) and loaded into an
    onnxruntime CPU session with torch's intra-op thread count.
    """
    check_runtime(runtime, None, str(device))
    info: dict[str, Any] = {"name": runtime}
    if runtime == "eager":
        return model, info
    from .. import deploy

    t0 = time.perf_counter()
    if runtime == "compile":
        model.to(device)
        compiled = deploy.compile_model(model, dynamic=False)
        with torch.inference_mode():
            for b in batch_sizes:
                compiled(deploy.example_input(model, b))
        info.update(backend="inductor", fullgraph=True, dynamic=False, compile_s=time.perf_counter() - t0,
                    note="compiled for every batch size before timing (one graph per batch size)")
        return compiled, info
    import onnxruntime as ort

    threads = torch.get_num_threads()
    model.to("cpu")
    sessions: dict[int | None, Any] = {}
    paths: dict[int | None, Path] = {}
    for b in batch_sizes:
        paths[b] = deploy.export_onnx(model, Path(folder) / f"{name}_bs{b}.onnx", batch_size=b)
        sessions[b] = deploy.onnxruntime_session(paths[b], threads=threads, providers=["CPUExecutionProvider"])
    info.update(onnxruntime=ort.__version__, opset=deploy.DEFAULT_OPSET, providers=["CPUExecutionProvider"],
                intra_op_threads=threads, batch="fixed: one export per batch size (every shape static)",
                graph_optimization="ORT_ENABLE_ALL", export_s=time.perf_counter() - t0)
    return OnnxRuntimeModule(sessions, model.patch_embed, paths), info


@contextmanager
def runtime_models(baseline: nn.Module, model: nn.Module, runtime: str, batch_sizes: tuple[int, ...],
                   device: torch.device | str = "cpu") -> Iterator[tuple[nn.Module, nn.Module, dict[str, Any]]]:
    """The baseline and the reduced model both in the form ``runtime`` runs them (`runtime_model`), with what
    was done to get there; exported files live in a temporary folder removed on exit."""
    with tempfile.TemporaryDirectory(prefix="tpsx-runtime-") as tmp:
        t0 = time.perf_counter()
        run_base, info = runtime_model(baseline, runtime, batch_sizes, tmp, device, "baseline")
        run_model, _ = runtime_model(model, runtime, batch_sizes, tmp, device, "model")
        for key in ("compile_s", "export_s"):  # both models' preparation
            if key in info:
                info[key] = time.perf_counter() - t0
        yield run_base, run_model, info


def load_model_and_data(cfg: ProfileConfig) -> tuple[torch.nn.Module, Any, Any, dict[str, Any], dict[str, Any]]:
    """The unreduced backbone with its weights, and (train, val) data with their descriptions."""
    if cfg.data is None:
        model, winfo = proxy_backbone(cfg.backbone, seed=cfg.seed, cache_dir=cfg.cache_dir, cfg=cfg.proxy,
                                       progress=cfg.progress)
        spec = DataSpec(**{**winfo["data_spec"], "val_limit": cfg.val_limit, "train_limit": cfg.train_limit})
        weights = {"source": "proxy", "note": winfo["weights_note"], "checkpoint": winfo.get("checkpoint"),
                   "proxy_val_top1": winfo.get("val_top1")}
    else:
        spec = DataSpec(path=cfg.data, labels=cfg.labels, seed=cfg.seed, val_limit=cfg.val_limit,
                        train_limit=cfg.train_limit)
        model = create_backbone(cfg.backbone, weights=cfg.weights, checkpoint=cfg.checkpoint)
        weights = {"source": cfg.weights, "checkpoint": cfg.checkpoint,
                   "note": {"pretrained": "timm hub weights", "checkpoint": "local checkpoint",
                            "random": "random init (not pretrained)"}[cfg.weights]}
    train, val, dinfo = build_datasets(spec, model)
    return model, train, val, dinfo, weights


def profile(cfg: ProfileConfig) -> dict[str, Any]:
    """Measure one config beside its unreduced baseline; every number carries how it was obtained."""
    device = resolve_device("cpu" if cfg.runtime == "onnxruntime" else cfg.device)  # onnxruntime: CPU sessions
    t0 = time.perf_counter()
    geo0 = geometry(cfg.backbone)  # a non-ViT backbone fails here, with one line naming it
    cfg.reduction.validate(geo0.depth)  # bad locations fail before any training or loading
    if cfg.data is not None:  # the proxy changes the geometry; apply() checks r there
        check_merge_r(cfg.reduction, geo0.num_patches, geo0.depth)
    baseline, train, val, data_info, weights = load_model_and_data(cfg)
    for warning in data_info.get("warnings", []):
        print(f"[profile] warning: {warning}", file=sys.stderr)
    baseline.eval()
    geo = geometry_from_model(baseline)
    model = apply(copy.deepcopy(baseline), cfg.reduction).eval()
    base_macs, red_macs = analytic_macs(ReductionConfig(), geo), analytic_macs(cfg.reduction, geo)
    traced = traced_macs(model)
    with torch.inference_mode():
        model(torch.zeros(1, geo.in_chans, *geo.img_size))
    counts = [list(c) for c in model.tps_last_info.token_counts]
    result: dict[str, Any] = {
        "backbone": {"name": cfg.backbone, "timm_name": getattr(baseline, "tps_backbone").timm_name,
                     "img_size": geo.img_size, "patch_size": geo.patch_size, "num_classes": geo.num_classes,
                     "num_patches": geo.num_patches},
        "reduction": cfg.reduction.to_dict(),
        "label": cfg.reduction.label,
        "token_counts": counts,
        "gmacs": {"baseline": base_macs.gmacs, "analytic": red_macs.gmacs, "traced": traced.gmacs,
                  "ratio": red_macs.gmacs / base_macs.gmacs, "counter": "fvcore+sdpa (traced), closed form (analytic)",
                  "breakdown": red_macs.as_dict()},
        "params": {"baseline": analytic_params(ReductionConfig(), geo).total,
                   "model": analytic_params(cfg.reduction, geo).total},
        "data": data_info,
        "weights": weights,
    }
    tcfg = cfg.throughput_config(device)
    if cfg.runtime != "eager":
        _say(cfg, f"preparing both models for {cfg.runtime}")
    with runtime_models(baseline, model, cfg.runtime, tcfg.batch_sizes, device) as (run_base, run_model, rinfo):
        _say(cfg, f"measuring throughput on {cfg.runtime} (reduced model beside the unreduced baseline)")
        pair = measure_pair(run_base, run_model, tcfg, baseline_label="baseline", label=cfg.reduction.label)
    result["runtime"] = rinfo
    result["throughput"] = [_throughput_row(s, b, m) for s, b, m in pair.cells()]
    result["speedups"] = [asdict(s) for s in pair.speedups]
    _say(cfg, "evaluating zero-shot accuracy (no fine-tune)")
    base = evaluate(baseline, val, progress=cfg.progress, device=device)
    chance = chance_warning(base["correct1"], base["n"], int(data_info.get("num_classes") or 0))
    if chance:  # loud, and kept in the result
        print(f"[profile] WARNING: {chance}", file=sys.stderr)
        data_info.setdefault("warnings", []).append(chance)
    result["accuracy"] = {"baseline": _accuracy_entry(base),
                          "zero_shot": _accuracy_entry(evaluate(model, val, progress=cfg.progress, device=device), base)}
    if cfg.finetune_steps:
        ft_cfg = FinetuneConfig(steps=cfg.finetune_steps, batch_size=cfg.finetune_batch, seed=cfg.seed,
                                device=str(device), progress=cfg.progress)
        record = finetune(model, train, val, ft_cfg, teacher=baseline if cfg.distill else None)
        result["accuracy"]["finetuned"] = _accuracy_entry(record, base)
        result["finetune"] = {k: v for k, v in record.items() if k not in ("losses", "top1_bits")}
    result["environment"] = environment_info(device)
    result["seconds"] = time.perf_counter() - t0
    return result


def _accuracy_entry(res: dict[str, Any], baseline: dict[str, Any] | None = None) -> dict[str, Any]:
    """top-1/top-5 with n, correct and Wilson intervals; against the baseline, the paired difference."""
    top1 = Accuracy.from_bits(res["top1_bits"])
    top5 = Accuracy(int(res["correct5"]), top1.n)
    out = {"top1": top1.value, "top5": top5.value, "n": top1.n, "correct1": top1.correct,
           "correct5": top5.correct, "top1_ci95": list(top1.interval), "top5_ci95": list(top5.interval)}
    if baseline is not None:
        d = paired_difference(top1, baseline["top1_bits"])
        out["vs_baseline"] = {"difference": d.difference, "ci95": [d.low, d.high], "mcnemar_p": d.test.p_value,
                              "only_this": d.test.only_a, "only_baseline": d.test.only_b}
    return out


def _throughput_row(s: Speedup, base: ThroughputResult, red: ThroughputResult) -> dict[str, Any]:
    return {"batch_size": red.batch_size, "requested_batch_size": s.requested_batch_size, "dtype": red.dtype,
            "device": red.device, "status": red.status, "note": s.note,
            "images_per_s": red.images_per_s, "baseline_images_per_s": base.images_per_s, "speedup": s.speedup,
            "latency_ms": red.latency_ms, "spread": [red.images_per_s_min, red.images_per_s_max],
            "peak_mem_bytes": red.peak_mem_bytes, "joules_per_image": red.joules_per_image,
            "baseline_joules_per_image": base.joules_per_image, "error": red.error,
            "telemetry": red.telemetry.to_dict() if red.telemetry is not None else None}


def _runtime_text(info: dict[str, Any]) -> str:
    name = info.get("name", "eager")
    if name == "compile":
        return f"torch.compile (fullgraph, {info.get('backend')}; compiled in {info.get('compile_s', 0):.1f} s)"
    if name == "onnxruntime":
        return (f"onnxruntime {info.get('onnxruntime')} (opset {info.get('opset')}, fixed batch, "
                f"{info.get('intra_op_threads')} threads; exported in {info.get('export_s', 0):.1f} s)")
    return "eager PyTorch"


def _px(size: Any) -> str:
    """(56, 56) -> '56x56'; an int stays as it is."""
    return "x".join(str(v) for v in size) if isinstance(size, (list, tuple)) else str(size)


def _say(cfg: ProfileConfig, text: str) -> None:
    if cfg.progress:
        print(f"profile: {text}", file=sys.stderr, flush=True)


def format_profile(r: dict[str, Any]) -> str:
    """The readable table that `tpsexplore profile` prints."""
    g, acc = r["gmacs"], r["accuracy"]
    env = r["environment"]
    lines = [
        f"tpsexplore profile: {r['backbone']['name']} ({r['backbone']['timm_name']}, "
        f"{_px(r['backbone']['img_size'])} px, patch {_px(r['backbone']['patch_size'])}) — {r['label']}",
        f"  data     {r['data'].get('note') or r['data'].get('source')}",
        f"  weights  {r['weights']['note']}",
        f"  tokens   {' -> '.join(str(n) for n in distinct_counts(r['token_counts']))} (per block: "
        f"{', '.join(f'{a}/{m}' for a, m in r['token_counts'])})",
        "",
        f"  {'GMACs':<22}{g['analytic']:.4f} analytic, {g['traced']:.4f} traced (fvcore + SDPA); "
        f"baseline {g['baseline']:.4f}; ratio {g['ratio']:.3f}",
        f"  {'parameters':<22}{r['params']['model'] / 1e6:.3f} M (baseline {r['params']['baseline'] / 1e6:.3f} M)",
        "",
        f"  runtime  {_runtime_text(r.get('runtime') or {'name': 'eager'})} (the baseline on the same runtime)",
        f"  {'batch':>6} {'dtype':>6} {'device':>8} {'img/s':>10} {'baseline':>10} {'speed-up':>9} {'latency ms':>11} "
        f"{'J/img':>8}",
    ]
    for t in r["throughput"]:
        if t["status"] != "ok":
            lines.append(f"  {t['batch_size']:>6} {t['dtype']:>6} {t['device']:>8}   {t['status']}: {t['error'] or ''}")
            continue
        jpi = f"{t['joules_per_image']:.4f}" if t["joules_per_image"] is not None else \
            ("n/a (CPU)" if t["device"] == "cpu" else "n/a")
        base = f"{t['baseline_images_per_s']:.1f}" if t["baseline_images_per_s"] is not None else "failed"
        speedup = f"{t['speedup']:.2f}x" if t["speedup"] is not None else "n/a"
        lines.append(f"  {t['batch_size']:>6} {t['dtype']:>6} {t['device']:>8} {t['images_per_s']:>10.1f} "
                     f"{base:>10} {speedup:>9} {t['latency_ms']:>11.2f} {jpi:>8}"
                     + (f"  ({t['note']})" if t.get("note") else ""))
    lines += ["", f"  {'accuracy (95% CI)':<22}{'top-1':<28}{'top-5':<28}vs baseline (paired)"]
    for name in ("baseline", "zero_shot", "finetuned"):
        if name in acc:
            a = acc[name]
            t1, t5 = Accuracy(a["correct1"], a["n"]), Accuracy(a["correct5"], a["n"])
            vs = a.get("vs_baseline")
            paired = "" if vs is None else format_difference(PairedDifference(
                vs["difference"], *vs["ci95"], PairedTest(a["n"], vs["only_this"], vs["only_baseline"], vs["mcnemar_p"])))
            lines.append(f"  {name.replace('_', '-'):<22}{format_accuracy(t1):<28}{format_accuracy(t5):<28}{paired}")
    if "finetune" in r:
        f = r["finetune"]
        lines.append(f"  {'fine-tune':<22}{f['steps']} steps, batch {f['batch_size']}, lr {f['lr']:.3g}, "
                     f"{f['train_seconds']:.1f} s on {f['device']}")
    lines += ["", f"  measured on: {env.get('gpu_name') or env.get('cpu_model')} ({env.get('device')}), "
                  f"{env.get('logical_cores', '?')} cores, torch {env.get('torch')} (threads {env.get('torch_threads')}), "
                  f"timm {env.get('timm')}, CUDA {env.get('cuda_runtime') if env.get('cuda_available') else 'not used'}, "
                  f"driver {env.get('gpu_driver') or 'n/a'}, python {env.get('python')}, {env.get('os')}, "
                  f"commit {str(env.get('git_commit'))[:10]}",
              f"  took {r['seconds']:.1f} s"]
    return "\n".join(lines)
