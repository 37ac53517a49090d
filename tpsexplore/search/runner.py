"""Run a search: check everything, set up both stores, run the workers, mirror, report.

Processes and stores:

* Workers (the main process itself with ``--workers 1``, else N spawned processes, one GPU each when
  there are several) ask Optuna for trials and write everything about a trial onto the Optuna trial.
* The coordinator (the process that runs ``tpsexplore search``) is the only writer of ``results.db``: it
  mirrors the Optuna trials into it every second (a thread when the main process also runs trials) and
  once more at the end. A flock on ``DIR/NAME/.coordinator.lock`` keeps a second coordinator off the same
  study directory.
* Resume: rerunning the same command finds the study in both stores; RUNNING trials whose worker is gone
  (kill -9) are marked failed ("interrupted") and their configs re-queued (`backend.recover`); the search
  continues until ``--trials`` trials are done (interrupted ones do not count).
* Speed: before the workers start, the unreduced baseline is measured once (the study's *reference*, stored
  in study.json, the results store's study settings and the Optuna study, see `drift`); a resumed study
  reuses it. The throughput / latency objectives are each trial's paired speed-up times the reference. With
  automatic threads the CPU thread count is re-chosen before every trial and recorded on it.
* Confirmation: after the last mirror, the coordinator re-fine-tunes the top front configs (and the
  baseline) with further seeds and stores one ``accuracy_top1@confirmed`` per trial (`confirm`, ``[confirm]``
  / ``--confirm``); skipped after a Ctrl-C, stored ones are not redone, a Ctrl-C during it stores nothing
  half-done.
* Ctrl-C: the running trial is recorded as failed ("interrupted", re-queued next time), the mirror runs
  once more, the front so far is printed, exit code 130.

Bad input fails before anything is written: settings, output directory, methods vs budget, a results
database that is corrupt or belongs to another study, an Optuna study created with other settings, and a
preflight (the model is a ViT, the starting weights load strictly, one image of each data split decodes).

Endings: a search where no trial completed exits 1 with a one-line summary; a full disk stops it with one
line naming the error (completed trials stay readable; rerun to resume); SIGTERM stops it like Ctrl-C and a
spawned worker whose coordinator died stops too, each recording what happened on the interrupted trial.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import optuna
import torch
from optuna.trial import TrialState

from ..errors import one_line
from ..manifest import (Budget, DataSource, Fidelity, Geometry, Objective, StudyLayout, StudyManifest, Weights,
                        read_manifest)
from ..measure.telemetry import usable_core_count
from ..storage import ResultsStore
from ..writable import nearest_existing, probe
from .backend import (A_HEARTBEAT, A_ROLE, A_WORKER, S_ENQUEUED, S_FINGERPRINT, counted, end,
                      make_sampler, open_storage, recover, retries_first, record, storage_display, storage_of,
                      worker_identity)
from .mirror import Mirror
from .objective import TrialContext, record_failure, run_trial
from .progress import Progress, front_table, pareto_front
from .space import SearchSpace, resolve_variants
from .spec import SearchSettings

RECOVER_EVERY_S = 30.0
S_REFERENCE = "tpsx_reference"  # Optuna study user attr: the study's reference baseline (drift.Reference dict)
S_WARNINGS = "tpsx_warnings"  # Optuna study user attr: data that cannot work (split, chance-level baseline)
A_THREADS = "tpsx_threads"  # Optuna trial user attr: CPU threads the trial ran with {threads, automatic, why}
FINGERPRINT_KEYS = ("backbone", "budget", "objectives", "methods", "max_stages", "finetune_steps", "seed",
                    "space", "model", "proxy", "train", "dataset", "data", "checkpoint")


@dataclass
class SearchOutcome:
    """What `run_search` did (the CLI prints it; tests read it)."""

    study_dir: Path
    exit_code: int
    counts: dict[str, int] = field(default_factory=dict)
    front: list[Any] = field(default_factory=list)
    elapsed_s: float = 0.0
    interrupted: bool = False
    notes: list[str] = field(default_factory=list)
    confirmed: list[Any] = field(default_factory=list)  # confirm.ConfirmedTrial per confirmed trial


# ============================================================================= checks (no writes)
def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {spec!r} requested but CUDA is not available here; allowed: auto, cpu")
    return dev


def busy_cores(samples: int = 5, interval: float = 0.05) -> int | None:
    """Cores other processes keep busy right now: the fewest runnable tasks of other processes over a few
    samples (/proc/stat's procs_running minus this process's running threads, see
    `tpsexplore.measure.telemetry.runnable_other_now`).

    Linux only; None where that is not available. The 1-minute load average is not used: it lags by minutes
    and would starve a run started right after other work finished.
    """
    from ..measure.telemetry import runnable_other_now

    counts = []
    for i in range(samples):
        n = runnable_other_now()
        if n is None:
            return None
        counts.append(n)
        if i + 1 < samples:
            time.sleep(interval)
    return min(counts) if counts else None


def cpu_threads(settings: SearchSettings, device: torch.device) -> tuple[int, str]:
    """Intra-op threads for CPU work: ``threads`` if set, OMP_NUM_THREADS if set, else the idle cores.

    On a shared CPU, torch's default (one thread per core) oversubscribes the cores other processes use and
    its spinning threads slow every step several-fold; one thread per idle core (at least one) avoids that
    and equals the default on an idle machine. Chosen at the start of a run, and again before each trial
    when automatic (`trial_threads`); the paired speed-ups do not depend on it.
    """
    cores = usable_core_count()
    if device.type != "cpu":
        return torch.get_num_threads(), "device is not the CPU: torch's default"
    if settings.threads:
        return settings.threads, "set by threads"
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads(), "OMP_NUM_THREADS"
    busy = busy_cores()
    if busy is None:
        return torch.get_num_threads(), "torch's default"
    n = max(1, cores - busy)
    return n, f"{cores} cores, {busy} busy with other processes: one thread per idle core"


def threads_automatic(settings: SearchSettings, device: torch.device) -> bool:
    """Is the CPU thread count chosen by the search (``threads = 0`` and OMP_NUM_THREADS not set)?"""
    return device.type == "cpu" and not settings.threads and not os.environ.get("OMP_NUM_THREADS")


def trial_threads(settings: SearchSettings, device: torch.device, n_workers: int = 1,
                  samples: int = 3, interval: float = 0.02) -> tuple[int, str]:
    """The thread count for the next trial, re-read from the machine (automatic threads only).

    One thread per core that other processes leave idle, at most this worker's share (cores // workers;
    sibling workers count as other processes), at least one. Without /proc the current count is kept.
    """
    cores = usable_core_count()
    busy = busy_cores(samples=samples, interval=interval)
    if busy is None:
        return torch.get_num_threads(), "no /proc/stat: kept"
    share = max(1, cores // max(1, n_workers))
    n = max(1, min(share, cores - busy))
    return n, f"{cores} cores, {busy} busy with other processes" + (f", {n_workers} workers" if n_workers > 1 else "")


def check_output_dir(settings: SearchSettings) -> None:
    """The study directory (or its nearest existing ancestor) must be a writable directory."""
    folder = nearest_existing(settings.study_dir)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"out: {str(folder)!r} is a file, not a directory; choose another --out directory")
    try:
        probe(folder)
    except OSError as e:
        raise ValueError(f"out: {str(folder)!r} is not writable ({e.strerror or e}); choose another --out "
                         "directory") from None


def store_objectives(settings: SearchSettings, device: torch.device) -> list[str]:
    """The objectives as results-store columns (``column:direction``, the form reports read)."""
    acc = f"accuracy_top1@{settings.accuracy_fidelity}:maximize"
    m = settings.measure
    dev = str(device)
    cost = {"gflops": "gmacs@analytic:minimize",
            "throughput": f"throughput@bs{m.batch_size}/{m.dtype}/{dev}:maximize",
            "latency": f"latency_ms@bs1/{m.dtype}/{dev}:minimize"}[settings.cost_objective]
    return [acc, cost]


def fingerprint(settings: SearchSettings, task: Any) -> dict[str, Any]:
    d = settings.to_dict()
    fp = {k: d[k] for k in FINGERPRINT_KEYS}
    fp["data"] = task.data_description
    fp["weights"] = task.weights_description
    return json.loads(json.dumps(fp, default=str))


def _fingerprint_diff(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    for key in (*FINGERPRINT_KEYS, "weights"):
        if old.get(key) != new.get(key):
            return f"{key}: {new.get(key)!r} differs from {old.get(key)!r} stored for this study"
    return None


def check_results_db(path: Path, settings: SearchSettings, objectives: list[str], task: Any) -> int:
    """Refuse a corrupt results DB or one of another study; returns its trial count (0 if absent)."""
    if not path.exists():
        return 0
    with ResultsStore(path) as store:
        names = [s.name for s in store.studies()]
        if not names:
            return 0
        if settings.name not in names:
            raise ValueError(f"results database: {str(path)!r} belongs to study {names[0]!r}, not "
                             f"{settings.name!r}; use another --out or --study-name")
        store.open_study(settings.name, backbone=settings.backbone, budget=float(settings.budget),
                         objectives=objectives, data=task.data_description, weights=task.weights_description)
        return len(store.trials_frame(settings.name))


def check_optuna(settings: SearchSettings, fp: dict[str, Any]) -> bool:
    """Is there already an Optuna study of this name? Refuse one created with other settings."""
    storage = open_storage(settings, create=False)
    if storage is None:
        return False
    try:
        summaries = {s.study_name: s for s in optuna.get_all_study_summaries(storage)}
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"storage: {storage_display(settings)!r} cannot be read: "
                         f"{' '.join(str(e).split())[:300]}") from None
    if settings.name not in summaries:
        return False
    s = summaries[settings.name]
    want = [optuna.study.StudyDirection.MAXIMIZE if d == "maximize" else optuna.study.StudyDirection.MINIMIZE
            for d in settings.directions]
    if list(s.directions) != want:
        raise ValueError(f"objectives: {settings.objectives!r} does not match the directions of Optuna study "
                         f"{settings.name!r} in {storage_display(settings)!r}; use another --study-name")
    old = s.user_attrs.get(S_FINGERPRINT)
    if old:
        diff = _fingerprint_diff(old, fp)
        if diff:
            raise ValueError(f"{diff} (Optuna study {settings.name!r} in {storage_display(settings)!r}); use "
                             "another --study-name or --out to start a new study")
    return True


@contextlib.contextmanager
def coordinator_lock(study_dir: Path):
    """Only one coordinator (results-store writer) per study directory at a time."""
    study_dir.mkdir(parents=True, exist_ok=True)
    path = StudyLayout(study_dir).lock
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise ValueError(f"out: another 'tpsexplore search' (pid {other}) is running on {str(study_dir)!r}; "
                             "add workers to it with --storage from another directory, or wait") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


# ============================================================================= setup (writes)
METRIC_NAMES = {"accuracy": "accuracy", "gflops": "GMACs", "throughput": "throughput (img/s)",
                "latency": "latency (ms)"}
"""Objective names shown by optuna-dashboard (`Study.set_metric_names`), in the settings' objective order."""


