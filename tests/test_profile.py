"""`profile` end to end on a tiny proxy backbone: every field of the table and the JSON is filled in."""
from __future__ import annotations

import json

import pytest
import torch

from tpsexplore.measure.profile import ProfileConfig, format_profile, profile
from tpsexplore.measure.train import ProxyConfig
from tpsexplore.reduce import ReductionConfig

TINY_PROXY = ProxyConfig(img_size=16, patch_size=4, epochs=1, batch_size=32, lr=3e-3, train_limit=64, val_limit=32,
                         min_top1=None, model_kwargs=dict(depth=4, embed_dim=32, num_heads=2))


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    cfg = ProfileConfig(backbone="deit_t", reduction=ReductionConfig("etps", (1, 2), (0.7,)), finetune_steps=3,
                        finetune_batch=16, device="cpu", batch_sizes=(1, 8), dtypes=("fp32",), window_s=0.05,
                        windows=2, val_limit=32, train_limit=64, cache_dir=str(tmp_path_factory.mktemp("cache")),
                        proxy=TINY_PROXY, progress=False)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is faster, and the environment record must say so
    try:
        return profile(cfg)
    finally:
        torch.set_num_threads(before)


def test_profile_measures_every_field(profiled):
    r = profiled
    assert r["backbone"]["num_patches"] == 16 and r["label"].startswith("etps")
    assert [tuple(c) for c in r["token_counts"]] == [(17, 17), (17, 13), (13, 10), (10, 10)]  # ceil(0.7 n)
    g = r["gmacs"]
    assert g["analytic"] < g["baseline"] and g["ratio"] == pytest.approx(g["analytic"] / g["baseline"])
    assert g["traced"] == pytest.approx(g["analytic"], rel=0.01)
    assert r["params"]["model"] == r["params"]["baseline"]  # eTPS adds no parameters
    cells = [(t["batch_size"], t["dtype"], t["status"]) for t in r["throughput"]]
    assert cells == [(1, "fp32", "ok"), (8, "fp32", "ok")]
    for t in r["throughput"]:
        assert t["images_per_s"] > 0 and t["baseline_images_per_s"] > 0 and t["speedup"] > 0
        assert t["latency_ms"] > 0 and t["spread"][0] <= t["images_per_s"] <= t["spread"][1]
        assert t["joules_per_image"] is None and t["device"] == "cpu"  # no NVML energy on CPU
    acc = r["accuracy"]
    assert set(acc) == {"baseline", "zero_shot", "finetuned"}
    assert all(0 <= acc[k]["top1"] <= acc[k]["top5"] <= 1 and acc[k]["n"] == 32 for k in acc)
    for k in acc:  # every accuracy carries its count and 95% interval; reduced ones the paired test
        lo, hi = acc[k]["top1_ci95"]
        assert lo <= acc[k]["top1"] <= hi and acc[k]["correct1"] == round(acc[k]["top1"] * 32)
        assert (k == "baseline") == ("vs_baseline" not in acc[k])
        if k != "baseline":
            assert 0 <= acc[k]["vs_baseline"]["mcnemar_p"] <= 1
    assert r["finetune"]["steps"] == 3 and r["weights"]["source"] == "proxy"
    assert r["environment"]["device"] == "cpu" and r["environment"]["torch_threads"] == 1
    json.loads(json.dumps(r, default=str))  # the --json output holds the same


def test_profile_table_prints_every_field(profiled):
    text = format_profile(profiled)
    for needle in ("GMACs", "analytic", "traced", "ratio", "parameters", "img/s", "speed-up", "latency ms", "J/img",
                   "n/a (CPU)", "baseline", "zero-shot", "finetuned", "fine-tune", "3 steps", "measured on:",
                   "proxy-pretrained on cluttered (scikit-learn digits), not ImageNet", "torch", "(n=32)", "McNemar p=", "95% CI"):
        assert needle in text, needle
    assert "17 -> 13 -> 10" in text
