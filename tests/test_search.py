"""`tpsexplore search` end to end on the tiny smoke study (studies/smoke.toml): real timm models, real Optuna
journal files, real SQLite results stores, a real PostgreSQL server (tests/pg.py), real subprocesses killed
with SIGKILL / SIGINT. No mocks. The tiny proxy backbone is pre-trained once per session into a temporary
cache (TPSEXPLORE_CACHE)."""
from __future__ import annotations

import hashlib
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from tpsexplore.cli import main
from tpsexplore.measure.flops import geometry
from tpsexplore.reduce import ReductionConfig
from tpsexplore.search.drift import study_speed
from tpsexplore.search.backend import (A_INTERRUPTED, A_RETRY_OF, A_ROLE, SearchJournalBackend, end, info,
                                       make_sampler, open_storage)
from tpsexplore.search.runner import busy_cores, cpu_threads
from tpsexplore.search.objective import GateSettings, TrialContext, gate_decision, run_trial
from tpsexplore.search.space import SearchSpace, SpaceSettings, default_variants, resolve_variants
from tpsexplore.search.spec import build_settings, load_study_file
from tpsexplore.storage import ResultsStore
from cli_run import run_cli

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "studies" / "smoke.toml"
optuna.logging.set_verbosity(optuna.logging.WARNING)




pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is faster


def _env(cache: Path) -> dict[str, str]:
    return {**os.environ, "TPSEXPLORE_CACHE": str(cache), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _study_file(tmp_path: Path, extra: str = "", name: str = "study.toml") -> Path:
    """The smoke study with extra TOML appended (later keys of a table must not repeat: use new tables)."""
    path = tmp_path / name
    path.write_text(SMOKE.read_text() + "\n" + extra)
    return path


def _md5(path: Path) -> str | None:
    return hashlib.md5(path.read_bytes()).hexdigest() if path.exists() else None


def _frame(study_dir: Path):
    with ResultsStore(study_dir / "results.db") as store:
        return store.trials_frame(study_dir.name)


def _optuna_trials(study_dir: Path, name: str = "smoke"):
    storage = optuna.storages.JournalStorage(SearchJournalBackend(str(study_dir / "optuna.journal")))
    return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)


@pytest.fixture(scope="module")
def smoke_run(proxy_cache, tmp_path_factory):
    """One complete in-process smoke search (8 trials), shared by the checks below."""
    out = tmp_path_factory.mktemp("smoke-out")
    torch.set_num_threads(1)
    import contextlib
    import io

    buf_out, buf_err = io.StringIO(), io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(buf_out), contextlib.redirect_stderr(buf_err):
        rc = main(["search", "--study", str(SMOKE), "--out", str(out)])
    return {"rc": rc, "dir": out / "smoke", "out": out, "stdout": buf_out.getvalue(), "stderr": buf_err.getvalue(),
            "seconds": time.perf_counter() - t0}


# ============================================================================= space and sampler
def test_space_defaults_feasibility_and_rollout_exclusion():
    geo = geometry("deit_t")
    space = SearchSpace(geo, 0.35, default_variants(), max_stages=3)
    assert set(space.excluded) == {"rollout", "rollout+squeeze"}  # its scoring pass alone is a full forward
    keys = [v.key for v in space.variants]
    assert {"similarity+squeeze", "random+squeeze"} <= set(keys)
    assert "topk+squeeze" not in keys and "dynamicvit+squeeze" not in keys  # same as etps / dtps
    defaults = [space.from_params(p) for p in space.default_params()]
    assert {c.variant for c in defaults} == {"dtps", "etps", "dynamicvit", "evit", "topk", "tome", "similarity",
                                             "random"}
    for c in defaults:
        assert c.feasible and c.fraction > 0.30, (c.config.label, c.fraction)  # fills the 35% budget
    etps = next(c for c in defaults if c.variant == "etps")
    assert len(etps.config.locations) == 3 and min(etps.config.keep_ratios) >= 0.5
    # at a loose budget the published defaults come back unchanged: keep 0.7 at [3, 6, 9], ToMe r=13
    loose = SearchSpace(geo, 1.0, default_variants(), max_stages=3)
    by = {c.variant: c.config for c in (loose.from_params(p) for p in loose.default_params())}
    assert by["etps"].locations == (3, 6, 9) and abs(by["etps"].keep_ratios[0] - 0.7) < 0.01
    assert by["tome"].r == 13