def create_study(settings: SearchSettings, space: SearchSpace, fp: dict[str, Any]) -> optuna.Study:
    storage = open_storage(settings)
    study = optuna.create_study(study_name=settings.name, storage=storage, directions=settings.directions,
                                load_if_exists=True)
    names = [METRIC_NAMES[name] for name, _ in settings.objective_pairs]
    if study.metric_names != names:  # optuna-dashboard labels the axes with these, not "Objective 0/1"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(names)
    if S_FINGERPRINT not in study.user_attrs:
        study.set_user_attr(S_FINGERPRINT, fp)
    if not study.user_attrs.get(S_ENQUEUED):
        study.set_user_attr(S_ENQUEUED, True)
        study.enqueue_trial({}, user_attrs={A_ROLE: "baseline"})
        if settings.sampler.name != "grid":  # a grid visits the defaults anyway
            for params in space.default_params():
                study.enqueue_trial(params, user_attrs={A_ROLE: "default"})
    return study


def build_manifest(settings: SearchSettings, space: SearchSpace, task: Any, device: torch.device,
                   objectives: list[str], reference: dict[str, Any] | None = None) -> StudyManifest:
    """The study's manifest (`tpsexplore.manifest.StudyManifest`): what report, export and the notebook read."""
    from dataclasses import asdict

    from ..measure.environment import environment_info

    env = environment_info(device)
    geo = task.geometry
    plain = lambda v: json.loads(json.dumps(v, default=str))  # noqa: E731 - JSON types only
    proxy = None
    if task.proxy:
        from ..measure.data import PROXY_VERSIONS
        from ..measure.train import default_cache_dir, proxy_cache_path, resolve_proxy_config

        cfg = resolve_proxy_config(settings.backbone, task.proxy_cfg)
        proxy = plain({"name": cfg.proxy, "version": PROXY_VERSIONS[cfg.proxy],
                       "config": {k: v for k, v in asdict(cfg).items() if k != "device"},
                       "checkpoint": str(proxy_cache_path(settings.backbone, settings.seed, default_cache_dir(), cfg))})
    w = plain(dict(task.weights_info))
    weights = Weights(source=w.pop("source"), checkpoint=w.pop("checkpoint", None),
                      note=w.pop("note", None) or task.weights_description, details=w)
    names = [name for name, _ in settings.objective_pairs]
    from ..backbones import resolve_name

    return StudyManifest(
        study=settings.name, backbone=settings.backbone, timm_name=resolve_name(settings.backbone),
        model_kwargs=plain(dict(task.model_kwargs)),
        geometry=Geometry(num_patches=geo.num_patches, num_prefix=geo.num_prefix, depth=geo.depth,
                          width=geo.embed_dim, img_size=int(geo.img_size[0]), patch_size=int(geo.patch_size[0]),
                          num_classes=geo.num_classes, num_heads=geo.num_heads),
        budget=Budget(fraction=float(settings.budget), gmacs=float(space.budget_gmacs),
                      baseline_gmacs=float(space.baseline_gmacs)),
        objectives=tuple(Objective(name, *spec.rsplit(":", 1)) for name, spec in zip(names, objectives)),
        fidelity=Fidelity(accuracy=settings.accuracy_fidelity, finetune_steps=settings.finetune_steps,
                          gate=plain(vars(settings.gate))),
        storage=storage_of(settings),
        data=DataSource(kind="proxy" if task.proxy else "real", description=task.data_description,
                        details=plain(task.data_info)),
        weights=weights, proxy=proxy, reference=reference, seed=settings.seed, device=str(device),
        versions=plain({k: env.get(k) for k in ("python", "torch", "timm", "optuna", "fvcore", "tpsexplore",
                                                 "git_commit", "git_dirty")}),
        extra=plain({
            "methods": [v.key for v in space.variants], "excluded_methods": space.excluded,
            "objective_names": settings.objectives, "cpu_threads": torch.get_num_threads(),
            "trials": settings.trials, "timeout_s": settings.timeout, "workers": settings.workers,
            "weights_kept": "every fine-tuned (complete) trial; gated, infeasible and failed trials are never "
                            "fine-tuned, so they have no weights",
            "space": space.describe(), "sampler": vars(settings.sampler), "measure": vars(settings.measure),
            "settings": settings.to_dict(), "environment": env}))


