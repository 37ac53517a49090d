"""The reporting layer on real studies: a study directory written through the results store, an Optuna journal
and safetensors weights exactly as `tpsexplore search` lays them out (docs/HELPERS.md, contracts), with real
analytic GMACs, real tiny timm ViTs and the real digits proxy images. Measured values (accuracy, throughput)
are synthetic but shaped like a search's: only the report's handling of them is under test here."""
from __future__ import annotations

import base64
import json
import os
import struct
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import torch
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState, create_trial
from safetensors.torch import load_file, save_file

from tpsexplore.backbones import create_backbone, resolve_name
from tpsexplore.manifest import (Budget, DataSource, Fidelity, Geometry, Objective, StudyLayout, StudyManifest,
                                 Weights, parse_storage)
from tpsexplore.cli import main
from tpsexplore.measure.environment import environment_info
from tpsexplore.measure.flops import analytic_macs, geometry, geometry_from_model
from tpsexplore.reduce import ReductionConfig, apply, last_info, token_schedule
from tpsexplore.report import (best_within_budget, build_report, compare_trials, compute_keep_maps, hypervolume,
                               hypervolume_history, load_trials, open_study, param_importances, pareto_front,
                               pareto_mask, plot_budget_sweep, plot_method_fronts, plot_tradeoff, treatment_groups)
from tpsexplore.search.recommend import accuracy_cell
from tpsexplore.stats import paired_difference, wilson_interval
from tpsexplore.report.keepmaps import DROPPED, HOST, KEPT, SHARED
from tpsexplore.search.confirm import ConfirmedAccuracy
from tpsexplore.stats import Accuracy
from tpsexplore.storage import ResultsStore

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "pareto_analysis.ipynb"
from conftest import IMAGENET_SAMPLE  # noqa: E402
TINY = dict(img_size=32, patch_size=8, depth=4, embed_dim=64, num_heads=2)  # 16 patch tokens, like studies/smoke
BUDGET = 0.7
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# (number, variant, config, state); the accuracy/throughput below are synthetic, the GMACs are analytic
TRIALS = [
    (0, "baseline", ReductionConfig(), "complete"),
    (1, "etps", ReductionConfig("etps", (1, 2), (0.6,)), "complete"),
    (2, "tome", ReductionConfig("tome", r=3), "complete"),
    (3, "dtps", ReductionConfig("dtps", (1, 2), (0.7,)), "complete"),
    (4, "topk", ReductionConfig("topk", (1, 2), (0.6,)), "complete"),
    (5, "similarity+squeeze", ReductionConfig("similarity", (0,), (0.5,), treatment="squeeze"), "complete"),
    (6, "evit", ReductionConfig("evit", (1,), (0.5,)), "complete"),
    (7, "random", ReductionConfig("random", (0,), (0.4,)), "complete"),
    (8, "etps", ReductionConfig("etps", (3,), (0.9,)), "infeasible"),
    (9, "topk", ReductionConfig("topk", (1,), (0.3,)), "failed"),
    (10, "evit", ReductionConfig("evit", (2,), (0.4,)), "pruned"),
]
SQUEEZE_BONUS = {"etps": 0.04, "dtps": 0.05, "similarity+squeeze": 0.02}
N_IMAGES = 400  # the synthetic evaluation set: every trial is scored on the same 400 images
EVAL_SET = "unit-eval-400"
_RANK = np.argsort(np.random.default_rng(0).permutation(N_IMAGES))  # image i's difficulty rank


def correct_bits(correct: int) -> np.ndarray:
    """Per-image correctness with the ``correct`` easiest images right: two trials' correct sets are nested,
    so they differ on exactly |correct_a - correct_b| images (McNemar p = 2 * 0.5 ** that)."""
    return _RANK < correct


def accuracy_measurement(value: float, fidelity: str, kind: str = "accuracy_top1", eval_set: str = EVAL_SET,
                         bits: bool = True) -> dict:
    acc = Accuracy.from_bits(correct_bits(int(round(value * N_IMAGES))), eval_set)
    return {"kind": kind, "value": acc.value, "unit": "fraction", "fidelity": fidelity,
            "extra": acc.extra(with_bits=bits and kind == "accuracy_top1")}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------- study fixtures
def _accuracy(variant: str, fraction: float) -> float:
    return round(0.45 + 0.4 * fraction + SQUEEZE_BONUS.get(variant, 0.0), 4)


def _params(variant: str, cfg: ReductionConfig) -> tuple[dict, dict]:
    if variant == "baseline":
        return {}, {}
    dist = {"method": CategoricalDistribution(["etps", "tome", "dtps", "topk", "similarity+squeeze", "evit", "random"]),
            "fill": FloatDistribution(0.5, 1.0)}
    params = {"method": variant, "fill": 0.5 + 0.05 * len(cfg.label) % 0.5}
    if cfg.method == "tome":
        dist["r_inflection"] = FloatDistribution(-1.0, 1.0)
        params["r_inflection"] = 0.0
    else:
        dist["keep_0"] = FloatDistribution(0.05, 1.0)
        params["keep_0"] = cfg.keep_ratios[0]
    return params, dist


