"""The study folder: its layout, its frozen and versioned manifest, and the one parser of storage strings.

``tpsexplore search --out DIR --study-name NAME`` writes one study folder, and this module is the only place that
names its files:

```
DIR/NAME/results.db                      results store (`tpsexplore.storage`)
DIR/NAME/optuna.journal                  Optuna storage (journal file) unless --storage gives a URL
DIR/NAME/study.json                      the manifest (`StudyManifest`, written once by the search)
DIR/NAME/weights/trial_<n>.safetensors   fine-tuned weights of a trial (when kept)
DIR/NAME/report/                         written by `tpsexplore report`
```

The manifest holds the facts the search decided and everything downstream needs: the backbone and its geometry,
the budget as a fraction and in GMACs with the baseline's GMACs, the objectives, the fidelity, the storage, the
data, the starting weights (``weights.source``), the proxy definition, the reference baseline speed, the seed and
the versions. Report, export and the notebook read it typed (`read_manifest`); nothing re-derives the budget.

Bottom layer: imports the standard library only (so `--help` and the search settings stay light to import).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping
from urllib.parse import urlsplit

from .errors import one_line



MANIFEST_VERSION = 1
"""Bump when a field changes meaning or a required field is added; readers refuse other versions."""

RESULTS_DB = "results.db"
JOURNAL = "optuna.journal"
MANIFEST = "study.json"  # the historical name, kept so existing studies, docs and dashboards still find it
WEIGHTS_DIR = "weights"
REPORT_DIR = "report"
LOCK = ".coordinator.lock"
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt")
WEIGHTS_SOURCES = ("proxy-pretrained", "hub", "checkpoint", "random")
DATA_KINDS = ("proxy", "real")
ACCURACY_FIDELITIES = ("finetuned", "zero_shot")
STORAGE_KINDS = ("journal", "sqlite", "postgresql", "rdb")
_STORAGE_ALLOWED = ("a journal file (*.journal), postgresql://user:password@host:port/db, or sqlite:///file.db "
                    "(one worker)")


# ============================================================================= atomic writes
def atomic_write(path: str | os.PathLike[str], data: bytes | str | Callable[[BinaryIO], None]) -> Path:
    """Write ``data`` (bytes, text, or a function that writes into a binary file) to a temporary file in the
    same folder, fsync it, then ``os.replace`` it onto ``path``: readers see the old file or the whole new one,
    never a partial one, even after a crash. Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


# ============================================================================= layout
@dataclass(frozen=True)
class StudyLayout:
    """Where each file of a study folder lives (module docstring). ``root`` is ``DIR/NAME``."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def results_db(self) -> Path:
        return self.root / RESULTS_DB

    @property
    def journal(self) -> Path:
        return self.root / JOURNAL

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST

    @property
    def weights_dir(self) -> Path:
        return self.root / WEIGHTS_DIR

    @property
    def report_dir(self) -> Path:
        return self.root / REPORT_DIR

    @property
    def lock(self) -> Path:
        return self.root / LOCK

    def weights(self, number: int, suffix: str = ".safetensors") -> Path:
        """The fine-tuned weights file of trial ``number``."""
        return self.weights_dir / f"trial_{int(number)}{suffix}"

    @property
    def weights_pattern(self) -> str:
        """How the weights files are named, for messages: ``DIR/NAME/weights/trial_<n>.safetensors``."""
        return str(self.weights_dir / "trial_<n>.safetensors")

    def find_weights(self, number: int) -> Path | None:
        """Trial ``number``'s weights file when the study kept it (any of `WEIGHT_SUFFIXES`), else None."""
        for suffix in WEIGHT_SUFFIXES:
            p = self.weights(number, suffix)
            if p.is_file():
                return p
        return None

    @classmethod
    def of_results_db(cls, db: str | os.PathLike[str]) -> "StudyLayout | None":
        """The layout around a results database file, when a manifest sits beside it; None otherwise."""
        p = Path(db)
        layout = cls(p.parent)
        return layout if p.name == RESULTS_DB or layout.manifest.is_file() else None

    def latest_studies(self) -> list[Path]:
        """The study folders under ``root`` (``root/*/results.db``), oldest results store first."""
        return [p.parent for p in sorted(self.root.glob(f"*/{RESULTS_DB}"), key=lambda p: p.stat().st_mtime)]


