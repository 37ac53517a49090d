"""Export one trial of a study as a deployment config that `tpsexplore.apply(model, "config.json")` reads.

    {"format": "tpsexplore-deployment/1",
     "reduction": {...ReductionConfig...},
     "backbone": {"name", "timm_name", "img_size", "patch_size", "num_classes", ...}  (a hierarchical backbone's:
                 every [model] override the study built it with, `report.model.backbone_description`),
     "measurements": {"gmacs@analytic": {"value": 0.18, "unit": "GMACs", "fidelity": "analytic", ...}, ...},
     "tokens": [[attention tokens, MLP tokens] per block, on the backbone's geometry],
     "geometry": {"num_patches", "num_prefix", "depth", "width", "img_size", ...}  (the manifest's: what the
                 trial was searched on; `apply` refuses another geometry unless adapt=True; a hierarchical
                 backbone adds "family" and "stages", `reduce.patch_hier.stage_geometry`, which `apply` checks),
     "gmacs": trial's analytic GMACs on that geometry, "baseline_gmacs": the unreduced baseline's (manifest),
     "proxy": true when the accuracies were measured on the offline proxy task, false on real data,
     "weights": {"path", "sha256", "bytes"} or null (the study kept no weights for the trial),
     "hardware": {...}, "versions": {...},
     "study": {"name", "path" (absolute), "results_db", "manifest_version", "budget": {"fraction", "gmacs",
               "baseline_gmacs"}, "objectives", "data", "weights", "proxy", "fidelity"}  (from the study manifest),
     "trial": N, "label": "...",
     "model": {"path", "format", "batch_size", "sha256", ...}  (only beside a model written with ``format``)}

``weights.path`` is the trial's file in the study (``weights/trial_<n>.safetensors``, relative to the study folder)
or, with ``--weights FILE``, the copy (relative to the config's folder). `load_deployment` resolves a relative path
against the config's folder, then the study folder (never the current directory), verifies the sha256 and refuses
missing or changed weights with one line: it never returns a randomly initialised model.

A trial is chosen by number (``trial=N``) or by a rule: ``pick="max-accuracy"`` with optional limits
``max_gmacs``, ``min_throughput`` (img/s at ``batch_size``, default the study's largest) and
``max_latency_ms`` (batch 1), or ``pick="recommended"`` (the report's headline: the cheapest trial an exact
McNemar test cannot tell apart from the most accurate within the budget).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from ..manifest import StudyLayout, atomic_write
from ..measure.flops import analytic_macs, model_geometry
from ..reduce import ReductionConfig, token_schedule
from ..reduce.config import parse_json
from .frame import StudyData, open_study, runtime_columns
from .frame import trial_config as stored_config
from ..reduce.patch_hier import hier_schedule_of, stage_geometry
from .model import backbone_geometry, build_model, is_hierarchical_backbone, meta_model, with_weight_geometry

FORMAT = "tpsexplore-deployment/1"
PICK_RULES = ("max-accuracy", "recommended")
HARDWARE_KEYS = ("device", "gpu_name", "gpu_uuid", "gpu_driver", "gpu_cuda_driver", "gpu_capability",
                 "gpu_memory_bytes", "gpu_sm_count", "gpu_power_limit_w", "gpu_max_sm_clock_mhz", "cpu_model",
                 "cpu_arch", "logical_cores", "usable_cores", "torch_threads", "torch_interop_threads", "os",
                 "hostname", "cuda_available", "cuda_device_count")
VERSION_KEYS = ("python", "python_implementation", "torch", "torchvision", "timm", "optuna", "fvcore", "numpy",
                "nvidia_ml_py", "cuda_runtime", "cudnn", "tpsexplore", "git_commit", "git_dirty",
                "tf32_matmul", "tf32_cudnn", "cudnn_benchmark", "float32_matmul_precision")


def _json_value(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if hasattr(v, "item") and not isinstance(v, (list, dict, str)):
        try:
            return v.item()
        except (ValueError, AttributeError):
            return str(v)
    if isinstance(v, (pd.Timestamp, datetime)):
        return v.isoformat()
    return v


# ----------------------------------------------------------------------------- choosing a trial
def select_trial(df: pd.DataFrame, trial: int | None = None, pick: str | None = None, *,
                 max_gmacs: float | None = None, min_throughput: float | None = None,
                 max_latency_ms: float | None = None, batch_size: int | None = None,
                 study: str = "the study") -> pd.Series:
    """The row of trial ``trial``, or the best trial by ``pick`` under the given limits (ValueError if none).

    Without limits ``max-accuracy`` considers the trials within the study's budget; any limit replaces the
    budget by that limit. The unreduced baseline is never picked.
    """
    if df.empty:
        raise ValueError(f"study: {study!r} has no trials; run `tpsexplore search` first")
    if trial is not None and pick is not None:
        raise ValueError("trial: give either --trial N or --pick RULE, not both")
    if trial is not None:
        rows = df[df["number"] == int(trial)]
        if rows.empty:
            nums = sorted(int(n) for n in df["number"])
            raise ValueError(f"trial: {trial} does not exist in study {study!r}; trials are "
                             f"{_ranges(nums)}")
        row = rows.iloc[0]
        if row["state"] != "complete":
            why = f" ({row['reason']})" if isinstance(row.get("reason"), str) and row["reason"] else ""
            raise ValueError(f"trial: {trial} is {row['state']}{why}; only complete trials can be exported")
        return row
    pick = pick or "max-accuracy"
    if pick not in PICK_RULES:
        raise ValueError(f"pick: {pick!r} is not a rule; allowed: {', '.join(PICK_RULES)}")
    cand = df[df["usable"] & ~df["is_baseline"]]
    if cand.empty:
        raise ValueError(f"study: {study!r} has no complete trial with an accuracy to pick from")
    if pick == "recommended":
        if any(v is not None for v in (max_gmacs, min_throughput, max_latency_ms)):
            raise ValueError("pick: 'recommended' is the report's headline within the study's budget; it takes no "
                             "--max-gflops/--min-throughput/--max-latency (use --pick max-accuracy with limits)")
        rec = cand[cand["recommended"]] if "recommended" in cand.columns else cand.iloc[0:0]
        if rec.empty:
            raise ValueError(f"pick: study {study!r} has no recommended trial (no complete trial within the budget)")
        return rec.iloc[0]
    limits = []
    if max_gmacs is not None:
        cand = cand[cand["gmacs"] <= max_gmacs + 1e-12]
        limits.append(f"GMACs <= {max_gmacs:g}")
    if min_throughput is not None:
        col = _runtime_column(df, "throughput", batch_size)
        cand = cand[cand[col] >= min_throughput]
        limits.append(f"{col} >= {min_throughput:g} img/s")
    if max_latency_ms is not None:
        col = _runtime_column(df, "latency_ms", 1)
        cand = cand[cand[col] <= max_latency_ms]
        limits.append(f"{col} <= {max_latency_ms:g} ms")
    if not limits:
        cand = cand[cand["within_budget"]]
        limits.append("within the study's budget")
    if cand.empty:
        raise ValueError(f"pick: no complete trial of study {study!r} satisfies {' and '.join(limits)}; "
                         f"{_closest(df, max_gmacs, min_throughput, max_latency_ms, batch_size)}")
    best = cand.sort_values(["accuracy", "gmacs", "number"], ascending=[False, True, True], kind="stable")
    return best.iloc[0]


def _runtime_column(df: pd.DataFrame, kind: str, batch_size: int | None) -> str:
    cols = runtime_columns(df, kind)
    if batch_size is not None:
        cols = [c for c in cols if c.batch_size == batch_size]
    if not cols:
        what = "throughput" if kind == "throughput" else "batch-1 latency"
        bs = f" at batch {batch_size}" if batch_size is not None and kind == "throughput" else ""
        raise ValueError(f"pick: the study has no {what} measurements{bs}; drop that limit or measure it")
    return cols[-1].column


def _closest(df: pd.DataFrame, max_gmacs: float | None, min_tp: float | None, max_lat: float | None,
             batch_size: int | None) -> str:
    ok = df[df["usable"] & ~df["is_baseline"]]
    bits = []
    if max_gmacs is not None and len(ok):
        bits.append(f"smallest GMACs is {ok['gmacs'].min():.4g}")
    if min_tp is not None and len(ok):
        col = _runtime_column(df, "throughput", batch_size)
        bits.append(f"largest throughput is {ok[col].max():.4g} img/s")
    if max_lat is not None and len(ok):
        col = _runtime_column(df, "latency_ms", 1)
        bits.append(f"smallest latency is {ok[col].min():.4g} ms")
    if not bits:
        bits.append("no complete trial is within the budget")
    return "; ".join(bits)


def _ranges(nums: list[int]) -> str:
    if not nums:
        return "none"
    parts, start, prev = [], nums[0], nums[0]
    for n in nums[1:] + [None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        parts.append(f"{start}" if start == prev else f"{start}..{prev}")
        if n is not None:
            start = prev = n
    return ", ".join(parts)


# ----------------------------------------------------------------------------- the config
def trial_config(row: pd.Series) -> ReductionConfig:
    """The ReductionConfig stored with a trial (its ``config_json``, read back by ``ReductionConfig.from_json``)."""
    config = stored_config(row)
    if config is None:
        raise ValueError(f"trial: {row.get('number')} has no stored config")
    return config


def trial_measurements(data: StudyData, trial_id: int) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(measurements by column, hardware, versions) of one trial, from the results store."""
    envs, meas = data.measurements(int(trial_id))
    out: dict[str, Any] = {}
    for _, m in meas.iterrows():
        item = {k: _json_value(m[k]) for k in ("value", "unit", "kind", "fidelity", "provenance", "batch_size",
                                               "dtype", "device")}
        item = {k: v for k, v in item.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}
        if isinstance(m.get("extra"), dict) and m["extra"]:
            item["extra"] = m["extra"]
        out[m["column"]] = item  # newest wins, as in trials_frame
    env: dict[str, Any] = {}
    for content in envs.values():
        env.update(content)
    if not env:
        env = data.manifest.extra.get("environment") or {}
    hardware = {k: env.get(k) for k in HARDWARE_KEYS if k in env}
    versions = {k: env.get(k) for k in VERSION_KEYS if k in env} or dict(data.manifest.versions)
    return out, hardware, versions