def make_study(root: Path, *, backbone: str = "deit_t", model: dict | None = None, data: dict,
               trials=TRIALS, weights: bool = True, optuna_journal: bool = True, name: str = "unit",
               accuracies: dict | None = None, eval_sets: dict | None = None, confirmed: dict | None = None,
               no_bits: tuple = (), reference: bool = True, loaded: tuple = (4,), drifted: dict | None = None) -> Path:
    """A study directory laid out as `tpsexplore search` writes it (results.db, optuna.journal, study.json,
    weights/trial_<n>.safetensors). Accuracies carry n, correct, interval and per-image bits like a search's;
    ``accuracies`` overrides the fine-tuned top-1 of some trials, ``eval_sets`` their evaluation set,
    ``confirmed`` adds a confirmation ({number: [correct per seed]}), ``no_bits`` drops the bits of some.
    Speeds: a reference baseline of 3000 img/s (2 ms at batch 1) in the settings unless ``reference`` is False;
    the trials in ``loaded`` were timed under load, those in ``drifted`` beside a baseline of that many img/s."""
    accuracies, eval_sets, confirmed = accuracies or {}, eval_sets or {}, confirmed or {}
    drifted = {6: 2500.0} if drifted is None else drifted
    model = dict(model or {})
    study_dir = root / name
    (study_dir / "weights").mkdir(parents=True, exist_ok=True)
    if model:
        net = create_backbone(backbone, weights="random", num_classes=data["num_classes"], **model)
        geo = geometry_from_model(net)
    else:
        net, geo = None, geometry(backbone, num_classes=data["num_classes"])
    base_gmacs = analytic_macs(ReductionConfig(), geo).gmacs
    env = environment_info("cpu")
    objectives = ["accuracy_top1@finetuned:maximize", "gmacs@analytic:minimize"]
    layout = StudyLayout(study_dir)
    journal = layout.journal
    ref = {"throughput": {"batch_size": 16, "dtype": "fp32", "device": "cpu", "value": 3000.0},
           "latency_ms": {"batch_size": 1, "dtype": "fp32", "device": "cpu", "value": 2.0},
           "measured": "2026-01-01T00:00:00+00:00"} if reference else None
    manifest = StudyManifest(
        study=name, backbone=backbone, timm_name=resolve_name(backbone),
        model_kwargs={**model, "num_classes": data["num_classes"]},
        geometry=Geometry(num_patches=geo.num_patches, num_prefix=geo.num_prefix, depth=geo.depth, width=geo.embed_dim,
                          img_size=geo.img_size[0], patch_size=geo.patch_size[0], num_classes=geo.num_classes,
                          num_heads=geo.num_heads),
        budget=Budget(BUDGET, BUDGET * base_gmacs, base_gmacs),
        objectives=(Objective("accuracy", "accuracy_top1@finetuned", "maximize"),
                    Objective("gflops", "gmacs@analytic", "minimize")),
        fidelity=Fidelity("finetuned", 4), storage=parse_storage(str(journal)),
        data=DataSource("proxy" if data.get("source") == "digits" else "real", f"synthetic: {data['source']}", data),
        weights=Weights("proxy-pretrained", note="synthetic test study"), proxy=None, reference=ref, seed=0,
        device="cpu", versions={k: env.get(k) for k in ("python", "torch", "timm", "optuna", "tpsexplore")},
        extra={"methods": sorted({t[1] for t in trials} - {"baseline"}), "excluded_methods": {}, "environment": env})
    manifest.write(layout)
    settings = {"reference": ref, "manifest": manifest.to_dict()}
    ostudy = None
    if optuna_journal:
        storage = JournalStorage(JournalFileBackend(str(journal)))
        ostudy = optuna.create_study(study_name=name, storage=storage, directions=["maximize", "minimize"])
    with ResultsStore(layout.results_db) as store:
        srow = store.get_or_create_study(name, backbone=backbone, budget=BUDGET, objectives=objectives,
                                         data=json.dumps(data), weights="proxy-pretrained", settings=settings)
        for number, variant, cfg, state in trials:
            gm = analytic_macs(cfg, geo).gmacs
            frac = gm / base_gmacs
            feasible = frac <= BUDGET + 1e-12
            tid = store.start_trial(srow, number, cfg.to_dict(), method=variant, label=cfg.label,
                                    feasible=feasible, analytic_gmacs=gm, constraint_value=frac - BUDGET)
            meas = [{"kind": "gmacs", "value": gm, "unit": "GMACs", "fidelity": "analytic", "provenance": "analytic"},
                    {"kind": "params", "value": float(geo.num_params), "fidelity": "analytic"}]
            acc = accuracies.get(number, _accuracy(variant, frac))
            es = eval_sets.get(number, EVAL_SET)
            if state in ("complete", "pruned"):
                base_tp = drifted.get(number, 3000.0)  # the baseline timed beside this trial
                sp = 1.0 / (0.25 + 0.75 * frac)
                lat_sp = 1.0 / (0.3 + 0.7 * frac)
                contention = {"contention": {"loaded": number in loaded, "runnable_other": 2.0 if number in loaded
                                             else 0.0, "steal_fraction": 0.0, "threads": 1,
                                             "reasons": ["2 other runnable processes"] if number in loaded else []}}
                meas += [
                    {"kind": "throughput", "value": sp * base_tp, "unit": "img/s", "batch_size": 16, "dtype": "fp32",
                     "device": "cpu", "provenance": "measure_pair",
                     "extra": {"windows": 3, "images_per_s_min": 0.95 * sp * base_tp,
                               "images_per_s_max": 1.04 * sp * base_tp, **contention}},
                    {"kind": "baseline_throughput", "value": base_tp, "unit": "img/s", "batch_size": 16,
                     "dtype": "fp32", "device": "cpu", "extra": contention},
                    {"kind": "latency_ms", "value": 2.0 / lat_sp, "unit": "ms", "batch_size": 1,
                     "dtype": "fp32", "device": "cpu", "extra": contention},
                    {"kind": "baseline_latency_ms", "value": 2.0, "unit": "ms", "batch_size": 1,
                     "dtype": "fp32", "device": "cpu"},
                    {"kind": "speedup", "value": sp, "unit": "x", "batch_size": 16, "dtype": "fp32",
                     "device": "cpu", "extra": {"baseline_images_per_s": base_tp}},
                    {"kind": "speedup", "value": lat_sp, "unit": "x", "batch_size": 1, "dtype": "fp32",
                     "device": "cpu"},
                    accuracy_measurement(acc - 0.1, "zero_shot", eval_set=es)]
            if state == "complete":
                meas += [accuracy_measurement(acc, "finetuned", eval_set=es, bits=number not in no_bits),
                         accuracy_measurement(min(1.0, acc + 0.2), "finetuned", "accuracy_top5", eval_set=es)]
            if number in confirmed:
                counts = confirmed[number]
                c = ConfirmedAccuracy(tuple(range(len(counts))), tuple(counts), N_IMAGES, es,
                                      tuple(correct_bits(k) for k in counts))
                meas.append({"kind": "accuracy_top1", "value": c.mean, "unit": "fraction", "fidelity": "confirmed",
                             "extra": c.extra()})
            store.add_measurements(tid, meas, environment=env)
            reason = {"infeasible": f"infeasible: {frac:.3f} x baseline GFLOPs > budget {BUDGET}",
                      "failed": "error: RuntimeError: synthetic failure", "pruned": "gate: synthetic"}.get(state)
            store.finish_trial(tid, state, reason, durations={"measure": 0.1})
            if weights and state == "complete" and net is not None:
                torch.manual_seed(number)
                m = create_backbone(backbone, weights="random", num_classes=data["num_classes"], **model)
                apply(m, cfg)
                save_file({k: v.contiguous() for k, v in m.state_dict().items()},
                          str(study_dir / "weights" / f"trial_{number}.safetensors"),
                          metadata={"trial": str(number), "config": cfg.to_json()})
            if ostudy is not None:
                params, dist = _params(variant, cfg)
                ostate = {"complete": TrialState.COMPLETE, "failed": TrialState.FAIL}.get(state, TrialState.PRUNED)
                ostudy.add_trial(create_trial(
                    params=params, distributions=dist, state=ostate,
                    values=[acc, gm] if ostate == TrialState.COMPLETE else None,
                    user_attrs={"tpsx_variant": variant}))
    return study_dir