def write_manifest(settings: SearchSettings, manifest: StudyManifest) -> Path:
    """Write the manifest once: a resumed study keeps the one its first run wrote (the Optuna fingerprint has
    already checked that the settings agree); a missing, unreadable or older one is (re)written."""
    layout = StudyLayout(settings.study_dir)
    if layout.manifest.is_file():
        try:
            read_manifest(layout)
            return layout.manifest
        except ValueError as e:
            print(f"[search] rewriting the study manifest: {e}", file=sys.stderr)
    return manifest.write(layout)


# ============================================================================= workers
def _worker_context(settings: SearchSettings, index: int, n_workers: int, stop: Callable[[], bool],
                    task: Any = None) -> TrialContext:
    from ..measure.environment import environment_info
    from .task import Task

    device = resolve_device(settings.device)
    if device.type == "cuda" and torch.cuda.device_count() > 1:
        device = torch.device("cuda", index % torch.cuda.device_count())
    if device.type == "cpu" and n_workers > 1:
        threads, _ = cpu_threads(settings, device)
        torch.set_num_threads(max(1, threads // n_workers))
    if task is None or task.device != device:
        task = Task(settings, device)
    task.prepare(progress=False)
    space = _space(settings, task)
    storage = open_storage(settings)
    trials_now = len(optuna.load_study(study_name=settings.name, storage=storage).get_trials(deepcopy=False))
    study = retries_first(optuna.load_study(
        study_name=settings.name, storage=storage,
        sampler=make_sampler(settings, salt=7919 * (index + 1) + 104729 * trials_now, grid=space.grid_space())))
    return TrialContext(settings=settings, space=space, task=task, study=study,
                        weights_dir=StudyLayout(settings.study_dir).weights_dir, environment=environment_info(device),
                        device=device, stop=stop, baseline_model=task.new_model(),
                        reference=study.user_attrs.get(S_REFERENCE),
                        before_build=thread_hook(settings, device, n_workers))


def thread_hook(settings: SearchSettings, device: torch.device, n_workers: int) -> Callable[[Any], None]:
    """Before each built trial: re-choose the CPU thread count when automatic (`trial_threads`), set it, and
    record it on the trial (user attr ``tpsx_threads``: threads, automatic, why)."""
    def hook(trial: Any) -> None:
        if threads_automatic(settings, device):
            n, why = trial_threads(settings, device, n_workers)
            torch.set_num_threads(n)
            auto = True
        else:
            auto, why = False, ("device is not the CPU" if device.type != "cpu"
                                else "set by threads" if settings.threads else "OMP_NUM_THREADS")
        trial.set_user_attr(A_THREADS, {"threads": torch.get_num_threads(), "automatic": auto, "why": why})
    return hook


def study_reference(settings: SearchSettings, study: optuna.Study, store: ResultsStore, task: Any,
                    device: torch.device) -> dict[str, Any]:
    """The study's reference baseline: the one stored in the Optuna study (or, for a study begun before
    references, in the results store), else measured now with the study's measure settings (at least 5
    windows; batch 1 too when latency is on) and stored in the Optuna study for every worker."""
    from ..measure.throughput import measure_throughput
    from .drift import Reference
    from .objective import throughput_config

    stored = study.user_attrs.get(S_REFERENCE)
    if stored is None:
        row = next((st for st in store.studies() if st.name == settings.name), None)
        stored = (row.settings or {}).get("reference") if row is not None else None
    if stored is not None:
        ref = Reference.from_dict(stored)
        if S_REFERENCE not in study.user_attrs:
            study.set_user_attr(S_REFERENCE, ref.to_dict())
        m = settings.measure
        if (ref.throughput.batch_size, ref.throughput.dtype, ref.throughput.device) != (m.batch_size, m.dtype,
                                                                                        str(device)):
            print(f"[search] warning: the study's reference baseline was measured at batch "
                  f"{ref.throughput.batch_size}/{ref.throughput.dtype}/{ref.throughput.device}, this run measures "
                  f"{m.batch_size}/{m.dtype}/{device}: its paired speeds are scaled by the stored reference",
                  file=sys.stderr)
        return ref.to_dict()
    model = task.new_model()
    try:
        results = measure_throughput(model, throughput_config(settings, device, min_windows=5), label="reference")
    finally:
        del model
    ref = Reference.from_results(results, settings.measure.batch_size,
                                 note={"source": "unreduced baseline measured once at study start"})
    study.set_user_attr(S_REFERENCE, ref.to_dict())
    stored = study.user_attrs.get(S_REFERENCE) or ref.to_dict()  # another coordinator may have been first
    ref = Reference.from_dict(stored)
    lat = f", {ref.latency_ms.value:.3g} ms at batch 1" if ref.latency_ms else ""
    print(f"[search] reference baseline: {ref.throughput.value:.4g} img/s at batch {ref.throughput.batch_size}{lat}"
          + (" (measured under load: every paired speed is scaled by it)" if ref.loaded else ""), file=sys.stderr)
    return ref.to_dict()


def worker_loop(ctx: TrialContext, index: int, deadline: float | None) -> str:
    """Ask/evaluate/tell until --trials are done, the deadline passes or a stop is requested.

    Returns why it stopped ('trials', 'timeout', 'stopped'); re-raises KeyboardInterrupt after recording.
    """
    identity = worker_identity(index)
    study = ctx.study
    while True:
        if ctx.stop():
            return "stopped"
        if deadline is not None and time.time() >= deadline:
            return "timeout"
        if counted(study.get_trials(deepcopy=False)) >= ctx.settings.trials:
            return "trials"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trial = study.ask()
        trial.set_user_attr(A_WORKER, identity)
        trial.set_user_attr(A_HEARTBEAT, time.time())
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                outcome, values = run_trial(ctx, trial)
        except KeyboardInterrupt as exc:
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN) \
                if threading.current_thread() is threading.main_thread() else None
            try:
                record_failure(trial, exc, interrupted=True, why=stop_reason(exc, ctx))
                study.tell(trial, state=TrialState.FAIL)
            finally:
                if previous is not None:
                    signal.signal(signal.SIGINT, previous)
            raise
        except Exception as exc:  # noqa: BLE001 - any failure is recorded; the study goes on
            if disk_error(exc):  # a full disk is not the config's fault: record it if possible, stop the search
                with contextlib.suppress(Exception):
                    record_failure(trial, exc, interrupted=False)
                    study.tell(trial, state=TrialState.FAIL)
                raise
            record_failure(trial, exc, interrupted=False)
            study.tell(trial, state=TrialState.FAIL)
            continue
        if outcome == "complete":
            study.tell(trial, values=values)
        else:
            study.tell(trial, state=TrialState.PRUNED)


def _worker_process(settings: SearchSettings, index: int, n_workers: int, deadline: float | None,
                    parent: int) -> None:
    """Entry point of a spawned worker process."""
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    def stop() -> str:  # the coordinator died (kill -9): stop, recording why
        return f"coordinator {parent} exited" if os.getppid() != parent else ""

    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        ctx = _worker_context(settings, index, n_workers, stop)
        worker_loop(ctx, index, deadline)
    except KeyboardInterrupt:
        sys.exit(130)


def _space(settings: SearchSettings, task: Any) -> SearchSpace:
    space = SearchSpace(task.geometry, settings.budget, resolve_variants(settings.methods), settings.max_stages,
                        settings.space, settings.seed)
    if not space.variants:
        why = "; ".join(f"{k}: {v}" for k, v in space.excluded.items())
        raise ValueError(f"methods: no requested method can meet budget {settings.budget:g}: {why}")
    return space


# ============================================================================= the search
class _Coordinator(threading.Thread):
    """Mirrors Optuna into the results store and drives the progress display, every ``interval`` s."""

    def __init__(self, settings: SearchSettings, mirror: Mirror, progress: Progress, interval: float = 1.0):
        super().__init__(name="tpsx-coordinator", daemon=True)
        self.settings, self.mirror, self.progress, self.interval = settings, mirror, progress, interval
        self.study = optuna.load_study(study_name=settings.name, storage=open_storage(settings))
        self.halt = threading.Event()
        self.error: BaseException | None = None
        self._last_recover = time.time()

    def tick(self) -> None:
        if time.time() - self._last_recover >= RECOVER_EVERY_S:
            self._last_recover = time.time()
            failed, requeued = recover(self.study)  # workers that died since (crash, OOM kill, other hosts)
            if failed:
                print(f"[search] trial(s) {', '.join(map(str, failed))} lost their worker; marked failed"
                      + (f", configs re-queued" if requeued else ""), file=sys.stderr)
        trials = self.study.get_trials(deepcopy=False)
        self.mirror.sync(trials)
        self.progress.update(trials)

    def run(self) -> None:
        while not self.halt.wait(self.interval):
            try:
                self.tick()
            except Exception as e:  # noqa: BLE001 - reported by the main thread
                self.error = e
                return


def run_search(settings: SearchSettings, out: Any = None) -> SearchOutcome:
    """The whole `tpsexplore search` (see the module docstring); prints the front to ``out`` (stdout)."""
    from .task import Task

    out = out or sys.stdout
    t_start = time.time()
    deadline = t_start + settings.timeout if settings.timeout else None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

    # ---- checks: nothing is written before all of them pass
    check_output_dir(settings)
    device = resolve_device(settings.device)
    task = Task(settings, device)
    space = _space(settings, task)
    objectives = store_objectives(settings, device)
    fp = fingerprint(settings, task)
    db_path = StudyLayout(settings.study_dir).results_db
    n_stored = check_results_db(db_path, settings, objectives, task)
    has_optuna = check_optuna(settings, fp)
    if n_stored and not has_optuna:
        raise ValueError(f"storage: {str(db_path)!r} holds {n_stored} trials of study {settings.name!r} but the "
                         f"Optuna storage {storage_display(settings)!r} has no such study; give the --storage it "
                         "was run with, or use another --out")
    notes = [f"method {k} left out: {v}" for k, v in space.excluded.items()]
    said = [f"[search] {note}" for note in notes]
    if device.type == "cpu":  # chosen here; when automatic, again before each trial (thread_hook)
        threads, why = cpu_threads(settings, device)
        torch.set_num_threads(threads)
        said.append(f"[search] CPU: {threads} torch thread(s) ({why}"
                    + ("; re-chosen before each trial)" if threads_automatic(settings, device) else ")"))
    # ---- preflight, still before any write to the study directory: the model is built and its starting
    # weights loaded strictly (--checkpoint), the data is opened and one image of each split decoded. A failure
    # is the only line printed.
    task.prepare(progress=settings.progress)
    for line in said:
        print(line, file=sys.stderr)
    for warning in task.data_info.get("warnings", []):
        print(f"[search] warning: {warning}", file=sys.stderr)

    previous_term = _on_sigterm()
    try:
        with coordinator_lock(settings.study_dir):
            return _search_in(settings, task, space, device, objectives, fp, db_path, notes, out, t_start,
                              deadline)
    except Exception as exc:  # noqa: BLE001 - a full disk becomes one line; anything else is re-raised
        disk = disk_error(exc)
        if disk is None:
            raise
        raise ValueError(f"disk: {disk} while writing the study in {str(settings.study_dir)!r}; the completed "
                         "trials are kept: free space and rerun the same command to resume") from None
    finally:
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)