def test_sampled_trials_feasible_share_and_valid_configs(tmp_path):
    """> 80% of the configs the sampler proposes (not the enqueued ones) meet the budget."""
    settings = build_settings({}, {"out": str(tmp_path), "budget": 0.35, "study_name": "share"})
    space = SearchSpace(geometry("deit_t"), 0.35, resolve_variants(None), 3)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=make_sampler(settings))
    feasible, n, methods = 0, 120, set()
    for _ in range(n):
        trial = study.ask()
        cand = space.suggest(trial)
        trial.set_constraint("budget", cand.constraint)
        cand.config.validate(12)
        locs = cand.config.locations
        assert all(b > a for a, b in zip(locs, locs[1:])) and len(locs) <= 3
        feasible += cand.feasible
        methods.add(cand.variant)
        acc = 0.9 - 0.5 * (1 - cand.fraction) + 0.01 * len(locs)  # a cheap stand-in for accuracy
        study.tell(trial, [acc, cand.gmacs])
    assert feasible / n > 0.8
    assert len(methods) >= 6


def test_infeasible_sample_is_recorded_in_under_10ms(tmp_path):
    """An over-budget sample: analytic count, set_constraint, records and tell; no model is built."""
    settings = build_settings({}, {"out": str(tmp_path), "budget": 0.2, "study_name": "infeasible"})
    space = SearchSpace(geometry("deit_t"), 0.2, resolve_variants(["etps"]), 3,
                        SpaceSettings(grid_locations=((3, 6, 9),), grid_keep_ratios=(0.7,)))
    study = optuna.create_study(study_name="infeasible", storage=open_storage(settings),
                                directions=["maximize", "minimize"], sampler=make_sampler(settings))
    ctx = TrialContext(settings=settings, space=space, task=None, study=study, weights_dir=tmp_path / "w",
                       environment={}, device=torch.device("cpu"))
    times = []
    for _ in range(15):
        study.enqueue_trial({"method": "etps", "locations": "3,6,9", "keep": 0.7, "temperature": 1.0})
        trial = study.ask()
        t0 = time.perf_counter()
        outcome, values = run_trial(ctx, trial)
        study.tell(trial, state=TrialState.PRUNED)
        times.append(time.perf_counter() - t0)
        assert outcome == "infeasible" and values is None
    assert statistics.median(times) < 0.010, times
    t = study.get_trials()[-1]
    assert t.constraints["budget"] > 0.4 and t.state == TrialState.PRUNED
    assert end(t, "outcome") == "infeasible" and "budget 0.2" in end(t, "reason")
    assert not (tmp_path / "w").exists()


def test_gate_stops_only_configs_that_cannot_reach_the_front():
    def done(number, variant, zs, ft, cost, feasible=True):
        t = optuna.trial.create_trial(
            values=[ft, cost], user_attrs={"tpsx_info": {"variant": variant, "feasible": feasible, "label": variant},
                                           "tpsx_zero_shot_top1": zs, "tpsx_finetuned_top1": ft})
        t.number = number
        return t

    trials = [done(0, "none", 0.95, 0.96, 1.0, feasible=False), done(1, "etps", 0.70, 0.80, 0.40),
              done(2, "tome", 0.60, 0.72, 0.38)]
    gate = GateSettings(min_finetuned=3, gain_factor=1.25, margin=0.02)
    # largest gain 0.12 -> optimistic = zs + 0.15 + 0.02
    assert not gate_decision(trials, "etps", 0.55, 0.41, False, gate).go  # 0.72 < 0.80 at a higher cost
    assert gate_decision(trials, "etps", 0.55, 0.30, False, gate).go  # cheaper than everything: may be on front
    assert gate_decision(trials, "etps", 0.66, 0.41, False, gate).go  # 0.83 > 0.80
    assert gate_decision(trials[:2], "etps", 0.10, 0.41, False, gate).go  # too few fine-tuned trials: open
    assert gate_decision(trials, "etps", 0.10, 0.41, False, GateSettings(enabled=False)).go