def deployment_config(data: StudyData, row: pd.Series) -> dict[str, Any]:
    """The deployment config (module docstring) of one trial row of ``data.trials``."""
    config = trial_config(row)
    backbone = data.backbone_description()
    measurements, hardware, versions = trial_measurements(data, int(row["trial_id"]))
    weights = data.weights_path(int(row["number"]))
    m = data.manifest
    geometry = asdict(m.geometry)
    if is_hierarchical_backbone(backbone):  # PVT v1/v2, CvT, Swin: per-block tokens of the stage-wise schedule
        model = meta_model(backbone)
        geo = model_geometry(model)
        tokens = [list(b) for b in hier_schedule_of(model, config).counts()]
        geometry.update(stage_geometry(model))  # what `apply` checks on load, beside the manifest's fields
    else:
        if weights is not None and not all(backbone.get(k) for k in ("img_size", "patch_size", "num_classes")):
            backbone = with_weight_geometry(backbone, weights)
        geo = backbone_geometry(backbone)
        sched = token_schedule(config, geo.num_patches, geo.num_prefix, geo.depth)
        tokens = [list(b) for b in sched.blocks]
    root = Path(data.root).resolve() if data.root else None
    entry = None
    if weights is not None:  # the study's own file, named relative to the study folder
        w = Path(weights).resolve()
        entry = weights_entry(w, root if root is not None and w.is_relative_to(root) else None)
    cfg = {
        "format": FORMAT,
        "reduction": config.to_dict(),
        "label": config.label,
        "backbone": backbone,
        "measurements": measurements,
        "tokens": tokens,
        "geometry": geometry,
        "gmacs": analytic_macs(config, geo).gmacs,
        "baseline_gmacs": m.budget.baseline_gmacs,
        "proxy": bool(m.data.is_proxy),
        "weights": entry,
        "hardware": hardware,
        "versions": versions,
        "study": {"name": data.name, "path": str(root) if root else None,
                  "results_db": data.db if "://" in data.db else str(Path(data.db).resolve()),
                  "manifest_version": m.version, "budget": asdict(m.budget), "objectives": m.objective_specs,
                  "data": asdict(m.data), "weights": asdict(m.weights), "proxy": m.proxy,
                  "fidelity": asdict(m.fidelity), "accuracy_column": data.trials.attrs.get("accuracy_column")},
        "trial": int(row["number"]),
        "variant": row.get("variant"),
        "exported": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return json.loads(json.dumps(cfg, default=_json_value))  # plain JSON types only (no numpy scalars)


def export_trial(study: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, *,
                 trial: int | None = None, pick: str | None = None, max_gmacs: float | None = None,
                 min_throughput: float | None = None, max_latency_ms: float | None = None,
                 batch_size: int | None = None, weights: str | os.PathLike[str] | None = None,
                 study_name: str | None = None, format: str | None = None,
                 model_batch_size: int | str | None = None) -> dict[str, Any]:
    """Choose a trial (by number or rule), write its deployment config to ``out`` and return it.

    ``weights`` also writes the trial's fine-tuned weights there (.safetensors copies the file, .pth/.pt
    saves a torch state dict) and names that copy in the config; ValueError when the study did not keep that
    trial's weights. Every target is checked before anything is written, and each file is written atomically.

    ``format`` (onnx, pt2 or torchscript) makes ``out`` the reduced model itself, with the trial's weights
    (`trial_model`, exported by `tpsexplore.deploy`; ValueError when the study kept no weights for the trial).
    The file carries the reduction config and its batch size (ONNX metadata, pt2/TorchScript extra files); the
    full deployment config sits beside it as ``<out>.json`` (`model_config_path`), with a ``"model"`` entry
    (`MODEL_KEYS`: the file's name, format, batch size, sha256, input shape and normalisation).
    ``model_batch_size``: an integer fixes the exported batch, ``"dynamic"`` leaves it free (not TorchScript,
    whose trace fixes it), None is the format's default (dynamic; 1 for TorchScript).
    """
    from ..writable import check_output_file

    if format is not None:
        model_batch_size = _model_batch(format, model_batch_size)
        if out is None:
            raise ValueError(f"out: --format {format} writes a model file; give -o FILE (e.g. model.{format})")
        if Path(out).suffix == ".json":
            raise ValueError(f"out: {str(out)!r} names a JSON file, but --format {format} writes the model; "
                             f"give e.g. model.{format} (its config is written beside it as <FILE>.json)")
    elif model_batch_size is not None:
        raise ValueError(f"batch_size: {model_batch_size!r} is the exported model's batch size; it needs --format")
    if out is not None:  # every target is checked before anything is copied or written
        check_output_file(out, "out")
        if format is not None:
            check_output_file(model_config_path(out), "out")
    if weights is not None:
        if Path(weights).suffix not in (".safetensors", ".pth", ".pt"):
            raise ValueError(f"weights: {str(weights)!r} must end in .safetensors, .pth or .pt")
        check_output_file(weights, "weights")
    data = open_study(study, study_name)
    if trial is None and pick is None:
        pick = "max-accuracy"
    row = select_trial(data.trials, trial, pick, max_gmacs=max_gmacs, min_throughput=min_throughput,
                       max_latency_ms=max_latency_ms, batch_size=batch_size, study=data.name)
    number = int(row["number"])
    src = data.weights_path(number)
    if weights is not None and src is None:
        where = data.layout.weights_dir if data.layout else "the study directory (a bare database was given)"
        raise ValueError(f"weights: trial {number} of study {data.name!r} has no saved weights in {where}; "
                         "the search keeps fine-tuned weights of complete fine-tuned trials only")
    if src is not None:
        src = src.resolve()
    model = trial_model(data, row) if format is not None else None  # refuses a trial without weights
    cfg = deployment_config(data, row)
    if model is not None:  # everything above has been checked; the model is written first, then the rest
        cfg["model"] = _export_model_file(model, out, format, model_batch_size, cfg)
        out = model_config_path(out)
    if weights is not None:
        dst = Path(weights)
        if dst.suffix == src.suffix:
            with src.open("rb") as fh:
                atomic_write(dst, lambda f: shutil.copyfileobj(fh, f))
        elif dst.suffix in (".pth", ".pt"):
            import torch

            from ..backbones import read_state_dict
            state = read_state_dict(src)
            atomic_write(dst, lambda f: torch.save(state, f))
        else:
            raise ValueError(f"weights: {str(dst)!r} must end in .safetensors, .pth or .pt")
        cfg["weights"] = weights_entry(dst.resolve(), Path(out).resolve().parent if out is not None else None)
    if out is not None:
        atomic_write(out, json.dumps(cfg, indent=2, default=_json_value) + "\n")
    return cfg


# ----------------------------------------------------------------------------- exported model files
MODEL_KEYS = ("path", "format", "batch_size", "sha256", "bytes", "input", "input_name", "output_name", "opset",
              "preprocess", "carries")


def model_config_path(model_path: str | os.PathLike[str]) -> Path:
    """Where ``export --format`` writes the deployment config of an exported model: ``<model file>.json``."""
    return Path(f"{os.fspath(model_path)}.json")


def _model_batch(format: str, batch: int | str | None) -> int | None:
    """The batch size `tpsexplore.deploy` gets: an integer, or None for a dynamic batch (one-line errors)."""
    from ..deploy import FORMATS, check_batch_size

    if format not in FORMATS:
        raise ValueError(f"format: {format!r} is not supported; allowed: {', '.join(FORMATS)}")
    if batch is None:
        return 1 if format == "torchscript" else None
    if batch == "dynamic":
        if format == "torchscript":
            raise ValueError("batch_size: dynamic is not possible for torchscript (a trace fixes the batch); "
                             "give a number, or use --format onnx or pt2")
        return None
    return check_batch_size(batch)


def _export_model_file(model: Any, out: str | os.PathLike[str], format: str, batch: int | None,
                       cfg: dict[str, Any]) -> dict[str, Any]:
    """Write ``model`` to ``out`` in ``format`` (atomically, by `tpsexplore.deploy`); its ``"model"`` entry."""
    from .. import deploy

    try:
        path = deploy.export_model(model, out, format, batch_size=batch)
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 - an exporter that cannot take this reduced form: one line, no file
        raise ValueError(f"format: {format} cannot export trial {cfg.get('trial')} ({cfg.get('label')!r} on "
                         f"{cfg['backbone'].get('timm_name')}): {type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:200]}; allowed: another --format "
                         f"({', '.join(f for f in deploy.FORMATS if f != format)}), or no --format (the deployment "
                         "config, applied in eager PyTorch by tpsexplore.load_deployment)") from None
    details = ((cfg.get("study") or {}).get("data") or {}).get("details") or {}
    size = int(cfg["backbone"].get("img_size") or cfg["geometry"]["img_size"])
    channels = deploy.input_shape(model)[0]
    entry = {
        "path": Path(path).name,  # beside the config
        "format": format,
        "batch_size": "dynamic" if batch is None else batch,
        "sha256": sha256_file(path),
        "bytes": Path(path).stat().st_size,
        "input": [channels, size, size],
        "input_name": deploy.INPUT_NAME if format == "onnx" else None,
        "output_name": deploy.OUTPUT_NAME if format == "onnx" else None,
        "opset": deploy.DEFAULT_OPSET if format == "onnx" else None,
        "preprocess": {"img_size": size, "mean": details.get("mean"), "std": details.get("std")},
        "carries": "the reduction config, label, backbone and batch size (ONNX metadata_props / pt2 and "
                   "TorchScript extra files); this file holds the rest",
    }
    return {k: entry[k] for k in MODEL_KEYS}


# ----------------------------------------------------------------------------- weights
def sha256_file(path: str | os.PathLike[str]) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_entry(path: Path, relative_to: Path | None) -> dict[str, Any]:
    """``{"path", "sha256", "bytes"}`` of a weights file; the path relative to ``relative_to`` when given (the
    config's folder for a copy, the study folder for the study's own file), else absolute."""
    shown = os.path.relpath(path, relative_to) if relative_to is not None else str(path)
    return {"path": shown, "sha256": sha256_file(path), "bytes": path.stat().st_size}


def deployment_weights(cfg: dict[str, Any], config_path: str | os.PathLike[str]) -> Path:
    """The weights file a deployment config names, found and verified; one-line errors otherwise.

    A relative path is looked up in the config's folder, then in the study folder (``study.path``), never the
    current directory. FileNotFoundError names the missing file when neither holds it; ValueError when the config
    names none or the file's sha256 differs from the one recorded at export.
    """
    where = str(config_path)
    entry = cfg.get("weights")
    if isinstance(entry, str) or (entry is None and cfg.get("trial_weights")):  # configs exported before issue 10
        entry = {"path": entry or cfg["trial_weights"]}
    if not isinstance(entry, dict) or not entry.get("path"):
        trial = f"trial {cfg.get('trial')} of study {(cfg.get('study') or {}).get('name')!r}"
        raise ValueError(f"weights: config {where!r} names no weights file (the study kept none for {trial}); "
                         "pass weights=PATH, or export a fine-tuned trial")
    name = Path(str(entry["path"]))
    if name.is_absolute():
        candidates = [name]
    else:
        folders = [Path(config_path).resolve().parent]
        study = (cfg.get("study") or {}).get("path")
        if study and Path(study).is_absolute():
            folders.append(StudyLayout(Path(study)).root)
        candidates = list(dict.fromkeys(f / name for f in folders))
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        looked = " or ".join(repr(str(c)) for c in candidates)
        raise FileNotFoundError(f"weights: {looked} (named by config {where!r}) does not exist; re-export the trial "
                                "with --weights FILE, or pass weights=PATH")
    expected = entry.get("sha256")
    if expected:
        actual = sha256_file(found)
        if actual != expected:
            raise ValueError(f"weights: {str(found)!r} has sha256 {actual[:12]}..., config {where!r} expects "
                             f"{str(expected)[:12]}...; the file changed since export (re-export the trial)")
    return found


def trial_model(data: StudyData, row: pd.Series, device: str = "cpu") -> Any:
    """The reduced model of one trial with the weights the study kept for it (one-line ValueError when it kept
    none): what ``export --format`` serialises."""
    number = int(row["number"])
    src = data.weights_path(number)
    if src is None:
        where = data.layout.weights_dir if data.layout else "the study directory (a bare database was given)"
        raise ValueError(f"weights: trial {number} of study {data.name!r} has no saved weights in {where}; "
                         "the search keeps fine-tuned weights of complete fine-tuned trials only")
    cfg = deployment_config(data, row)
    return build_model(cfg["backbone"], cfg, src, device)


def load_deployment(path: str | os.PathLike[str], weights: str | os.PathLike[str] | None = None,
                    device: str = "cpu") -> Any:
    """Build the reduced model a deployment config describes, with its weights.

    The weights are ``weights`` when given, else the file the config names (`deployment_weights`: found beside the
    config or in the study, sha256 verified). Missing or changed weights are refused with one line; the model is
    never randomly initialised. The config's geometry is checked by `apply`.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config: {str(p)!r} does not exist")
    cfg = parse_json(p.read_text(), str(p))
    if not isinstance(cfg.get("reduction"), dict) or not isinstance(cfg.get("backbone"), dict):
        raise ValueError(f"config: {str(p)!r} is not a deployment config (needs 'reduction' and 'backbone'); "
                         "`tpsexplore export` writes one")
    if weights is not None:
        w = Path(weights)
        if not w.is_file():
            raise FileNotFoundError(f"weights: {str(w)!r} does not exist")
    else:
        w = deployment_weights(cfg, p)
    return build_model(cfg["backbone"], cfg, w, device)