def _search_in(settings: SearchSettings, task: Any, space: SearchSpace, device: torch.device, objectives: list[str],
               fp: dict[str, Any], db_path: Path, notes: list[str], out: Any, t_start: float,
               deadline: float | None) -> SearchOutcome:
    """The part of `run_search` that writes: both stores, the reference, the workers, confirmation."""
    # ---- both stores
    study = create_study(settings, space, fp)
    store = ResultsStore(db_path)
    try:
        reference = study_reference(settings, study, store, task, device)  # once per study; resume reuses it
        manifest = build_manifest(settings, space, task, device, objectives, reference)
        study_row = store.get_or_create_study(
            settings.name, backbone=settings.backbone, budget=float(settings.budget), objectives=objectives,
            data=task.data_description, weights=task.weights_description,
            settings={**settings.to_dict(), "space": space.describe(), "optuna_storage": storage_display(settings),
                      "reference": reference, "manifest": manifest.to_dict()})
        write_manifest(settings, manifest)
        failed, requeued = recover(study)
        if failed:
            print(f"[search] resumed: trial(s) {', '.join(map(str, failed))} were interrupted (worker gone); "
                  f"marked failed", file=sys.stderr)
        if requeued:
            print(f"[search] re-queued the configs of interrupted trial(s) {', '.join(map(str, requeued))}",
                  file=sys.stderr)
        mirror = Mirror(store, study_row)
        mirror.sync(study.get_trials(deepcopy=False))
        progress = Progress(settings.trials, enabled=settings.progress,
                            cost_name=settings.cost_objective,
                            maximize_cost=settings.maximize_cost,
                            baseline_gmacs=space.baseline_gmacs)
        interrupted = ran = False
        try:
            if settings.workers == 1:
                interrupted = _run_in_process(settings, mirror, progress, deadline, task)
            else:
                interrupted = _run_processes(settings, mirror, progress, deadline)
            ran = True
        finally:
            try:  # after a failure (a full disk) mirror what can be mirrored; the first error is the one raised
                final = optuna.load_study(study_name=settings.name, storage=open_storage(settings))
                trials = final.get_trials(deepcopy=False)
                mirror.sync(trials)
                progress.update(trials)
            except Exception:  # noqa: BLE001
                if ran:
                    raise
            finally:
                progress.close()
        confirmed = None
        if not interrupted:  # the top front configs with more seeds (coordinator only: it writes results.db)
            from .confirm import run_confirmation

            if settings.confirm.top > 0 and threads_automatic(settings, device):
                torch.set_num_threads(trial_threads(settings, device)[0])  # the workers' cores are free now
            try:
                confirmed = run_confirmation(settings, trials, store, study_row, task, space, deadline=deadline)
            except KeyboardInterrupt:
                interrupted = True
        warned = baseline_warnings(trials, task)
        for warning in warned:  # loud, once, and kept on the Optuna study (tpsx_warnings) for the report
            print(f"[search] WARNING: {warning}", file=sys.stderr)
        data_warnings = list(task.data_info.get("warnings", []))
        if warned or data_warnings:
            with contextlib.suppress(Exception):
                final.set_user_attr(S_WARNINGS, data_warnings + warned)
        outcome = _summarise(settings, trials, space, out, t_start, interrupted)
        outcome.notes = notes + data_warnings + warned + (confirmed.notes if confirmed else [])
        outcome.confirmed = confirmed.trials if confirmed else []
        return outcome
    finally:
        store.close()