# ============================================================================= storage strings
@dataclass(frozen=True)
class Storage:
    """A parsed Optuna storage: ``kind`` (journal, sqlite, postgresql, rdb) and ``target`` (the journal path,
    or the URL as given, password included). ``display`` hides the password."""

    kind: str
    target: str

    @property
    def is_journal(self) -> bool:
        return self.kind == "journal"

    @property
    def path(self) -> Path | None:
        """The journal file (None for a URL)."""
        return Path(self.target) if self.is_journal else None

    @property
    def url(self) -> str | None:
        """The database URL (None for a journal)."""
        return None if self.is_journal else self.target

    @property
    def display(self) -> str:
        """The storage as shown to users and written to the manifest: the password replaced by ``***``."""
        if self.is_journal:
            return self.target
        parts = urlsplit(self.target)
        if parts.password is None:
            return self.target
        user, _, host = parts.netloc.rpartition("@")
        name = user.split(":", 1)[0]
        return parts._replace(netloc=f"{name}:***@{host}").geturl()

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "location": self.display}


def parse_storage(text: str | os.PathLike[str] | None, default_journal: str | os.PathLike[str] | None = None
                  ) -> Storage:
    """The one parser of Optuna storage strings.

    None or "" is the default journal (``default_journal``, e.g. ``StudyLayout(dir).journal``); ``journal:PATH``
    or a path ending in .journal/.log is a journal file; ``sqlite:///file.db``, ``postgresql[+driver]://...``
    (``postgres://`` too) and ``mysql``/``mariadb`` URLs are databases. A malformed URL (a bad port, no host)
    raises a one-line ValueError naming the URL and what is allowed.
    """
    if text is None or text == "":
        if default_journal is None:
            raise ValueError(f"storage: none given and no default journal; allowed: {_STORAGE_ALLOWED}")
        return Storage("journal", os.fspath(default_journal))
    if isinstance(text, os.PathLike):
        text = os.fspath(text)
    if not isinstance(text, str):
        raise ValueError(f"storage: {text!r} is not a URL or path; allowed: {_STORAGE_ALLOWED}")
    if text.startswith("journal:"):
        path = text[len("journal:"):]
        if not path:
            raise ValueError(f"storage: {text!r} names no journal file; allowed: {_STORAGE_ALLOWED}")
        return Storage("journal", path)
    if "://" not in text:
        if text.endswith((".journal", ".log")):
            return Storage("journal", text)
        raise ValueError(f"storage: {text!r} is neither a journal file (*.journal) nor a URL; allowed: "
                         f"{_STORAGE_ALLOWED}")
    scheme = text.split("://", 1)[0].split("+", 1)[0].lower()
    kind = {"sqlite": "sqlite", "postgresql": "postgresql", "postgres": "postgresql", "mysql": "rdb",
            "mariadb": "rdb"}.get(scheme)
    if kind is None:
        raise ValueError(f"storage: {_hide(text)!r} uses scheme {scheme!r}; allowed: {_STORAGE_ALLOWED}")
    try:
        parts = urlsplit(text)
        port = parts.port  # raises on a port that is not a number 0-65535
    except ValueError as e:
        raise ValueError(f"storage: {_hide(text)!r} has a bad port ({one_line(e)}); allowed: {_STORAGE_ALLOWED}, "
                         "with the port a number 1-65535") from None
    if port == 0:
        raise ValueError(f"storage: {_hide(text)!r} has port 0; allowed: {_STORAGE_ALLOWED}, with the port a number "
                         "1-65535")
    if kind != "sqlite" and not (parts.hostname or parts.query or parts.path.strip("/")):
        raise ValueError(f"storage: {_hide(text)!r} names no host or database; allowed: {_STORAGE_ALLOWED}")
    return Storage(kind, text)


def _hide(url: str) -> str:
    """``url`` with its password hidden, even when the rest does not parse."""
    scheme, sep, rest = url.partition("://")
    netloc, slash, tail = rest.partition("/")
    user, at, host = netloc.rpartition("@")
    if at and ":" in user:
        netloc = f"{user.split(':', 1)[0]}:***@{host}"
    return f"{scheme}{sep}{netloc}{slash}{tail}"


# ============================================================================= the manifest
class _Reader:
    """Typed access to one JSON object of a manifest; every error names the file and the field."""

    def __init__(self, data: Any, where: str, prefix: str = "") -> None:
        self.where, self.prefix = where, prefix
        if not isinstance(data, dict):
            self.fail("", f"is a {type(data).__name__}, not an object")
        self.data = data

    def fail(self, key: str, why: str) -> None:
        name = f"{self.prefix}{key}" or "the manifest"
        raise ValueError(f"manifest: {self.where} field {name!r} {why}; rerun `tpsexplore search` to rewrite it")

    def get(self, key: str, kind: type | tuple[type, ...], *, optional: bool = False) -> Any:
        if key not in self.data or self.data[key] is None:
            if optional:
                return None
            self.fail(key, "is missing")
        v = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(v, bool) and bool not in kinds:
            self.fail(key, f"is {v!r}, not a {'/'.join(k.__name__ for k in kinds)}")
        if float in kinds and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if not isinstance(v, kinds):
            self.fail(key, f"is {v!r}, not a {'/'.join(k.__name__ for k in kinds)}")
        if isinstance(v, float) and not math.isfinite(v):
            self.fail(key, f"is {v!r}, not a finite number")
        return v

    def choice(self, key: str, allowed: tuple[str, ...]) -> str:
        v = self.get(key, str)
        if v not in allowed:
            self.fail(key, f"is {v!r}; allowed: {', '.join(allowed)}")
        return v

    def sub(self, key: str, *, optional: bool = False) -> "_Reader | None":
        v = self.get(key, dict, optional=optional)
        return None if v is None else _Reader(v, self.where, f"{self.prefix}{key}.")