def test_cpu_threads_explicit_env_or_idle_cores(monkeypatch):
    cpu = torch.device("cpu")
    assert cpu_threads(build_settings({"threads": 1}), cpu) == (1, "set by threads")
    with pytest.raises(ValueError, match=r"^threads: -1 is not an integer >= 0"):
        build_settings({"threads": -1})
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cpu_threads(build_settings({}), cpu)[1] == "OMP_NUM_THREADS"
    monkeypatch.delenv("OMP_NUM_THREADS")
    busy = busy_cores(samples=2, interval=0.0)
    assert busy is None or busy >= 0
    n, why = cpu_threads(build_settings({}), cpu)
    assert 1 <= n <= (os.cpu_count() or 1) and ("idle core" in why or why == "torch's default")


def test_study_files_parse_and_build():
    files = sorted((ROOT / "studies").glob("*.toml"))
    assert {f.name for f in files} >= {"deit_t_budget035.toml", "deit_s_paper.toml", "smoke.toml"}
    for f in files:
        s = build_settings(load_study_file(f))
        assert s.study_file
    head = build_settings(load_study_file(ROOT / "studies" / "deit_t_budget035.toml"))
    cli_default = build_settings({}, {"backbone": "deit_t", "budget": 0.35})
    strip = lambda d: {k: v for k, v in d.items() if k not in ("study_file", "study_name")}  # noqa: E731
    assert strip(head.to_dict()) == strip(cli_default.to_dict())  # the same study, resumable either way
    paper = build_settings(load_study_file(ROOT / "studies" / "deit_s_paper.toml"))
    space = SearchSpace(geometry("deit_s"), paper.budget, resolve_variants(paper.methods), paper.max_stages,
                        paper.space, paper.seed)
    assert set(space.grid_locations) == {"3,6,9", "2,4,6,8", "3,5,7,9"}
    etps = space.from_params({"method": "etps", "locations": "2,4,6,8", "keep": 0.5, "temperature": 1.0})
    assert etps.config == ReductionConfig("etps", (2, 4, 6, 8), (0.5,), temperature=1.0)
    tome = space.from_params({"method": "tome", "locations": "3,6,9", "keep": 0.7})
    assert abs(tome.gmacs - space.cost(ReductionConfig("etps", (3, 6, 9), (0.7,)))) / tome.gmacs < 0.05


# ============================================================================= end to end (in process)
def test_grid_study_runs_to_its_last_grid_point(proxy_cache, tmp_path):
    """A grid study whose trials cover the whole grid ends with exit 0: Optuna's GridSampler stops the study on
    its last point, which raises outside `Study.optimize`, so the search's sampler must not."""
    base = SMOKE.read_text()
    text = base.replace('study_name = "smoke"', 'study_name = "grid"').replace("trials = 8", "trials = 3")
    text = text.replace('methods = ["etps", "tome", "similarity+squeeze", "random"]', 'methods = ["topk", "random"]')
    text = text.replace("[sampler]\nn_startup_trials = 2", '[sampler]\nname = "grid"')
    text += "\n[space]\ngrid_locations = [[1]]\ngrid_keep_ratios = [0.5]\nsample_options = false\n[confirm]\ntop = 0\n"
    study = tmp_path / "grid.toml"
    study.write_text(text)
    rc, out, err = run_cli(["search", "--study", study, "--out", tmp_path / "runs", "--quiet"])
    assert rc == 0, err[-2000:]
    trials = _optuna_trials(tmp_path / "runs" / "grid", "grid")
    assert len(trials) == 3 and all(t.state.is_finished() for t in trials), [t.state for t in trials]
    assert sorted(t.params.get("method") for t in trials[1:]) == ["random", "topk"]  # each grid point once