def baseline_warnings(trials: list, task: Any) -> list[str]:
    """A warning when the unreduced baseline's zero-shot top-1 is not above chance (`chance_warning`)."""
    from ..measure.data import chance_warning

    classes = (task.data_info or {}).get("num_classes")
    if not classes:
        return []
    for t in trials:
        if t.state != TrialState.COMPLETE or t.user_attrs.get(A_ROLE) != "baseline":
            continue
        for m in record(t, "measurements") or []:
            extra = m.get("extra") or {}
            if m.get("kind") == "accuracy_top1" and m.get("fidelity") == "zero_shot" and extra.get("n"):
                w = chance_warning(int(extra.get("correct", 0)), int(extra["n"]), int(classes))
                return [w] if w else []
    return []


def _run_in_process(settings: SearchSettings, mirror: Mirror, progress: Progress, deadline: float | None,
                    task: Any) -> bool:
    """One worker in this (main) thread; the mirror/progress in a thread beside it."""
    ctx = _worker_context(settings, 0, 1, stop=lambda: False, task=task)
    coord = _Coordinator(settings, mirror, progress)
    coord.tick()
    coord.start()
    interrupted = False
    try:
        worker_loop(ctx, 0, deadline)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        coord.halt.set()
        coord.join()
    if coord.error is not None:
        raise coord.error
    return interrupted


