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

from tpsexplore.backbones import create_backbone
from tpsexplore.cli import main
from tpsexplore.measure.environment import environment_info
from tpsexplore.measure.flops import analytic_macs, geometry, geometry_from_model
from tpsexplore.reduce import ReductionConfig, apply, last_info, token_schedule
from tpsexplore.report import (best_within_budget, build_report, compute_keep_maps, hypervolume,
                               hypervolume_history, load_trials, param_importances, pareto_front, pareto_mask,
                               plot_budget_sweep, plot_method_fronts, plot_tradeoff, treatment_groups)
from tpsexplore.report.keepmaps import DROPPED, HOST, KEPT, SHARED
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
               trials=TRIALS, weights: bool = True, optuna_journal: bool = True, name: str = "unit") -> Path:
    """A study directory laid out as `tpsexplore search` writes it (results.db, optuna.journal, study.json,
    weights/trial_<n>.safetensors)."""
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
    journal = study_dir / "optuna.journal"
    settings = {
        "study": name, "backbone": backbone, "budget": BUDGET, "objectives": objectives,
        "objective_names": "accuracy,gflops", "methods": sorted({t[1] for t in trials} - {"baseline"}),
        "excluded_methods": {}, "data": data,
        "weights": {"kind": "proxy-pretrained", "note": "synthetic test study"},
        "fidelity": {"finetune_steps": 4, "accuracy_objective": "accuracy_top1@finetuned",
                     "zero_shot": "evaluated for every built trial"},
        "device": "cpu", "seed": 0, "optuna_storage": str(journal), "optuna_storage_kind": "journal",
        "results_db": str(study_dir / "results.db"), "weights_dir": str(study_dir / "weights"),
        "space": {"baseline_gmacs": base_gmacs, "budget_gmacs": BUDGET * base_gmacs},
        "settings": {"backbone": backbone, "model": model, "budget": BUDGET},
        "versions": {k: env.get(k) for k in ("python", "torch", "timm", "optuna", "tpsexplore")},
        "environment": env,
    }
    (study_dir / "study.json").write_text(json.dumps(settings, indent=2))
    ostudy = None
    if optuna_journal:
        storage = JournalStorage(JournalFileBackend(str(journal)))
        ostudy = optuna.create_study(study_name=name, storage=storage, directions=["maximize", "minimize"])
    with ResultsStore(study_dir / "results.db") as store:
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
            acc = _accuracy(variant, frac)
            if state in ("complete", "pruned"):
                tp = 3000.0 / (0.25 + 0.75 * frac)
                meas += [
                    {"kind": "throughput", "value": tp, "unit": "img/s", "batch_size": 16, "dtype": "fp32",
                     "device": "cpu", "provenance": "measure_pair"},
                    {"kind": "baseline_throughput", "value": 3000.0, "unit": "img/s", "batch_size": 16,
                     "dtype": "fp32", "device": "cpu"},
                    {"kind": "latency_ms", "value": 2.0 * (0.3 + 0.7 * frac), "unit": "ms", "batch_size": 1,
                     "dtype": "fp32", "device": "cpu"},
                    {"kind": "speedup", "value": tp / 3000.0, "unit": "x", "batch_size": 16, "dtype": "fp32",
                     "device": "cpu"},
                    {"kind": "accuracy_top1", "value": acc - 0.1, "unit": "fraction", "fidelity": "zero_shot"}]
            if state == "complete":
                meas += [{"kind": "accuracy_top1", "value": acc, "unit": "fraction", "fidelity": "finetuned"},
                         {"kind": "accuracy_top5", "value": min(1.0, acc + 0.2), "unit": "fraction",
                          "fidelity": "finetuned"}]
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
def test_report_of_the_smoke_search(tmp_path):
    """End to end through the real search (studies/smoke.toml; about 1.5 min on 2 busy cores, hence slow)."""
    assert main(["search", "--study", "smoke", "--out", str(tmp_path), "--quiet"]) == 0
    study = tmp_path / "smoke"
    assert main(["report", str(study), "--quiet"]) == 0
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
    other = create_backbone("deit_s", weights="random", img_size=32, patch_size=8, num_classes=10, depth=4)
    with pytest.warns(UserWarning, match="backbone"):
        apply(other, str(out))


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
    df = load_trials(proxy_study)
    best = df[df["within_budget"]].sort_values("accuracy", ascending=False).iloc[0]
    assert cfg["trial"] == int(best["number"])
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "TPS minus pruning" in text and "tokens per block" in text
