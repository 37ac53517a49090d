"""benchmarks/sampler_compare.py on the tiny smoke study: the hypervolume bookkeeping, the shared warm start and
the evaluation cache (real proxy pre-training, real Optuna samplers, real reduced models)."""
import importlib.util
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest

from tpsexplore.report.pareto import hypervolume

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "studies" / "smoke.toml"
TRIALS = 8


def _load():
    spec = importlib.util.spec_from_file_location("sampler_compare", ROOT / "benchmarks" / "sampler_compare.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench():
    return _load()


@pytest.fixture(scope="module")
def tiny_run(bench, tmp_path_factory):
    cache = tmp_path_factory.mktemp("samplercache")
    out = tmp_path_factory.mktemp("sampler-out") / "sampler_compare.json"
    mp = pytest.MonkeyPatch()
    mp.setenv("TPSEXPLORE_CACHE", str(cache))  # main() sets it from --cache-dir; restored below
    try:
        rc = bench.main(["--study", str(SMOKE), "--seeds", "2", "--trials", str(TRIALS), "--val-limit", "32",
                         "--samplers", "tpe,random,random:enqueue=none", "--cache-dir", str(cache), "--threads", "1",
                         "--out", str(out), "--no-progress"])
    finally:
        mp.undo()
    assert rc == 0
    return json.loads(out.read_text())


def test_hypervolume_curves_match_the_trials(tiny_run):
    budget = tiny_run["settings"]["budget_gmacs"]
    summary = tiny_run["summary"]
    for label, runs in tiny_run["runs"].items():
        assert len(runs) == 2
        for run in runs:
            hv, rows = run["hypervolume"], run["trials"]
            assert len(hv) == len(rows) == TRIALS
            assert all(b >= a for a, b in zip(hv, hv[1:])), (label, hv)
            for k in (TRIALS // 2, TRIALS):
                pts = [(r["top1"], -r["gmacs"] / budget) for r in rows[:k]
                       if r["state"] == "complete" and r["feasible"]]
                want = hypervolume(np.array(pts).reshape(-1, 2), np.array([0.0, -1.0]))
                assert hv[k - 1] == pytest.approx(want, abs=1e-6), (label, k)
            for r in rows:
                assert (r["top1"] is None) == (r["state"] == "infeasible")
        for k in (TRIALS // 2, TRIALS):
            entry = summary["samplers"][label][f"at_{k}"]
            want = statistics.median(r["hypervolume"][k - 1] for r in runs)
            assert entry["median"] == pytest.approx(want, abs=1e-6)
    acc = summary["acceptance"]
    assert acc["default_at_N"] == summary["samplers"]["tpe"][f"at_{TRIALS // 2}"]["median"]
    assert acc["random_at_2N"] == summary["samplers"]["random"][f"at_{TRIALS}"]["median"]
    assert acc["met"] == (acc["default_at_N"] >= acc["random_at_2N"])


def test_warm_start_and_cache_are_shared(tiny_run):
    enqueued = tiny_run["settings"]["enqueued"]["labels"]
    assert enqueued[0] == "baseline" and len(enqueued) >= 2
    firsts = {}
    for label in ("tpe", "random"):
        for run in tiny_run["runs"][label]:
            head = run["trials"][:len(enqueued)]
            assert [r["label"] for r in head] == enqueued
            assert [r["role"] for r in head] == ["baseline"] + ["default"] * (len(enqueued) - 1)
            firsts.setdefault("top1", [r["top1"] for r in head])
            assert [r["top1"] for r in head] == firsts["top1"]  # one evaluation, reused
    for run in tiny_run["runs"]["random:enqueue=none"]:
        assert {r["role"] for r in run["trials"]} == {"sampled"}
    complete = sum(r["state"] == "complete" for runs in tiny_run["runs"].values() for run in runs
                   for r in run["trials"])
    cost = tiny_run["cost"]
    assert cost["evaluations"] + cost["cache_hits"] == complete
    assert cost["cache_hits"] >= 3 * len(enqueued)  # the enqueued trials of 4 warm runs are evaluated once
    assert tiny_run["baseline_top1_on_subset"] == firsts["top1"][0]
    assert tiny_run["settings"]["val_subset"]["n"] == 32


def test_sampler_specs(bench):
    c = bench.parse_sampler("nsga2:population_size=8;enqueue=defaults")
    assert (c.settings.name, c.settings.population_size, c.enqueue) == ("nsga2", 8, "defaults")
    assert bench.parse_sampler("tpe").is_project_default
    assert not bench.parse_sampler("tpe:enqueue=none").is_project_default
    with pytest.raises(ValueError, match=r"^sampler\.name: 'cmaes'"):
        bench.parse_sampler("cmaes")
    with pytest.raises(ValueError, match=r"^samplers: unknown key 'bogus'"):
        bench.parse_sampler("tpe:bogus=1")
    with pytest.raises(ValueError, match=r"^samplers: enqueue='some'"):
        bench.parse_sampler("random:enqueue=some")