def _run_processes(settings: SearchSettings, mirror: Mirror, progress: Progress, deadline: float | None
                   ) -> bool:
    """N spawned worker processes; this process mirrors and shows progress until they are done."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker_process, args=(settings, i, settings.workers, deadline, os.getpid()),
                         name=f"tpsx-worker-{i}", daemon=False) for i in range(settings.workers)]
    for p in procs:
        p.start()
    coord = _Coordinator(settings, mirror, progress)
    interrupted = False
    try:
        while any(p.is_alive() for p in procs):
            coord.tick()
            for p in procs:
                p.join(timeout=1.0 / len(procs))
    except KeyboardInterrupt as exc:
        interrupted = True
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        forward = signal.SIGTERM if isinstance(exc, Stopped) else signal.SIGINT  # workers record the same reason
        try:
            for p in procs:
                if p.is_alive() and p.pid:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(p.pid, forward)
            t_end = time.time() + 60
            for p in procs:
                p.join(timeout=max(0.1, t_end - time.time()))
            for p in procs:
                if p.is_alive():
                    p.terminate()
                    p.join(5)
        finally:
            signal.signal(signal.SIGINT, previous)
    bad = [p.exitcode for p in procs if p.exitcode not in (0, 130, -signal.SIGINT)]
    if bad and not interrupted:
        print(f"[search] warning: worker process(es) exited with code(s) {bad}", file=sys.stderr)
    return interrupted


def _summarise(settings: SearchSettings, trials: list, space: SearchSpace, out: Any, t_start: float,
               interrupted: bool) -> SearchOutcome:
    counts: dict[str, int] = {}
    for t in trials:
        if t.state == TrialState.WAITING:
            continue
        key = end(t, "outcome") or t.state.name.lower()
        counts[key] = counts.get(key, 0) + 1
    front = pareto_front(trials, settings.maximize_cost)
    extra: dict[int, dict[str, Any]] = {}
    for t in trials:
        for m in record(t, "measurements") or []:
            if m.get("kind") == "speedup" and m.get("batch_size", 0) != 1:
                extra.setdefault(t.number, {})["speedup"] = m["value"]
    elapsed = time.time() - t_start
    d = settings.study_dir
    from .recommend import summarise_search  # the report's headline, from the same records

    headline, marks = summarise_search(trials, settings.accuracy_fidelity, d, settings.name, space.baseline_gmacs)
    for number, mark in marks.items():
        extra.setdefault(number, {}).update(mark)
    lines = [
        "",
        f"Pareto front of study {settings.name!r} ({settings.objectives}; feasible = at most "
        f"{settings.budget:g} x baseline {space.baseline_gmacs:.4f} GMACs = {space.budget_gmacs:.4f} GMACs; "
        f"accuracy = top-1 {settings.accuracy_fidelity.replace('_', '-')}):",
        front_table(front, settings.cost_objective, space.baseline_gmacs, extra) if front
        else "  (no feasible complete trial yet)",
        "",
        f"trials: {', '.join(f'{v} {k}' for k, v in sorted(counts.items()))} "
        f"(counted {counted(trials)} of {settings.trials}); elapsed {elapsed / 60:.1f} min"
        + ("; interrupted by Ctrl-C (rerun the same command to resume)" if interrupted else "")
        + (f"; stopped by --timeout {settings.timeout:g} s (rerun, with a longer one, to go on)"
           if settings.timeout and not interrupted and counted(trials) < settings.trials else ""),
        f"study directory: {d}",
        f"  results store : {StudyLayout(d).results_db} (SQLite; tpsexplore.storage.ResultsStore)",
        f"  optuna storage: {storage_display(settings)} (optuna-dashboard {storage_display(settings)})",
        f"  manifest      : {StudyLayout(d).manifest}",
        f"  weights       : {StudyLayout(d).weights_pattern} (fine-tuned trials)",
        f"  report        : tpsexplore report {d}  (writes {StudyLayout(d).report_dir}/)",
        "",
        *headline,
    ]
    print("\n".join(lines), file=out, flush=True)
    code = 130 if interrupted else 0
    complete = sum(1 for t in trials if t.state == TrialState.COMPLETE)
    if not interrupted and complete == 0:  # the search ran but measured nothing: exit 1 with one line
        print(f"search: {no_trial_summary(trials)}; see {StudyLayout(d).results_db}", file=sys.stderr, flush=True)
        code = 1
    return SearchOutcome(study_dir=d, exit_code=code, counts=counts, front=front,
                         elapsed_s=elapsed, interrupted=interrupted)


def no_trial_summary(trials: list) -> str:
    """``0 of 4 trials completed (4 failed: nan loss)``: the commonest failure reasons, shortened."""
    done = [t for t in trials if t.state != TrialState.WAITING]
    reasons: dict[str, int] = {}
    for t in done:
        if t.state == TrialState.COMPLETE:
            continue
        outcome = end(t, "outcome") or t.state.name.lower()
        reasons[f"{outcome}: {_short_reason(end(t, 'reason') or '')}".rstrip(": ")] = \
            reasons.get(f"{outcome}: {_short_reason(end(t, 'reason') or '')}".rstrip(": "), 0) + 1
    parts = ", ".join(f"{n} {why}" for why, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:3])
    return f"0 of {len(done)} trials completed" + (f" ({parts})" if parts else "")


def _short_reason(reason: str) -> str:
    """The gist of a recorded failure reason: 'nan loss', 'undecodable image', else its first words."""
    low = reason.lower()
    if "nan" in low and ("loss" in low or "finite" in low):
        return "nan loss"
    if "cannot identify image" in low or "cannot be decoded" in low or "unidentifiedimage" in low:
        return "undecodable image"
    text = reason.split(":", 1)[1].strip() if reason.startswith(("error:", "interrupted:")) else reason
    return " ".join(text.split()[:8])


# ============================================================================= faults
class Stopped(KeyboardInterrupt):
    """The search was stopped by something other than Ctrl-C; ``why`` says what (recorded on the trial)."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Stopped("terminated (SIGTERM)")


def _on_sigterm() -> Any:
    """SIGTERM stops the search like Ctrl-C, recorded as 'terminated (SIGTERM)' (main thread only); returns the
    previous handler (None when not installed)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_terminated)


def stop_reason(exc: BaseException, ctx: TrialContext) -> str | None:
    """Why a trial was interrupted: a signal (`Stopped`), the worker's stop condition (a coordinator that
    exited), else None (Ctrl-C)."""
    why = getattr(exc, "why", None)
    if why:
        return str(why)
    try:
        s = ctx.stop()
    except Exception:  # noqa: BLE001
        return None
    return s if isinstance(s, str) and s else None


_DISK_ERRNOS = {28, 27, 122}  # ENOSPC, EFBIG, EDQUOT


def disk_error(exc: BaseException) -> str | None:
    """'No space left on device (...)' when ``exc`` (or its cause) is a full disk or file-size limit, else None."""
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _DISK_ERRNOS:
            where = f" ({e.filename})" if e.filename else ""
            return f"{e.strerror or os.strerror(e.errno)}{where}"
        text = str(e).lower()
        if "database or disk is full" in text or "no space left on device" in text or "file too large" in text:
            return one_line(e, limit=200)
        e = e.__cause__ or e.__context__
    return None