@dataclass(frozen=True)
class Geometry:
    """The backbone's token geometry: patch tokens, prefix (class/distillation) tokens, blocks, width, input
    size, patch size, classes and heads."""

    num_patches: int
    num_prefix: int
    depth: int
    width: int
    img_size: int
    patch_size: int
    num_classes: int
    num_heads: int

    @classmethod
    def _read(cls, r: _Reader) -> "Geometry":
        out = cls(**{f.name: r.get(f.name, int) for f in fields(cls)})
        for f in fields(cls):
            if getattr(out, f.name) < (0 if f.name == "num_prefix" else 1):
                r.fail(f.name, f"is {getattr(out, f.name)}, not a positive integer")
        return out


@dataclass(frozen=True)
class Budget:
    """The feasibility budget: ``gmacs = fraction x baseline_gmacs``, decided once by the search."""

    fraction: float
    gmacs: float
    baseline_gmacs: float

    @classmethod
    def _read(cls, r: _Reader) -> "Budget":
        out = cls(r.get("fraction", float), r.get("gmacs", float), r.get("baseline_gmacs", float))
        if not 0.0 < out.fraction <= 1.0:
            r.fail("fraction", f"is {out.fraction!r}, outside (0, 1]")
        for key in ("gmacs", "baseline_gmacs"):
            if not getattr(out, key) > 0:
                r.fail(key, f"is {getattr(out, key)!r}, not > 0")
        if not math.isclose(out.gmacs, out.fraction * out.baseline_gmacs, rel_tol=1e-6):
            r.fail("gmacs", f"is {out.gmacs!r}, not fraction x baseline_gmacs = {out.fraction * out.baseline_gmacs!r}")
        return out


@dataclass(frozen=True)
class Objective:
    """One objective: its short name (accuracy, gflops, throughput, latency), the results-store column it
    reads and its direction."""

    name: str
    column: str
    direction: str

    @property
    def spec(self) -> str:
        """``column:direction``, the form the results store keeps."""
        return f"{self.column}:{self.direction}"

    @classmethod
    def _read(cls, r: _Reader) -> "Objective":
        return cls(r.get("name", str), r.get("column", str), r.choice("direction", ("maximize", "minimize")))


@dataclass(frozen=True)
class Fidelity:
    """How accuracy is measured: ``accuracy`` (finetuned or zero_shot, the objective's fidelity), fine-tune
    steps per trial, and the zero-shot gate's settings."""

    accuracy: str
    finetune_steps: int
    gate: dict[str, Any] = field(default_factory=dict)

    @property
    def column(self) -> str:
        return f"accuracy_top1@{self.accuracy}"

    @classmethod
    def _read(cls, r: _Reader) -> "Fidelity":
        return cls(r.choice("accuracy", ACCURACY_FIDELITIES), r.get("finetune_steps", int),
                   r.get("gate", dict, optional=True) or {})


@dataclass(frozen=True)
class DataSource:
    """What the trials were scored on: ``kind`` proxy or real, a one-line ``description`` and the data set's own
    ``details`` (path, classes, sizes, split, ...)."""

    kind: str
    description: str
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def is_proxy(self) -> bool:
        return self.kind == "proxy"

    @classmethod
    def _read(cls, r: _Reader) -> "DataSource":
        return cls(r.choice("kind", DATA_KINDS), r.get("description", str), r.get("details", dict, optional=True) or {})


@dataclass(frozen=True)
class Weights:
    """Where the starting weights came from: ``source`` (proxy-pretrained, hub, checkpoint, random), the
    checkpoint file when there is one, a note for readers, and the rest as ``details``."""

    source: str
    checkpoint: str | None = None
    note: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def _read(cls, r: _Reader) -> "Weights":
        return cls(r.choice("source", WEIGHTS_SOURCES), r.get("checkpoint", str, optional=True),
                   r.get("note", str, optional=True), r.get("details", dict, optional=True) or {})