def test_smoke_search_records_everything(smoke_run):
    assert smoke_run["rc"] == 0, smoke_run["stderr"][-2000:]
    d = smoke_run["dir"]
    assert "Pareto front of study 'smoke'" in smoke_run["stdout"] and str(d / "results.db") in smoke_run["stdout"]
    frame = _frame(d)
    assert len(frame) == 8 and set(frame["state"]) <= {"complete", "pruned", "infeasible", "failed"}
    trials = {t.number: t for t in _optuna_trials(d)}
    assert trials[0].user_attrs[A_ROLE] == "baseline" and trials[0].constraints["budget"] > 0  # reference
    assert [trials[i].user_attrs[A_ROLE] for i in (1, 2, 3)] == ["default"] * 3
    complete = frame[frame["state"] == "complete"]
    assert len(complete) >= 4
    for col in ("gmacs@analytic", "params@analytic", "accuracy_top1@zero_shot", "accuracy_top5@zero_shot",
                "accuracy_top1@finetuned", "accuracy_top5@finetuned", "throughput@bs16/fp32/cpu",
                "baseline_throughput@bs16/fp32/cpu", "speedup@bs16/fp32/cpu", "latency_ms@bs1/fp32/cpu",
                "baseline_latency_ms@bs1/fp32/cpu"):
        assert complete[col].notna().all(), col
    for row in complete.itertuples():
        assert (d / "weights" / f"trial_{row.number}.safetensors").is_file()
    with ResultsStore(d / "results.db") as store:
        study = store.open_study("smoke")
        assert study.objectives == ("accuracy_top1@finetuned:maximize", "gmacs@analytic:minimize")
        meas = store.measurements_frame("smoke", kind="throughput")
        assert meas["environment_id"].notna().all()
        env = store.environment(int(meas["environment_id"].iloc[0]))
        assert env["torch"] and env["device"] == "cpu"
    from tpsexplore.manifest import StudyLayout, read_manifest

    manifest = read_manifest(StudyLayout(d))
    assert manifest.data.kind == "proxy" and manifest.data.details["source"] == "cluttered"
    assert manifest.data.details["proxy"]["name"] == "cluttered" and manifest.weights.source == "proxy-pretrained"
    assert manifest.storage.kind == "journal" and manifest.storage.display.endswith("optuna.journal")
    assert manifest.extra["methods"] == ["etps", "tome", "similarity+squeeze", "random"]
    feasible = frame[(frame["state"] == "complete") & (frame["feasible"])]
    assert len(feasible) >= 3


@pytest.mark.parametrize("objectives,column,direction", [
    ("accuracy,throughput", "throughput@bs16/fp32/cpu", optuna.study.StudyDirection.MAXIMIZE),
    ("accuracy,latency", "latency_ms@bs1/fp32/cpu", optuna.study.StudyDirection.MINIMIZE),
])
def test_measured_speed_objectives(proxy_cache, tmp_path, capsys, objectives, column, direction):
    name = objectives.replace(",", "_")
    assert main(["search", "--study", str(SMOKE), "--out", str(tmp_path), "--study-name", name, "--trials", "4",
                 "--objectives", objectives, "--quiet"]) == 0
    trials = _optuna_trials(tmp_path / name, name)
    study = optuna.load_study(study_name=name, storage=optuna.storages.JournalStorage(
        SearchJournalBackend(str(tmp_path / name / "optuna.journal"))))
    assert study.directions == [optuna.study.StudyDirection.MAXIMIZE, direction]
    frame = _frame(tmp_path / name).set_index("number")
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(done) >= 2
    with ResultsStore(tmp_path / name / "results.db") as store:
        ref, speeds = study_speed(store, name)
    assert ref is not None and speeds["basis"].eq("paired").all()
    speeds = speeds.set_index("number")
    plotted = column.split("@")[0]
    for t in done:  # the second objective is the trial's paired speed (speed-up x the study's reference)
        assert t.values[1] == pytest.approx(speeds.loc[t.number, plotted], rel=1e-6)
        assert frame.loc[t.number, column] > 0  # the raw figure stays in the results store
    assert "Pareto front of study" in capsys.readouterr().out


