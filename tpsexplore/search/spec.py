"""`SearchSettings`: everything a search needs, from defaults < a TOML study file < command-line flags.

A study file (``studies/*.toml``) holds the CLI options as top-level keys (``backbone``, ``budget``,
``trials``, ``methods``, ...; dashes or underscores) and these tables:

* ``[space]``: `SpaceSettings` (fill_min, keep_range, keep_floor, temperature_range, diversity_max, gap_max,
  sample_options, grid_locations, grid_keep_ratios);
* ``[measure]``: `MeasureSettings` (throughput batch, window lengths, latency on/off);
* ``[gate]``: `GateSettings` (the zero-shot fidelity gate);
* ``[sampler]``: `SamplerSettings`;
* ``[confirm]``: `ConfirmSettings` (re-fine-tune the top front configs with more seeds after the search);
* ``[train]``: keyword arguments for the fine-tune (``tpsexplore.measure.train.finetune``);
* ``[proxy]``: keyword arguments for the offline proxy task and its pre-training;
* ``[model]``: timm overrides of the backbone (img_size, patch_size, depth, embed_dim, num_heads, ...), used
  by the tiny smoke study;
* ``[dataset]``: `tpsexplore.measure.data.DataSpec` fields for real data (labels, limits, split).

Every error is one line naming the field (``budget: 1.5 is outside (0, 1]``); the CLI exits 2 on them.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..manifest import parse_storage
from .defaults import (CONFIRM_SEEDS, CONFIRM_TOP, DEFAULT_BACKBONE, DEFAULT_BUDGET,  # light: shared with --help
                       DEFAULT_FINETUNE_STEPS, DEFAULT_TRIALS, OBJECTIVES, WEIGHTS)
from .space import SpaceSettings, resolve_variants

STUDIES_DIR = Path(__file__).resolve().parents[2] / "studies"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,120}$")
MODEL_KEYS = ("img_size", "patch_size", "num_classes", "depth", "embed_dim", "num_heads", "mlp_ratio",
              "in_chans", "embed_dims", "depths", "mlp_ratios", "sr_ratios", "window_size")
#: per-stage overrides of the hierarchical backbones (PVT v1, CvT: one value per stage; num_heads too)
STAGE_MODEL_KEYS = ("embed_dims", "depths", "mlp_ratios", "sr_ratios")


@dataclass(frozen=True)
class MeasureSettings:
    """Throughput of each trial's reduced model, with the unreduced baseline measured beside it.

    CPU windows are short so a trial stays cheap; on a GPU the windows are longer (``gpu_*``).
    """

    batch_size: int = 64
    latency: bool = True
    warmup_s: float = 0.1
    window_s: float = 0.15
    windows: int = 3
    gpu_warmup_s: float = 0.5
    gpu_window_s: float = 0.5
    gpu_windows: int = 5
    dtype: str = "fp32"

    def validate(self) -> "MeasureSettings":
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"measure.batch_size: {self.batch_size!r} is not an integer >= 1")
        for name in ("warmup_s", "window_s", "gpu_warmup_s", "gpu_window_s"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise ValueError(f"measure.{name}: {v!r} is not a number of seconds >= 0")
        for name in ("windows", "gpu_windows"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"measure.{name}: {v!r} is not an integer >= 1")
        if self.dtype not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"measure.dtype: {self.dtype!r}; allowed: fp32, bf16, fp16")
        return self


@dataclass(frozen=True)
class GateSettings:
    """Zero-shot fidelity gate: fine-tune only configs that can still reach the feasible front.

    A config goes on when (zero-shot top-1 + optimistic fine-tune gain, cost) is not dominated by the
    fine-tuned front. The gain is the largest (fine-tuned - zero-shot) top-1 seen so far (per method once it
    has ``min_finetuned`` trials, else over all methods) times ``gain_factor`` plus ``margin``. Until
    ``min_finetuned`` trials are fine-tuned nothing is stopped; enqueued trials (baseline, published
    defaults) always go on.
    """

    enabled: bool = True
    zero_shot_images: int = 1000  # the zero-shot look uses the first N validation images (0: all of them)
    min_finetuned: int = 3
    gain_factor: float = 1.25
    margin: float = 0.02

    def validate(self) -> "GateSettings":
        if isinstance(self.zero_shot_images, bool) or not isinstance(self.zero_shot_images, int) \
                or self.zero_shot_images < 0:
            raise ValueError(f"gate.zero_shot_images: {self.zero_shot_images!r} is not an integer >= 0 (0: the "
                             "whole validation set)")
        if not isinstance(self.min_finetuned, int) or self.min_finetuned < 1:
            raise ValueError(f"gate.min_finetuned: {self.min_finetuned!r} is not an integer >= 1")
        if not self.gain_factor >= 1.0:
            raise ValueError(f"gate.gain_factor: {self.gain_factor!r} must be >= 1")
        if not 0.0 <= self.margin <= 1.0:
            raise ValueError(f"gate.margin: {self.margin!r} is outside [0, 1] (accuracy is a fraction)")
        return self


@dataclass(frozen=True)
class SamplerSettings:
    """Optuna sampler: multivariate TPE with group decomposition (default), NSGA-II, Gaussian process (gp),
    random, or grid (the paper study's fixed grid of method x locations x keep ratio)."""

    name: str = "tpe"
    n_startup_trials: int = 8
    population_size: int = 20

    def validate(self) -> "SamplerSettings":
        if self.name not in ("tpe", "nsga2", "gp", "random", "grid"):
            raise ValueError(f"sampler.name: {self.name!r}; allowed: tpe, nsga2, gp, random, grid")
        if not isinstance(self.n_startup_trials, int) or self.n_startup_trials < 0:
            raise ValueError(f"sampler.n_startup_trials: {self.n_startup_trials!r} is not an integer >= 0")
        if not isinstance(self.population_size, int) or self.population_size < 2:
            raise ValueError(f"sampler.population_size: {self.population_size!r} is not an integer >= 2")
        return self


@dataclass(frozen=True)
class ConfirmSettings:
    """Confirmation stage (`tpsexplore.search.confirm`): after the trials, re-fine-tune the ``top`` most accurate
    feasible configs of the front with ``seeds`` further seeds each (and the unreduced baseline too when
    ``baseline``, so the accuracy drop compares seed means with seed means). ``top = 0`` turns it off.

    Each run is one fine-tune of ``finetune_steps`` and one evaluation (measured on an idle 2-core CPU for
    deit_t: 14 s for a reduced config, 32 s for the baseline), so the defaults add (top + baseline) x seeds =
    3 runs (about 1 minute): each confirmed accuracy is the mean of 2 seeds. ``--confirm 2x2`` gives 3 seeds.
    """

    top: int = CONFIRM_TOP
    seeds: int = CONFIRM_SEEDS
    baseline: bool = True

    def validate(self) -> "ConfirmSettings":
        if isinstance(self.top, bool) or not isinstance(self.top, int) or self.top < 0:
            raise ValueError(f"confirm.top: {self.top!r} is not an integer >= 0 (0 turns confirmation off)")
        if isinstance(self.seeds, bool) or not isinstance(self.seeds, int) or self.seeds < 1:
            raise ValueError(f"confirm.seeds: {self.seeds!r} is not an integer >= 1 (extra seeds per config; "
                             "set confirm.top = 0 to turn confirmation off)")
        if not isinstance(self.baseline, bool):
            raise ValueError(f"confirm.baseline: {self.baseline!r} is not true or false")
        return self


@dataclass(frozen=True)
class SearchSettings:
    """One search (see the module docstring); `validate` checks everything that needs no file system."""

    backbone: str = DEFAULT_BACKBONE
    budget: float = DEFAULT_BUDGET
    trials: int = DEFAULT_TRIALS
    timeout: float | None = None
    methods: tuple[str, ...] | None = None
    max_stages: int = 3
    objectives: str = "accuracy,gflops"
    finetune_steps: int = DEFAULT_FINETUNE_STEPS
    device: str = "auto"
    study_name: str | None = None
    out: str = "runs"
    storage: str | None = None
    workers: int = 1
    seed: int = 0
    data: str | None = None
    checkpoint: str | None = None
    weights: str = "pretrained"
    threads: int = 0
    progress: bool = True
    study_file: str | None = None
    space: SpaceSettings = field(default_factory=SpaceSettings)
    measure: MeasureSettings = field(default_factory=MeasureSettings)
    gate: GateSettings = field(default_factory=GateSettings)
    sampler: SamplerSettings = field(default_factory=SamplerSettings)
    confirm: ConfirmSettings = field(default_factory=ConfirmSettings)
    train: dict[str, Any] = field(default_factory=dict)
    proxy: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    dataset: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ derived
    @property
    def name(self) -> str:
        if self.study_name:
            return self.study_name
        return f"{self.backbone}_budget{int(round(self.budget * 100)):03d}"

    @property
    def study_dir(self) -> Path:
        return Path(self.out) / self.name

    @property
    def objective_pairs(self) -> tuple[tuple[str, str], ...]:
        return OBJECTIVES[self.objectives]

    @property
    def directions(self) -> list[str]:
        return [d for _, d in self.objective_pairs]

    @property
    def cost_objective(self) -> str:
        return self.objective_pairs[1][0]

    @property
    def maximize_cost(self) -> bool:
        """The second objective is maximized (throughput) rather than minimized (GFLOPs, latency)."""
        return self.objective_pairs[1][1] == "maximize"

    @property
    def accuracy_fidelity(self) -> str:
        return "finetuned" if self.finetune_steps > 0 else "zero_shot"

    def validate(self) -> "SearchSettings":
        if not isinstance(self.backbone, str) or not self.backbone:
            raise ValueError(f"backbone: {self.backbone!r} is not a backbone name; allowed: deit_t, deit_s, "
                             "deit_b, vit_b16 or a timm VisionTransformer name")
        b = self.budget
        if isinstance(b, bool) or not isinstance(b, (int, float)) or math.isnan(b) or not 0.0 < b <= 1.0:
            raise ValueError(f"budget: {b!r} is outside (0, 1]; it is a fraction of the baseline GFLOPs "
                             "(0.35 = at most 35%)")
        if isinstance(self.trials, bool) or not isinstance(self.trials, int) or self.trials < 1:
            raise ValueError(f"trials: {self.trials!r} is not an integer >= 1")
        if self.timeout is not None and (isinstance(self.timeout, bool) or not self.timeout > 0):
            raise ValueError(f"timeout: {self.timeout!r} must be a positive number of seconds")
        resolve_variants(self.methods)  # unknown method names fail here
        if isinstance(self.max_stages, bool) or not isinstance(self.max_stages, int) or \
                not 1 <= self.max_stages <= 4:
            raise ValueError(f"max_stages: {self.max_stages!r} is outside 1..4")
        if self.objectives not in OBJECTIVES:
            raise ValueError(f"objectives: {self.objectives!r}; allowed: {', '.join(OBJECTIVES)}")
        if isinstance(self.finetune_steps, bool) or not isinstance(self.finetune_steps, int) or \
                self.finetune_steps < 0:
            raise ValueError(f"finetune_steps: {self.finetune_steps!r} is not an integer >= 0")
        if not isinstance(self.device, str) or not re.match(r"^(auto|cpu|cuda(:\d+)?)$", self.device):
            raise ValueError(f"device: {self.device!r}; allowed: auto, cpu, cuda, cuda:N")
        if not _NAME_RE.match(self.name):
            raise ValueError(f"study_name: {self.name!r} must be letters, digits, '_', '.', '-' (max 121 chars)")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"workers: {self.workers!r} is not an integer >= 1")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed: {self.seed!r} is not an integer")
        if self.weights not in WEIGHTS:
            raise ValueError(f"weights: {self.weights!r}; allowed: {', '.join(WEIGHTS)} (a local file: checkpoint)")
        if self.weights == "random" and self.data is None:
            raise ValueError("weights: 'random' needs data (real images); the offline proxy task uses its own "
                             "proxy-pretrained weights")
        if self.weights == "random" and self.checkpoint is not None:
            raise ValueError(f"weights: 'random' contradicts checkpoint {self.checkpoint!r}; give one of them")
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 0:
            raise ValueError(f"threads: {self.threads!r} is not an integer >= 0 (0 = automatic)")
        kind = storage_kind(self.storage)
        if kind == "sqlite" and self.workers > 1:
            raise ValueError(f"storage: a SQLite URL ({self.storage}) allows one worker only (SQLite locks under "
                             "concurrent writers); use the default journal file or a PostgreSQL URL for "
                             f"--workers {self.workers}")
        if self.objectives == "accuracy,latency" and not self.measure.latency:
            raise ValueError("objectives: 'accuracy,latency' needs the batch-1 latency; set measure.latency = true")
        unknown = sorted(set(self.model) - set(MODEL_KEYS))
        if unknown:
            raise ValueError(f"model.{unknown[0]}: unknown backbone override; allowed: {', '.join(MODEL_KEYS)}")
        for key, value in self.model.items():
            if key in STAGE_MODEL_KEYS or (key == "num_heads" and isinstance(value, list)):
                if not isinstance(value, list) or not value or \
                        any(isinstance(v, bool) or not _is_number(v) or not v > 0 for v in value):
                    raise ValueError(f"model.{key}: {value!r} is not a list of numbers > 0, one per stage")
            elif key == "mlp_ratio":
                if not _is_number(value) or not value > 0:
                    raise ValueError(f"model.mlp_ratio: {value!r} is not a number > 0")
            elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"model.{key}: {value!r} is not an integer >= 1")
        if self.train:
            from ..measure.train import FinetuneConfig

            check_field_types("train", {k: v for k, v in self.train.items() if k != "distill"}, FinetuneConfig)
            if "distill" in self.train and not isinstance(self.train["distill"], bool):
                raise ValueError(f"train.distill: {self.train['distill']!r} is not true or false")
        self.space.validate()
        self.measure.validate()
        self.gate.validate()
        self.sampler.validate()
        self.confirm.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["methods"] = list(self.methods) if self.methods else "all"
        d["space"] = self.space.to_dict()
        d["name"] = self.name
        return d


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