@dataclass(frozen=True)
class StudyManifest:
    """The facts of one study, written once by the search and read typed by report, export and the notebook.

    ``model_kwargs`` are the timm overrides that rebuild the backbone (img_size, patch_size, num_classes, depth,
    ...); ``proxy`` is the proxy task's definition (None on real data): the resolved pre-training config, the
    proxy version and the cache checkpoint; ``reference`` is the study's reference baseline speed
    (`tpsexplore.search.drift.Reference` as a dict, None when not measured); ``extra`` keeps descriptive
    settings (methods, space, sampler, measure, environment, ...) that no reader re-derives anything from.
    """

    study: str
    backbone: str
    timm_name: str
    model_kwargs: dict[str, Any]
    geometry: Geometry
    budget: Budget
    objectives: tuple[Objective, ...]
    fidelity: Fidelity
    storage: Storage
    data: DataSource
    weights: Weights
    proxy: dict[str, Any] | None
    reference: dict[str, Any] | None
    seed: int
    device: str
    versions: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    version: int = MANIFEST_VERSION

    @property
    def objective_specs(self) -> list[str]:
        """The objectives as ``column:direction`` (the results store's form)."""
        return [o.spec for o in self.objectives]

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["objectives"] = [asdict(o) for o in self.objectives]
        d["storage"] = self.storage.to_dict()
        return {"version": self.version, **{k: v for k, v in d.items() if k != "version"}}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str) + "\n"

    @classmethod
    def from_dict(cls, data: Any, where: str = "the manifest") -> "StudyManifest":
        """Validate and type a manifest dict; one-line ValueError naming ``where`` and the field otherwise."""
        r = _Reader(data, where)
        version = data.get("version")
        if version is None:
            r.fail("version", f"is missing (written by an older tpsexplore; this one reads manifest version "
                              f"{MANIFEST_VERSION})")
        if version != MANIFEST_VERSION:
            raise ValueError(f"manifest: {where} field 'version' is {version!r}; this tpsexplore reads manifest "
                             f"version {MANIFEST_VERSION} only (use the tpsexplore that wrote it)")
        objectives = r.get("objectives", list)
        if len(objectives) != 2:
            r.fail("objectives", f"has {len(objectives)} entries, not 2 (accuracy and a cost)")
        storage = r.sub("storage")
        kind, location = storage.choice("kind", STORAGE_KINDS), storage.get("location", str)
        try:
            parsed = Storage("journal", location) if kind == "journal" else parse_storage(location)
        except ValueError as e:
            storage.fail("location", f"is not a storage URL ({str(e).partition(': ')[2]})")
        return cls(
            study=r.get("study", str), backbone=r.get("backbone", str), timm_name=r.get("timm_name", str),
            model_kwargs=r.get("model_kwargs", dict), geometry=Geometry._read(r.sub("geometry")),
            budget=Budget._read(r.sub("budget")),
            objectives=tuple(Objective._read(_Reader(o, where, f"objectives.{i}.")) for i, o in enumerate(objectives)),
            fidelity=Fidelity._read(r.sub("fidelity")), storage=parsed, data=DataSource._read(r.sub("data")),
            weights=Weights._read(r.sub("weights")), proxy=r.get("proxy", dict, optional=True),
            reference=r.get("reference", dict, optional=True), seed=r.get("seed", int), device=r.get("device", str),
            versions=r.get("versions", dict, optional=True) or {}, extra=r.get("extra", dict, optional=True) or {},
            version=version)

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "the manifest") -> "StudyManifest":
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"manifest: {where} is not valid JSON ({one_line(e)}); rerun `tpsexplore search` to "
                             "rewrite it") from None
        return cls.from_dict(data, where)

    def write(self, layout: StudyLayout) -> Path:
        """Write the manifest atomically to ``layout.manifest``."""
        return atomic_write(layout.manifest, self.to_json())


def read_manifest(layout: StudyLayout) -> StudyManifest:
    """The study's manifest (FileNotFoundError when absent; one-line ValueError when malformed or of another
    version)."""
    path = layout.manifest
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"manifest: {str(path)!r} does not exist; `tpsexplore search` writes it") from None
    except OSError as e:
        raise ValueError(f"manifest: {str(path)!r} cannot be read ({one_line(e)})") from None
    return StudyManifest.from_json(text, repr(str(path)))


def stored_reference(settings: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The reference baseline dict kept under ``"reference"`` in a manifest dict or a results store's study
    settings (both keep it there, so `tpsexplore.search.drift` reads either)."""
    if not settings:
        return None
    ref = settings.get("reference")
    return ref if isinstance(ref, dict) else None


def read_reference(layout: StudyLayout) -> dict[str, Any] | None:
    """The reference stored in the study folder's manifest file, None when there is no readable one."""
    try:
        return stored_reference(json.loads(layout.manifest.read_text()))
    except (OSError, ValueError):
        return None