PROXY_DATA = {"source": "digits", "path": None, "seed": 0, "num_classes": 10, "img_size": 32, "patch_size": 8,
              "data_spec": {"path": None, "seed": 0, "val_fraction": 0.2, "train_limit": 64, "val_limit": 32},
              "note": "proxy task: scikit-learn digits, not ImageNet"}


@pytest.fixture(scope="module")
def proxy_study(tmp_path_factory) -> Path:
    return make_study(tmp_path_factory.mktemp("proxy"), model=TINY, data=PROXY_DATA)


@pytest.fixture(scope="module")
def proxy_report(proxy_study: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "report"
    assert main(["report", str(proxy_study), "-o", str(out), "--quiet", "--images", "2", "--configs", "2"]) == 0
    return out


# ----------------------------------------------------------------------------- the report
EXPECTED_FIGURES = ("accuracy_vs_gmacs", "accuracy_vs_throughput_bs16_fp32_cpu", "accuracy_vs_latency_bs1_fp32_cpu",
                    "method_fronts", "hypervolume", "parameter_importance", "keep_maps")


def _png_size(path: Path) -> tuple[int, int]:
    raw = path.read_bytes()
    assert raw[:8] == PNG_MAGIC, f"{path.name} is not a PNG"
    assert raw[12:16] == b"IHDR"
    return struct.unpack(">II", raw[16:24])


def test_report_has_every_figure_the_data_allows(proxy_report: Path, proxy_study: Path):
    for name in ("report.html", "report.md", "trials.csv", "pareto.csv"):
        assert (proxy_report / name).is_file(), name
    html = (proxy_report / "report.html").read_text()
    md = (proxy_report / "report.md").read_text()
    for name in EXPECTED_FIGURES:
        png, svg = proxy_report / "figures" / f"{name}.png", proxy_report / "figures" / f"{name}.svg"
        w, h = _png_size(png)
        assert w > 300 and h > 200
        assert svg.read_text().lstrip().startswith(("<?xml", "<svg"))
        # self-contained: the exact PNG bytes are embedded, and Markdown links the files
        assert base64.b64encode(png.read_bytes()).decode() in html, name
        assert f"figures/{name}.png" in md
    assert html.count("data:image/png;base64,") == len(EXPECTED_FIGURES)
    assert 'src="http' not in html and "<script" not in html and "<link" not in html
    # published points never on the proxy task, and the report says why
    assert not (proxy_report / "figures" / "published_points.png").exists()
    assert "published points" in html and "proxy task" in html
    # provenance header
    for text in ("deit_tiny_patch16_224", "img_size=32", "proxy", "digits", "0.7 x baseline GMACs", "torch",
                 "accuracy_top1@finetuned", "cpu"):
        assert text in html, text
    trials = pd.read_csv(proxy_report / "trials.csv")
    assert len(trials) == len(TRIALS) and set(trials["number"]) == {t[0] for t in TRIALS}


def test_pareto_table_holds_the_front_with_every_measurement(proxy_report: Path, proxy_study: Path):
    df = load_trials(proxy_study)
    front = pareto_front(df[df["within_budget"]], {"accuracy_top1@finetuned": "max", "gmacs@analytic": "min"})
    table = pd.read_csv(proxy_report / "pareto.csv")
    assert sorted(table["trial"]) == sorted(front["number"])
    for col in ("accuracy_top1@finetuned", "accuracy_top1@zero_shot", "gmacs@analytic", "params@analytic",
                "throughput@bs16/fp32/cpu", "latency_ms@bs1/fp32/cpu", "speedup@bs16/fp32/cpu", "environment"):
        assert col in table.columns, col
    assert set(table["environment"]) == {"E1"}
    html = (proxy_report / "report.html").read_text()
    assert "AMD" in html or "cpu_model" in html  # the hardware of the measurements is listed
    assert "Environments" in html


def test_load_trials_and_pareto_api(proxy_study: Path):
    df = load_trials(proxy_study)
    assert len(df) == len(TRIALS) and df["number"].is_unique
    assert df.attrs["accuracy_column"] == "accuracy_top1@finetuned"
    assert df.attrs["gmacs_column"] == "gmacs@analytic"
    for col in ("variant", "accuracy", "gmacs", "is_baseline", "usable", "within_budget", "config.keep_ratios",
                "throughput@bs16/fp32/cpu", "latency_ms@bs1/fp32/cpu"):
        assert col in df.columns, col
    # the results database itself (path or URL) reads the same table
    for db in (proxy_study / "results.db", f"sqlite:///{proxy_study / 'results.db'}"):
        other = load_trials(db)
        assert list(other["number"]) == list(df["number"])
        assert other["accuracy"].equals(df["accuracy"])
    by = df.set_index("number")
    assert by.loc[0, "is_baseline"] and not by.loc[0, "within_budget"]
    assert by.loc[5, "variant"] == "similarity+squeeze"
    assert not by.loc[8, "within_budget"] and by.loc[8, "state"] == "infeasible"
    assert not by.loc[9, "usable"] and not by.loc[10, "usable"]
    # the front: no point of it is dominated by any within-budget trial
    pool = df[df["within_budget"]]
    front = pareto_front(pool, ["accuracy:maximize", "gmacs:minimize"])
    for _, p in front.iterrows():
        better = pool[(pool["accuracy"] >= p["accuracy"]) & (pool["gmacs"] <= p["gmacs"]) &
                      ((pool["accuracy"] > p["accuracy"]) | (pool["gmacs"] < p["gmacs"]))]
        assert better.empty
    assert list(front["gmacs"]) == sorted(front["gmacs"])
    for fig in (plot_tradeoff(df, "gmacs", "accuracy", budget=0.001), plot_method_fronts(df)):
        assert fig.axes and type(fig).__name__ == "Figure"


def test_pareto_mask_and_hypervolume_by_hand():
    df = pd.DataFrame({"a": [1.0, 2.0, 2.0, 0.5, np.nan, 2.0], "c": [1.0, 2.0, 3.0, 0.5, 0.1, 2.0]})
    mask = pareto_mask(df, {"a": "max", "c": "min"})
    # (2,2) twice is on the front (equal points do not dominate each other); (2,3) is dominated; NaN is out
    assert list(mask) == [True, True, False, True, False, True]
    with pytest.raises(ValueError, match="objectives: direction"):
        pareto_mask(df, {"a": "up"})
    with pytest.raises(ValueError, match="objectives: column 'zz'"):
        pareto_mask(df, {"zz": "max"})
    assert hypervolume(np.array([[1.0, 1.0]]), np.array([0.0, 0.0])) == pytest.approx(1.0)
    assert hypervolume(np.array([[2.0, 1.0], [1.0, 2.0]]), np.array([0.0, 0.0])) == pytest.approx(3.0)
    assert hypervolume(np.array([[1.0, 1.0, 1.0], [2.0, 0.5, 1.0]]), np.zeros(3)) == pytest.approx(1.5)
    hist = hypervolume_history(pd.DataFrame({"number": [0, 1, 2], "x": [1.0, 0.5, 2.0], "y": [0.5, 0.8, 0.6]}),
                               {"x": "min", "y": "max"})
    assert list(hist["hypervolume"]) == sorted(hist["hypervolume"])  # never decreases
    assert hist["hypervolume"].iloc[-1] > hist["hypervolume"].iloc[0]


def test_budget_sweep_tps_vs_pruning(proxy_study: Path):
    df = load_trials(proxy_study)
    groups = treatment_groups(sorted(df.loc[df["usable"] & ~df["is_baseline"], "variant"].unique()))
    assert set(groups["TPS / squeeze"]) == {"etps", "dtps", "similarity+squeeze"}
    assert "topk" in groups["pruning (drop or fuse)"] and "tome" not in sum(groups.values(), [])
    table = best_within_budget(df, [0.7, 0.5], groups)
    base = float(df.loc[df["is_baseline"], "gmacs"].iloc[0])
    for _, r in table.dropna().iterrows():
        grp = df[df["variant"].isin(groups[r["group"]]) & df["usable"] & (df["gmacs"] <= r["budget"] * base + 1e-12)]
        assert r["best"] == pytest.approx(grp["accuracy"].max())
    assert plot_budget_sweep(df, [0.7, 0.5], groups).axes


def test_published_points_only_for_imagenet_deit(tmp_path):
    """A DeiT-S study on ImageNet data (224, patch 16) gets the papers' points; no keep maps here (speed)."""
    trials = [t for t in TRIALS if t[0] in (0, 1, 2, 4)]
    data = {"source": "labels", "path": str(IMAGENET_SAMPLE), "num_classes": 1000, "img_size": 224,
            "data_spec": {"path": str(IMAGENET_SAMPLE), "seed": 0}}
    study = make_study(tmp_path, backbone="deit_s", data=data, trials=trials, weights=False,
                       optuna_journal=False, name="imagenet")
    rep = build_report(study, tmp_path / "out", keep_maps=False, progress=False)
    names = [f.name for f in rep.figures]
    assert "published_points" in names
    assert (tmp_path / "out" / "figures" / "published_points.svg").is_file()
    skipped = dict(rep.skipped)
    assert "Optuna storage" in skipped["parameter importance"]  # no journal: a note, not a crash
    assert "token-keep maps" in skipped


def test_nothing_within_budget_still_reports_and_says_why(tmp_path):
    trials = [t for t in TRIALS if t[0] in (0, 8, 9)]  # baseline, one infeasible, one failed
    study = make_study(tmp_path, model=TINY, data=PROXY_DATA, trials=trials, name="none_within")
    rep = build_report(study, tmp_path / "out", progress=False)
    assert [f.name for f in rep.figures] == []
    skipped = dict(rep.skipped)
    for name in ("accuracy vs GMACs", "Pareto front per method", "hypervolume", "token-keep maps"):
        assert name in skipped, name
    assert "1 complete trial" in skipped["parameter importance"] or "0 complete" in skipped["parameter importance"]
    assert rep.pareto.empty and (tmp_path / "out" / "report.html").is_file()
    assert "Skipped figures" in (tmp_path / "out" / "report.html").read_text()


def test_too_few_trials_for_importance_is_a_note():
    study = optuna.create_study(directions=["maximize", "minimize"])
    for v in (0.1, 0.2):
        study.add_trial(create_trial(params={"x": v}, distributions={"x": FloatDistribution(0, 1)},
                                     values=[v, 1 - v]))
    imp = param_importances(study, ["acc", "cost"])
    assert imp.values == {} and "2 complete trial" in imp.note


def test_keep_maps_match_the_schedule():
    torch.manual_seed(0)
    model = create_backbone("deit_t", weights="random", num_classes=10, **TINY)
    x = torch.randn(2, 3, 32, 32)
    for cfg in (ReductionConfig("etps", (1, 2), (0.6,)), ReductionConfig("topk", (1, 2), (0.6,)),
                ReductionConfig("tome", r=3)):
        maps = compute_keep_maps(model, cfg, x)
        sched = token_schedule(cfg, 16, 1, 4)
        assert len(maps.stages) == 2 and len(maps.stages[0]) == len(sched.stages)
        for stage_map, st in zip(maps.stages[1], sched.stages):
            s = stage_map.status
            assert stage_map.block == st.block and s.shape == (4, 4)
            tokens = st.after  # tokens alive after the stage: one map entry of KEPT or HOST per token
            if cfg.method == "topk":
                assert (s == KEPT).sum() == tokens and (s == DROPPED).sum() == 16 - tokens
            elif cfg.method == "etps":
                assert ((s == KEPT) | (s == HOST)).sum() == tokens and (s == DROPPED).sum() == 0
                assert (s == SHARED).sum() == 16 - tokens
            else:  # ToMe merges: nothing is dropped
                assert (s == DROPPED).sum() == 0 and (s == SHARED).sum() > 0


@pytest.mark.slow
def test_report_of_the_smoke_search(tmp_path, capsys):
    """End to end through the real search (studies/smoke.toml; about 1.5 min on 2 busy cores, hence slow)."""
    assert main(["search", "--study", "smoke", "--out", str(tmp_path), "--quiet"]) == 0
    study = tmp_path / "smoke"
    printed = capsys.readouterr().out
    rec = open_study(study).recommendation
    # the search ends with the same headline as the report, naming the same trial and its export command
    tail = printed[printed.index("Recommended config"):]
    assert f"trial {rec.chosen.number}:" in tail and "accuracy vs baseline" in tail and "speed-up" in tail
    assert tail.rstrip().endswith(f"tpsexplore export {study} --trial {rec.chosen.number} -o config.json")
    assert main(["report", str(study), "--quiet"]) == 0
    html = (study / "report" / "report.html").read_text()
    assert f"tpsexplore export {study} --trial {rec.chosen.number} -o config.json" in html
    figures = {p.stem for p in (study / "report" / "figures").glob("*.png")}
    assert {"accuracy_vs_gmacs", "method_fronts", "hypervolume", "keep_maps"} <= figures
    out = tmp_path / "c.json"
    assert main(["export", str(study), "--pick", "max-accuracy", "-o", str(out)]) == 0
    cfg = json.loads(out.read_text())
    b = cfg["backbone"]
    model = create_backbone(b["timm_name"], weights="random", **{k: b[k] for k in (
        "img_size", "patch_size", "num_classes", "depth", "embed_dim", "num_heads") if b.get(k) is not None})
    apply(model, str(out))
    model.eval()
    with torch.no_grad():
        model(torch.randn(1, 3, b["img_size"], b["img_size"]))
    assert [list(c) for c in last_info(model).token_counts] == cfg["tokens"]


# ----------------------------------------------------------------------------- export
@pytest.mark.parametrize("number", [1, 2, 3])
def test_export_then_apply_reproduces_the_trial(proxy_study: Path, tmp_path, number: int):
    cfg_path, w_path = tmp_path / "config.json", tmp_path / "w.safetensors"
    assert main(["export", str(proxy_study), "--trial", str(number), "-o", str(cfg_path),
                 "--weights", str(w_path)]) == 0
    cfg = json.loads(cfg_path.read_text())
    assert cfg["trial"] == number and set(cfg) >= {"reduction", "backbone", "measurements", "hardware", "versions",
                                                   "study", "tokens"}
    assert cfg["hardware"]["device"] == "cpu" and cfg["versions"]["torch"] == torch.__version__
    df = load_trials(proxy_study).set_index("number")
    assert cfg["measurements"]["gmacs@analytic"]["value"] == pytest.approx(df.loc[number, "gmacs@analytic"])
    b = cfg["backbone"]
    model = create_backbone(b["timm_name"], weights="random", img_size=b["img_size"], patch_size=b["patch_size"],
                            num_classes=b["num_classes"], depth=b["depth"], embed_dim=b["embed_dim"],
                            num_heads=b["num_heads"])
    apply(model, str(cfg_path))
    model.load_state_dict(load_file(str(w_path)))
    model.eval()
    with torch.no_grad():
        model(torch.randn(2, 3, b["img_size"], b["img_size"]))
    counts = [list(c) for c in last_info(model).token_counts]
    assert counts == cfg["tokens"]
    assert analytic_macs(model.tps_config, geometry_from_model(model)).gmacs == \
        pytest.approx(df.loc[number, "gmacs@analytic"], rel=1e-12)
    saved = load_file(str(proxy_study / "weights" / f"trial_{number}.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


def test_export_pick_rules(proxy_study: Path, tmp_path):
    df = load_trials(proxy_study)
    ok = df[df["usable"] & ~df["is_baseline"]]
    limit = float(ok["gmacs"].median())
    expect = ok[ok["gmacs"] <= limit].sort_values("accuracy", ascending=False).iloc[0]
    out = tmp_path / "c.json"
    assert main(["export", str(proxy_study), "--pick", "max-accuracy", "--max-gflops", str(limit), "-o", str(out)]) == 0
    assert json.loads(out.read_text())["trial"] == int(expect["number"])
    assert main(["export", str(proxy_study), "-o", str(out)]) == 0  # default: max-accuracy within the budget
    best = df[df["within_budget"]].sort_values("accuracy", ascending=False).iloc[0]
    assert json.loads(out.read_text())["trial"] == int(best["number"])
    tp = float(ok["throughput@bs16/fp32/cpu"].max())
    assert main(["export", str(proxy_study), "--pick", "max-accuracy", "--min-throughput", str(tp * 0.99),
                 "-o", str(out)]) == 0
    assert json.loads(out.read_text())["trial"] == int(ok.loc[ok["throughput@bs16/fp32/cpu"].idxmax(), "number"])


def test_exported_config_warns_on_another_backbone(proxy_study: Path, tmp_path):
    out = tmp_path / "c.json"
    assert main(["export", str(proxy_study), "--trial", "1", "-o", str(out)]) == 0
    same_geometry = create_backbone("vit_tiny_patch16_224", weights="random", **TINY, num_classes=10)
    with pytest.warns(UserWarning, match="backbone"):  # another name, the searched geometry: a warning
        apply(same_geometry, str(out))
    other = create_backbone("deit_s", weights="random", img_size=32, patch_size=8, num_classes=10, depth=4)
    with pytest.raises(ValueError, match="^geometry: .* width 64.* width 384"):  # another width: refused
        apply(other, str(out))
    with pytest.warns(UserWarning, match="^geometry: adapted"):  # unless asked to adapt (tests/test_deploy_config.py)
        apply(other, str(out), adapt=True)


# ----------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def empty_study(tmp_path_factory) -> Path:
    return make_study(tmp_path_factory.mktemp("empty"), model=TINY, data=PROXY_DATA, trials=[], name="empty")


@pytest.mark.parametrize("argv, message", [
    (["report", "{missing}"], "does not exist"),
    (["report", "{empty}"], "has no trials"),
    (["export", "{missing}", "--trial", "1"], "does not exist"),
    (["export", "{empty}", "--trial", "1"], "has no trials"),
    (["export", "{study}", "--trial", "99"], "trial: 99 does not exist"),
    (["export", "{study}", "--trial", "9"], "trial: 9 is failed"),
    (["export", "{study}", "--pick", "max-accuracy", "--max-gflops", "1e-9"], "pick: no complete trial"),
    (["export", "{study}", "--pick", "max-accuracy", "--max-latency", "1e-6"], "pick: no complete trial"),
    (["export", "{study}", "--trial", "1", "--max-gflops", "1"], "cannot be combined"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, proxy_study, empty_study, tmp_path, capsys):
    fill = {"missing": str(tmp_path / "nope"), "empty": str(empty_study), "study": str(proxy_study)}
    argv = [a.format(**fill) for a in argv] + (["-o", str(tmp_path / "x.json")] if argv[0] == "export" else [])
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "x.json").exists()


def test_weights_of_a_trial_without_weights_is_an_error(proxy_study, tmp_path, capsys):
    (proxy_study / "weights" / "trial_4.safetensors").rename(tmp_path / "kept.safetensors")
    try:
        assert main(["export", str(proxy_study), "--trial", "4", "-o", str(tmp_path / "c.json"),
                     "--weights", str(tmp_path / "w.safetensors")]) == 2
        assert "weights: trial 4" in capsys.readouterr().err
    finally:
        (tmp_path / "kept.safetensors").rename(proxy_study / "weights" / "trial_4.safetensors")


# ----------------------------------------------------------------------------- notebook
def test_notebook_is_committed_without_outputs():
    nb = json.loads(NOTEBOOK.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(c["outputs"] == [] and c["execution_count"] is None for c in code)
    assert any("parameters" in c.get("metadata", {}).get("tags", []) for c in code)


def test_notebook_runs_on_a_study(proxy_study: Path, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    exported = tmp_path / "nb_config.json"
    monkeypatch.setenv("TPSX_STUDY", str(proxy_study))
    monkeypatch.setenv("TPSX_EXPORT", str(exported))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    nb = nbformat.read(str(NOTEBOOK), as_version=4)
    NotebookClient(nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert not [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 4  # the fronts, the per-method fronts and the budget sweep are drawn
    cfg = json.loads(exported.read_text())
    assert cfg["trial"] == open_study(proxy_study).recommendation.chosen.number  # the notebook exports the headline
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "TPS minus pruning" in text and "tokens per block" in text
    # gaps come with a paired test and an interval, not as bare differences
    assert text.count("McNemar p") >= 3 and "pts [" in text
    assert "export" in text and "recommended" in text


# ----------------------------------------------------------------------------- uncertainty, paired tests, headline
# three reduced configs within the 0.7 budget: GMACs #1 0.687 > #2 0.638 > #3 0.489 x baseline
CRAFTED = [(0, "baseline", ReductionConfig(), "complete"),
           (1, "etps", ReductionConfig("etps", (1, 2), (0.6,)), "complete"),
           (2, "tome", ReductionConfig("tome", r=3), "complete"),
           (3, "random", ReductionConfig("random", (0,), (0.4,)), "complete")]


def crafted(tmp_path, name: str, accuracies: dict, **kw) -> Path:
    return make_study(tmp_path, model=TINY, data=PROXY_DATA, trials=CRAFTED, weights=False, optuna_journal=False,
                      name=name, accuracies=accuracies, loaded=(), drifted={}, **kw)


def test_headline_prefers_the_cheaper_of_indistinguishable_configs(tmp_path):
    # 376 / 372 / 370 / 360 of 400 right: #2 is 2 images below #1 (McNemar p = 0.5), #3 is 12 below (p < 0.001)
    study = crafted(tmp_path, "tie", {0: 0.94, 1: 0.93, 2: 0.925, 3: 0.90})
    rep = build_report(study, tmp_path / "out", keep_maps=False, progress=False)
    rec = rep.recommendation
    assert (rec.best.number, rec.chosen.number) == (1, 2) and rec.indistinguishable == [2, 1]
    assert rec.test_of(2).p_value == pytest.approx(0.5) and rec.test_of(3).p_value < 0.001
    # the drop against the baseline is the paired difference of the stored per-image bits
    expect = paired_difference(correct_bits(370), correct_bits(376))
    assert rec.drop.interval == pytest.approx(expect.interval) and rec.drop.test.p_value == pytest.approx(2 * 0.5 ** 6)
    head = dict(rep.headline)
    assert head["recommended"].startswith("trial 2: tome r3")
    assert "not distinguishable from the most accurate, trial 1" in head["chosen because"]
    assert "McNemar p=0.031" in head["accuracy vs baseline"] and head["baseline"].startswith("trial 0")
    assert head["speed-up"].startswith("1.37x at batch 16 (range 1.30-1.43")
    export = f"tpsexplore export {study} --trial 2 -o config.json"
    html, md = (tmp_path / "out" / "report.html").read_text(), (tmp_path / "out" / "report.md").read_text()
    assert export in html and export in md
    assert html.index('id="headline"') < html.index('id="provenance"') and md.index("Recommended config") < \
        md.index("## Provenance")
    # the command it prints works, and --pick recommended agrees
    for argv in (["--trial", "2"], ["--pick", "recommended"]):
        assert main(["export", str(study), *argv, "-o", str(tmp_path / "c.json")]) == 0
        assert json.loads((tmp_path / "c.json").read_text())["trial"] == 2
    df = open_study(study).trials.set_index("number")
    assert list(df.loc[[1, 2, 3], "tied_with_best"]) == [True, True, False]
    assert list(df.loc[[0, 1, 2, 3], "recommended"]) == [False, False, True, False]
    # the tables say it too, with the interval and n
    shown = rep.pareto_display.set_index("trial")
    assert shown.loc[2, "vs most accurate (exact McNemar, fine-tuned)"] == "not distinguishable (p=0.5)"
    assert shown.loc[3, "vs most accurate (exact McNemar, fine-tuned)"].startswith("less accurate (p=")
    assert shown.loc[2, "recommended"] == "yes" and shown.loc[1, "top-1 % (fine-tuned) [95% CI]"] == "93 [90, 95]"
    # and the trade-off plot: error bars, trial numbers on the front, rings for the ties, the recommended square
    fig = next(f.figure for f in rep.figures if f.name == "accuracy_vs_gmacs")
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "\u2248 most accurate (McNemar p \u2265 0.05)" in labels and "recommended (#2)" in labels
    assert "95% interval (Wilson)" in labels
    assert {"#1", "#2", "#3", "#0"} <= {t.get_text() for t in ax.texts}
    bars = [c for c in ax.containers if type(c).__name__ == "ErrorbarContainer"]
    assert sum(len(c.lines[2][0].get_segments()) for c in bars) == 4  # one interval per trial with counts
    rings = [c for c in ax.collections if c.get_label().startswith("\u2248 most accurate")]
    assert len(rings) == 1 and len(rings[0].get_offsets()) == 2


def test_headline_keeps_the_more_accurate_when_the_gap_is_real(tmp_path):
    study = crafted(tmp_path, "gap", {0: 0.94, 1: 0.93, 2: 0.90, 3: 0.85}, reference=False)
    rep = build_report(study, tmp_path / "out", keep_maps=False, progress=False)
    assert rep.recommendation.chosen.number == 1 and rep.recommendation.indistinguishable == [1]
    assert dict(rep.headline)["recommended"].startswith("trial 1: etps")
    assert "significantly worse" in dict(rep.headline)["chosen because"]
    assert f"--trial 1 -o config.json" in (tmp_path / "out" / "report.html").read_text()
    # without a reference baseline the speed axis is the paired speed-up itself, never raw img/s
    names = {f.name for f in rep.figures}
    assert "accuracy_vs_speedup_bs16_fp32_cpu" in names and "accuracy_vs_throughput_bs16_fp32_cpu" not in names


def test_headline_rests_on_confirmed_accuracies(tmp_path):
    # #3 has the best single fine-tune (95%) but was not confirmed; of the confirmed, #1 (mean 372/400) and #2
    # (370.3) differ on 5 seed-images in all (p = 0.0625): the cheaper #2 is recommended
    study = crafted(tmp_path, "confirmed", {0: 0.94, 1: 0.93, 2: 0.925, 3: 0.95},
                    confirmed={0: [376, 375, 377], 1: [372, 371, 373], 2: [370, 370, 371]})
    data = open_study(study)
    rec = data.recommendation
    assert rec.basis == "confirmed" and (rec.best.number, rec.chosen.number) == (1, 2)
    assert rec.test_of(2).p_value == pytest.approx(2 * 0.5 ** 5)
    assert rec.drop_basis == "confirmed" and rec.drop.test.discordant == 6 + 5 + 6
    head = dict(rec.headline(study))
    assert "mean over fine-tune seeds" in head["top-1"] and "3 seeds" in head["top-1"]
    by = data.trials.set_index("number")
    assert by.loc[1, "confirmed_seeds"] == 3 and by.loc[1, "accuracy_top1@confirmed"] == pytest.approx(372 / 400)
    assert by.loc[3, "is_best"]  # the plotted fidelity's best is still marked as such
    # confirmed paired comparisons through the API, seed by seed
    assert data.compare(1, 2, "confirmed").test.only_a == 5


def test_paired_comparison_api_and_its_refusals(tmp_path):
    study = crafted(tmp_path, "api", {0: 0.94, 1: 0.93, 2: 0.925, 3: 0.90}, eval_sets={3: "other-400"},
                    no_bits=(2,))
    data = open_study(study)
    d = compare_trials(study, 1, 0)
    assert d.difference == pytest.approx((372 - 376) / 400)
    assert d.interval == pytest.approx(paired_difference(correct_bits(372), correct_bits(376)).interval)
    assert (d.test.only_a, d.test.only_b) == (0, 4) and d.test.p_value == pytest.approx(2 * 0.5 ** 4)
    assert compare_trials(data, 0, 1).difference == pytest.approx(-d.difference)
    assert data.compare(1, 0, "zero_shot").difference == pytest.approx((332 - 336) / 400)
    for (a, b, fid), message in [((1, 3, None), r"^eval_set: unit-eval-400 and other-400 differ"),
                                 ((1, 2, None), r"^accuracy: trial 2 has no per-image correctness"),
                                 ((1, 7, None), r"^trial: 7 does not exist"),
                                 ((1, 0, "confirmed"), r"^accuracy: trial 1 has no confirmed per-image"),
                                 ((1, 0, "traced"), r"^fidelity: trial 1 has no accuracy_top1 measurement")]:
        with pytest.raises(ValueError, match=message) as err:
            data.compare(a, b, fid)
        assert "\n" not in str(err.value)
    # a trial without bits cannot be shown equal to the best: the recommendation says so and keeps the best
    rec = data.recommendation
    assert rec.chosen.number == 1 and any("trial 2" in n for n in rec.notes)


def test_report_tables_show_intervals_n_and_flags(proxy_report: Path, proxy_study: Path):
    data = open_study(proxy_study)
    df = data.trials
    for _, r in df[df["state"] == "complete"].iterrows():
        lo, hi = wilson_interval(int(round(r["accuracy"] * N_IMAGES)), N_IMAGES)
        assert r["accuracy_n"] == N_IMAGES and (r["accuracy_lo"], r["accuracy_hi"]) == pytest.approx((lo, hi))
    html = (proxy_report / "report.html").read_text()
    md = (proxy_report / "report.md").read_text()
    table = pd.read_csv(proxy_report / "pareto.csv")
    for col in ("accuracy_n", "accuracy_lo", "accuracy_hi", "best_p", "tied_with_best", "speedup_lo"):
        assert col in table.columns, col
    recs = {r.number: r for r in data.records}
    for n in table["trial"]:
        cell = accuracy_cell(recs[int(n)].accuracy)
        assert f">{cell}</td>" in html and f"| {cell} |" in md
    for text in ("top-1 % (fine-tuned) [95% CI]", "<th>n</th>", "vs most accurate (exact McNemar, fine-tuned)", "GMACs",
                 "speed-up x [range]", "img/s at the reference baseline", "top-1 % (zero-shot) [95% CI]"):
        assert text in html, text
    # the speed flags of the trials timed under load (4) or beside a drifted baseline (6)
    flags = html[html.index('id="speed-flags"'):]
    assert "measured under load" in flags and "2 other runnable processes" in flags
    assert "17% below the reference" in flags
    assert list(df.loc[df["speed_flagged"], "number"]) == [4, 6]


@pytest.mark.parametrize("n, pattern", [(400, r"^\d+ \[\d+, \d+\]$"), (4000, r"^\d+\.\d \[\d+\.\d, \d+\.\d\]$"),
                                        (400000, r"^\d+\.\d\d \[\d+\.\d\d, \d+\.\d\d\]$")])
def test_digits_follow_the_interval(n, pattern):
    import re

    from tpsexplore.search.progress import FrontRow, front_table

    acc = Accuracy(int(0.913 * n), n)
    assert re.match(pattern, accuracy_cell(acc)), accuracy_cell(acc)
    table = front_table([FrontRow(3, "tome", "tome r3", acc.value, acc.value - 0.1, 0.5, 0.5, None)], "gflops",
                        1.0, {3: {"accuracy": acc, "vs_best": "most accurate"}})
    row = table.splitlines()[2]
    assert accuracy_cell(acc) in row
    decimals = {400: 0, 4000: 1, 400000: 2}[n]
    zero_shot = f"{100 * (acc.value - 0.1):.{decimals}f}"
    assert f"  {zero_shot}  " in row


def test_report_digits_on_the_proxy_study(proxy_report: Path):
    """n = 400: the interval is +-3 points wide, so the tables print whole percents."""
    import re

    md = (proxy_report / "report.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| top-1 % (fine-tuned) [95% CI] |")]
    assert rows
    cells = [c.strip() for c in rows[0].strip("|").split("|")[1:]]
    assert cells and all(re.match(r"^\d+ \[\d+, \d+\]$", c) for c in cells), cells