_TYPE_CHECKS = {
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "float": (_is_number, "a finite number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
}


def check_field_types(section: str, values: dict[str, Any], cls: type) -> None:
    """Each value must have its dataclass field's type (``int | None`` etc.); one line naming section.key,
    the value and the expected type otherwise. Unknown keys and fields of other types are left to the caller."""
    types = {f.name: str(f.type) for f in fields(cls)}
    for key, value in values.items():
        if key not in types or value is None:
            continue
        names = [t.strip() for t in types[key].split("|") if t.strip() != "None"]
        checks = [_TYPE_CHECKS[n] for n in names if n in _TYPE_CHECKS]
        if len(checks) != len(names) or not checks:
            continue  # a type this check does not know (tuples, dicts): the constructor validates it
        if not any(ok(value) for ok, _ in checks):
            raise ValueError(f"{section}.{key}: {value!r} is not {' or '.join(w for _, w in checks)}")


def storage_kind(storage: str | None) -> str:
    """'journal' (default / a path), 'sqlite', 'postgresql' or 'rdb' (`tpsexplore.manifest.parse_storage`, which
    refuses a malformed URL with one line)."""
    return "journal" if storage is None or storage == "" else parse_storage(storage).kind


# ---------------------------------------------------------------------------- TOML study files
_TOP_KEYS = {f.name for f in fields(SearchSettings)} - {"space", "measure", "gate", "sampler", "confirm", "train",
                                                         "proxy", "model", "dataset", "study_file", "progress"}
_SECTIONS = {"space": SpaceSettings, "measure": MeasureSettings, "gate": GateSettings, "sampler": SamplerSettings,
             "confirm": ConfirmSettings}
_FREE_SECTIONS = ("train", "proxy", "model", "dataset")


def find_study_file(text: str) -> Path:
    """A path, or a bare name looked up as studies/<name>(.toml) in the working directory or the checkout."""
    p = Path(text)
    if p.is_file():
        return p
    if p.is_dir():
        raise ValueError(f"study: {text!r} is a directory; give a TOML file such as studies/smoke.toml")
    if os.sep not in text:
        for base in (Path.cwd() / "studies", STUDIES_DIR):
            for cand in (base / text, base / f"{text}.toml"):
                if cand.is_file():
                    return cand
    raise FileNotFoundError(f"study: {text!r} not found (a TOML file, or a name under {STUDIES_DIR})")


def load_study_file(path: str | Path) -> dict[str, Any]:
    """Parse a study TOML into keyword overrides for `SearchSettings` (unknown keys are errors)."""
    import tomllib

    p = find_study_file(str(path))
    try:
        data = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"study: {str(p)!r} is not valid TOML: {' '.join(str(e).split())}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"study: {str(p)!r} cannot be read: {e}") from None
    out: dict[str, Any] = {"study_file": str(p)}
    for raw_key, value in data.items():
        key = raw_key.replace("-", "_")
        if key in ("name",):
            key = "study_name"
        if key in _SECTIONS:
            if not isinstance(value, dict):
                raise ValueError(f"{key}: in {p.name} must be a table ([{key}])")
            cls = _SECTIONS[key]
            known = {f.name for f in fields(cls)}
            for sub in value:
                if sub.replace("-", "_") not in known:
                    raise ValueError(f"{key}.{sub}: unknown key in {p.name}; allowed: {', '.join(sorted(known))}")
            out[key] = {k.replace("-", "_"): v for k, v in value.items()}
        elif key in _FREE_SECTIONS:
            if not isinstance(value, dict):
                raise ValueError(f"{key}: in {p.name} must be a table ([{key}])")
            out[key] = dict(value)
        elif key in _TOP_KEYS:
            out[key] = value
        else:
            raise ValueError(f"{raw_key}: unknown key in study file {p.name}; allowed: "
                             f"{', '.join(sorted(_TOP_KEYS | set(_SECTIONS) | set(_FREE_SECTIONS)))}")
    return out


def build_settings(file_values: dict[str, Any] | None = None, flags: dict[str, Any] | None = None
                   ) -> SearchSettings:
    """defaults < study file < flags (flags given as None are not set). Validated."""
    values: dict[str, Any] = {}
    for src in (file_values or {}, {k: v for k, v in (flags or {}).items() if v is not None}):
        for k, v in src.items():
            if k in _SECTIONS and isinstance(v, dict):
                values[k] = {**values.get(k, {}), **v}
            else:
                values[k] = v
    kwargs: dict[str, Any] = {}
    for k, v in values.items():
        if k in _SECTIONS:
            cls = _SECTIONS[k]
            try:
                kwargs[k] = cls(**v)
            except TypeError as e:
                raise ValueError(f"{k}: {' '.join(str(e).split())}") from None
        else:
            kwargs[k] = v
    if "methods" in kwargs:
        kwargs["methods"] = _methods(kwargs["methods"])
    if "timeout" in kwargs:
        kwargs["timeout"] = parse_duration(kwargs["timeout"])
    if "objectives" in kwargs:
        kwargs["objectives"] = _objectives(kwargs["objectives"])
    for key in ("data", "checkpoint", "storage", "out"):
        if key in kwargs and kwargs[key] is not None:
            kwargs[key] = str(kwargs[key])
    if isinstance(kwargs.get("budget"), int) and not isinstance(kwargs.get("budget"), bool):
        kwargs["budget"] = float(kwargs["budget"])
    try:
        settings = SearchSettings(**kwargs)
    except TypeError as e:
        raise ValueError(f"study: {' '.join(str(e).split())}") from None
    return settings.validate()


def _methods(value: Any) -> tuple[str, ...] | None:
    """Variant keys, or None for every method; names are parsed (and empties refused) by `resolve_variants`."""
    if value is None:
        return None
    if not isinstance(value, (str, list, tuple)):
        raise ValueError(f"methods: {value!r} is not a list of method names")
    names = value.split(",") if isinstance(value, str) else [str(m) for m in value]
    if any(m.strip().lower() == "all" for m in names):
        return None
    return tuple(v.key for v in resolve_variants(names))


def _objectives(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    text = ",".join(p.strip().lower() for p in str(value).split(","))
    text = text.replace("gmacs", "gflops")
    if text not in OBJECTIVES:
        raise ValueError(f"objectives: {value!r}; allowed: {', '.join(OBJECTIVES)}")
    return text


def parse_duration(value: Any) -> float | None:
    """Seconds from 900, 900.0, '900', '900s', '15m', '1.5h'; None stays None."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"timeout: {value!r} is not a duration")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        m = re.match(r"^\s*([0-9]*\.?[0-9]+)\s*([smh]?)\s*$", str(value))
        if not m:
            raise ValueError(f"timeout: {value!r} is not a duration (e.g. 900, 900s, 15m, 1.5h)")
        seconds = float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]
    if not seconds > 0 or not math.isfinite(seconds):
        raise ValueError(f"timeout: {value!r} must be a positive duration")
    return seconds