def test_timeout_stops_starting_trials(proxy_cache, tmp_path, capsys):
    # the timeout counts from the start: 8 s leave the set-up (cached proxy, data, the reference baseline's timing)
    # room on a slow CI machine, where 2 s sometimes left none, and stop long before 60 trials
    assert main(["search", "--study", str(SMOKE), "--out", str(tmp_path), "--trials", "60", "--timeout", "8s",
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    assert 1 <= len(_frame(tmp_path / "smoke")) < 60 and "stopped by --timeout 8 s" in out
    with pytest.raises(ValueError, match=r"^timeout: 'soon' is not a duration"):
        build_settings({}, {"timeout": "soon"})


def test_trial_that_raises_is_recorded_and_the_study_goes_on(proxy_cache, tmp_path, capsys):
    study = _study_file(tmp_path)
    text = study.read_text().replace("[train]\nbatch_size = 32\nlr = 1e-3", "[train]\nbatch_size = 32\nlr = 1e12")
    assert "lr = 1e12" in text
    study.write_text(text.replace('study_name = "smoke"', 'study_name = "nan"'))
    rc = main(["search", "--study", str(study), "--out", str(tmp_path / "o"), "--trials", "3", "--quiet"])
    assert rc == 1  # the search ran but no trial completed (issue 11): exit 1 with a one-line summary
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("search: 0 of 3 trials completed (3 failed")
    frame = _frame(tmp_path / "o" / "nan")
    assert len(frame) == 3 and (frame["state"] == "failed").all()
    assert frame["reason"].str.contains("FloatingPointError: loss").all()
    assert frame["accuracy_top1@zero_shot"].notna().all()  # what it had before failing is kept


# ============================================================================= bad input: exit 2, nothing written
@pytest.mark.parametrize("args,needle", [
    (["--budget", "0"], "budget: 0.0 is outside (0, 1]"),
    (["--budget", "1.5"], "budget: 1.5 is outside (0, 1]"),
    (["--budget", "-0.2"], "budget: -0.2 is outside (0, 1]"),
    (["--methods", "etps,nosuchmethod"], "methods: unknown method 'nosuchmethod'"),
    (["--max-stages", "5"], "--max-stages: 5 is outside 1..4"),  # the CLI names its flag, not the field
    (["--storage", "sqlite:///x.db", "--workers", "2"], "storage: a SQLite URL"),
])
def test_bad_flags_exit_2_one_line_db_untouched(smoke_run, capsys, args, needle):
    d = smoke_run["dir"]
    before = (_md5(d / "results.db"), _md5(d / "optuna.journal"))
    rc = main(["search", "--study", str(SMOKE), "--out", str(smoke_run["out"]), *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and needle in err and len(err.splitlines()) == 1, err
    assert (_md5(d / "results.db"), _md5(d / "optuna.journal")) == before


def test_bad_study_files_and_output_dirs_exit_2(smoke_run, tmp_path, capsys):
    cases = []
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("budget = \n")
    cases.append((["--study", str(bad_toml)], "is not valid TOML"))
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("budgett = 0.3\n")
    cases.append((["--study", str(unknown)], "budgett: unknown key"))
    wrong = tmp_path / "wrong.toml"
    wrong.write_text("budget = 2.0\n")
    cases.append((["--study", str(wrong)], "budget: 2.0 is outside (0, 1]"))
    cases.append((["--study", str(tmp_path / "missing.toml")], "not found"))
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases.append((["--study", str(SMOKE), "--out", str(afile / "sub")], "is a file, not a directory"))
    cases.append((["--study", str(SMOKE), "--out", "/proc/tpsx-test"], "is not writable"))
    for args, needle in cases:
        rc = main(["search", *args])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and needle in err and len(err.splitlines()) == 1, (args, err)
    assert not (afile.parent / "afile").is_dir()


def test_foreign_or_corrupt_results_db_exit_2_untouched(proxy_cache, tmp_path, capsys):
    other = tmp_path / "other" / "smoke"
    other.mkdir(parents=True)
    with ResultsStore(other / "results.db") as store:
        store.get_or_create_study("someone-else", backbone="deit_s", budget=0.5)
    corrupt = tmp_path / "corrupt" / "smoke"
    corrupt.mkdir(parents=True)
    (corrupt / "results.db").write_bytes(b"not a database" * 300)
    for out, needle in ((tmp_path / "other", "belongs to study 'someone-else'"),
                        (tmp_path / "corrupt", "is corrupt or not a SQLite file")):
        db = out / "smoke" / "results.db"
        before = _md5(db)
        rc = main(["search", "--study", str(SMOKE), "--out", str(out)])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and needle in err and len(err.splitlines()) == 1, err
        assert _md5(db) == before and not (out / "smoke" / "optuna.journal").exists()


def test_settings_mismatch_with_existing_study_exit_2(smoke_run, capsys):
    d = smoke_run["dir"]
    before = (_md5(d / "results.db"), _md5(d / "optuna.journal"))
    rc = main(["search", "--study", str(SMOKE), "--out", str(smoke_run["out"]), "--budget", "0.45"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "budget: 0.45" in err and len(err.splitlines()) == 1, err
    assert (_md5(d / "results.db"), _md5(d / "optuna.journal")) == before


# ============================================================================= resilience (subprocesses)
def _wait_for(study_dir: Path, pred, proc: subprocess.Popen, timeout: float = 120.0, name: str = "smoke"):
    """Poll the journal until pred(trials) holds; fail if the process ends first."""
    t_end = time.time() + timeout
    while time.time() < t_end:
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"search ended early (rc {proc.returncode}): {err[-1500:]}")
        if (study_dir / "optuna.journal").exists():
            try:
                trials = _optuna_trials(study_dir, name)
            except (KeyError, ValueError):
                trials = []
            if trials and pred(trials):
                return trials
        time.sleep(0.1)
    proc.kill()
    pytest.fail("timed out waiting for the search")


def _mid_trial(trials, min_done: int):
    """At least min_done finished trials and one running trial inside its measurement phases."""
    done = sum(t.state.is_finished() for t in trials)
    running = [t for t in trials if t.state == TrialState.RUNNING
               and str(t.user_attrs.get("tpsx_phase", "")).startswith(("throughput", "zero-shot", "fine-tune"))]
    return done >= min_done and bool(running)


def test_kill9_and_ctrl_c_then_resume(proxy_cache, tmp_path):
    # slower throughput windows so that a trial is reliably caught in the middle
    study = _study_file(tmp_path, "")
    study.write_text(study.read_text().replace("window_s = 0.02\nwindows = 1", "window_s = 0.25\nwindows = 2"))
    out = tmp_path / "out"
    d = out / "smoke"
    cmd = [sys.executable, "-m", "tpsexplore.cli", "search", "--study", str(study), "--out", str(out)]
    env = _env(proxy_cache)

    # 1) kill -9 in the middle of a trial
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(d, lambda ts: _mid_trial(ts, 2), proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    at_kill = _optuna_trials(d)  # the results store may lag by its 1 s mirror interval: Optuna is the truth
    done_before = {t.number: t.values for t in at_kill if t.state == TrialState.COMPLETE}
    running = [t.number for t in at_kill if t.state == TrialState.RUNNING]
    assert len(done_before) >= 2 and len(running) == 1
    killed = running[0]
    n_before = len(at_kill)

    # 2) resume, then Ctrl-C in the middle of another trial: stops cleanly after recording
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(d, lambda ts: _mid_trial(ts, n_before) and any(
        t.state == TrialState.RUNNING and t.number > killed for t in ts), proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-1500:]
    assert "Pareto front" in stdout and "interrupted" in stderr
    mid = _frame(d)
    assert (mid["state"] == "running").sum() == 0
    stopped = mid[mid["reason"].fillna("").str.startswith("interrupted: the search was stopped")]
    assert len(stopped) == 1

    # 3) resume to the end
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    final = _frame(d)
    trials = {t.number: t for t in _optuna_trials(d)}
    # completed trials are intact
    after = final.set_index("number")
    for n, values in done_before.items():
        assert after.loc[n, "state"] == "complete"
        assert after.loc[n, "accuracy_top1@finetuned"] == values[0] and after.loc[n, "gmacs@analytic"] == values[1]
        assert trials[n].values == values
    # both interrupted trials are failed with the reason, and their configs were re-run
    for n in (killed, int(stopped["number"].iloc[0])):
        assert after.loc[n, "state"] == "failed" and after.loc[n, "reason"].startswith("interrupted")
        assert trials[n].user_attrs.get(A_INTERRUPTED)
        retry = [t for t in trials.values() if t.user_attrs.get(A_RETRY_OF) == n]
        assert len(retry) == 1 and retry[0].state.is_finished() and retry[0].params == trials[n].params
        assert info(retry[0], "config") == info(trials[n], "config")
    counted = [t for t in trials.values() if t.state.is_finished() and not t.user_attrs.get(A_INTERRUPTED)]
    assert len(counted) == 8 and (final["state"] != "running").all()
    assert "Pareto front" in res.stdout


def test_two_workers_share_a_journal_study(proxy_cache, tmp_path):
    study = _study_file(tmp_path, "")
    # trials of ~2 s, so that both workers are up before the study is done
    study.write_text(study.read_text().replace("window_s = 0.02\nwindows = 1", "window_s = 0.25\nwindows = 2"))
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "tpsexplore.cli", "search", "--study", str(study), "--out",
                          str(out), "--workers", "2", "--trials", "7"], env=_env(proxy_cache),
                         capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "database is locked" not in res.stderr + res.stdout
    frame = _frame(out / "smoke")
    assert 7 <= len(frame) <= 8 and (frame["state"] != "running").all()
    assert frame["worker"].nunique() == 2, frame[["number", "worker"]]
    assert len(frame["number"]) == frame["number"].nunique()


def test_postgresql_optuna_storage(proxy_cache, postgres_url, tmp_path, capsys):
    args = ["search", "--study", str(SMOKE), "--out", str(tmp_path), "--storage", postgres_url, "--trials", "5",
            "--study-name", "pg_smoke", "--quiet"]
    assert main(args) == 0
    trials = optuna.load_study(study_name="pg_smoke", storage=postgres_url).get_trials()
    assert len([t for t in trials if t.state.is_finished()]) == 5
    frame = _frame(tmp_path / "pg_smoke")
    assert sorted(frame["number"]) == sorted(t.number for t in trials if t.state.is_finished())
    assert "postgresql" in (tmp_path / "pg_smoke" / "study.json").read_text()  # the manifest's storage
    assert not (tmp_path / "pg_smoke" / "optuna.journal").exists()
    # the same command again: nothing left to do, nothing duplicated
    assert main(args) == 0
    assert len(_frame(tmp_path / "pg_smoke")) == 5
