"""Deployment end to end (issue 10, acceptance 2): a real smoke search (studies/smoke.toml, 2 trials) -> `tpsexplore
export --format onnx` through the CLI -> onnxruntime on real ImageNet JPEGs (../shared/data/imagenet-sample), resized
to the study's image size with the study's normalisation, whose logits match the eager patched model with the
trial's fine-tuned weights. Also: a pt2 export round trip, the export faults (exit 2, one line, nothing written), the
unchanged JSON export, and `profile` on onnxruntime and torch.compile (tiny proxy model) giving a paired speed-up.
Real search, real exporters, real onnxruntime and Dynamo/inductor; no mocks."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
import onnx  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from cli_run import run_cli  # noqa: E402
from conftest import IMAGENET_SAMPLE  # noqa: E402
from tpsexplore import deploy  # noqa: E402
from tpsexplore.measure.profile import ProfileConfig, format_profile, profile  # noqa: E402
from tpsexplore.reduce import ReductionConfig, last_info  # noqa: E402
from tpsexplore.report import load_deployment, load_trials  # noqa: E402
from tpsexplore.report.export import model_config_path, sha256_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "studies" / "smoke.toml"
N_IMAGES = 8
ONNX_TOL = 1e-4
PT2_TOL = 1e-5
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def study(proxy_cache, tmp_path_factory) -> Path:
    """The smoke study, searched for real: the baseline and one reduced trial, both fine-tuned, weights kept."""
    out = tmp_path_factory.mktemp("e2e-runs")
    torch.set_num_threads(1)
    rc, _, err = run_cli(["search", "--study", str(SMOKE), "--out", str(out), "--trials", "2", "--confirm", "0",
                       "--quiet"])
    assert rc == 0, err[-2000:]
    return out / "smoke"


@pytest.fixture(scope="module")
def trial(study: Path) -> int:
    """A complete reduced (not baseline) trial the search kept weights for."""
    df = load_trials(study)
    rows = df[(df["state"] == "complete") & ~df["is_baseline"]]
    numbers = [int(n) for n in rows["number"] if (study / "weights" / f"trial_{int(n)}.safetensors").is_file()]
    assert numbers, df[["number", "label", "state"]]
    return numbers[0]


@pytest.fixture(scope="module")
def onnx_export(study: Path, trial: int, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("deploy")
    path = folder / "model.onnx"
    rc, out, err = run_cli(["export", str(study), "--trial", str(trial), "--format", "onnx", "-o", str(path)])
    assert rc == 0, err
    return {"path": path, "stdout": out, "stderr": err, "config": json.loads(model_config_path(path).read_text())}


def _images(size: int, mean: list[float], std: list[float]) -> torch.Tensor:
    """Real JPEGs from across the ImageNet sample, resized to ``size`` px and normalised as the study's data."""
    from timm.data import create_transform

    files = sorted(IMAGENET_SAMPLE.glob("*.JPEG"))
    assert len(files) >= N_IMAGES, f"{IMAGENET_SAMPLE} holds {len(files)} JPEGs"
    picked = files[:: len(files) // N_IMAGES][:N_IMAGES]
    tf = create_transform(input_size=(3, size, size), mean=tuple(mean), std=tuple(std), crop_pct=1.0,
                          interpolation="bicubic", is_training=False)
    batch = []
    for f in picked:
        with Image.open(f) as im:
            assert max(im.size) > 2 * size  # real photographs, downscaled here
            batch.append(tf(im.convert("RGB")))
    return torch.stack(batch)


@pytest.fixture(scope="module")
def real_images(onnx_export: dict) -> torch.Tensor:
    pre = onnx_export["config"]["model"]["preprocess"]
    return _images(pre["img_size"], pre["mean"], pre["std"])


@pytest.fixture(scope="module")
def eager(onnx_export: dict, study: Path, trial: int) -> torch.nn.Module:
    """The eager patched model with the trial's weights, built from the config written beside the ONNX file."""
    model = load_deployment(model_config_path(onnx_export["path"]))
    state = load_file(str(study / "weights" / f"trial_{trial}.safetensors"))
    own = model.state_dict()
    assert set(state) == set(own) and all(torch.equal(own[k], state[k]) for k in state)  # the trial's, not random
    return model.eval()


# ----------------------------------------------------------------------------- search -> ONNX -> onnxruntime
def test_the_onnx_file_carries_its_config_and_sits_beside_the_full_one(onnx_export: dict, study: Path, trial: int):
    path, cfg = onnx_export["path"], onnx_export["config"]
    assert onnx_export["stdout"].count("\n") == 1 and "as onnx (dynamic batch)" in onnx_export["stdout"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx", "model.onnx.json"]
    m = cfg["model"]
    assert m["path"] == "model.onnx" and m["format"] == "onnx" and m["batch_size"] == "dynamic"
    assert m["sha256"] == sha256_file(path) and m["bytes"] == path.stat().st_size
    assert m["input"] == [3, 32, 32] and m["opset"] >= 17
    assert cfg["trial"] == trial and cfg["proxy"] is True and cfg["geometry"]["img_size"] == 32
    assert cfg["weights"]["sha256"] == sha256_file(study / "weights" / f"trial_{trial}.safetensors")
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert ReductionConfig.from_json(meta["tpsexplore.reduction"]) == ReductionConfig.from_dict(cfg["reduction"])
    assert meta["tpsexplore.batch_size"] == "dynamic" and meta["tpsexplore.label"] == cfg["label"]


def test_onnxruntime_on_real_jpegs_matches_the_eager_model_with_the_trials_weights(
        onnx_export: dict, real_images: torch.Tensor, eager: torch.nn.Module):
    session = deploy.onnxruntime_session(onnx_export["path"], threads=1)
    got = deploy.run_onnx(session, real_images)
    with torch.no_grad():
        want = eager(real_images)
    assert got.shape == (N_IMAGES, 10)
    assert torch.allclose(got, want, atol=ONNX_TOL, rtol=0), (got - want).abs().max()
    assert torch.equal(got.argmax(1), want.argmax(1))
    assert float(want.std(0).mean()) > 1e-3  # different photographs give different logits: a real path
    cfg = onnx_export["config"]
    assert [list(c) for c in last_info(eager).token_counts] == cfg["tokens"]  # the reduction ran as exported
    assert cfg["tokens"][-1][1] < cfg["tokens"][0][0]
    one = deploy.run_onnx(session, real_images[3:4])  # the batch dimension is dynamic
    assert torch.allclose(one, want[3:4], atol=ONNX_TOL, rtol=0)


def test_pt2_export_round_trip(study: Path, trial: int, tmp_path: Path, real_images: torch.Tensor,
                               eager: torch.nn.Module):
    path = tmp_path / "model.pt2"
    rc, out, err = run_cli(["export", str(study), "--trial", str(trial), "--format", "pt2", "--batch-size",
                         str(N_IMAGES), "-o", str(path)])
    assert rc == 0, err
    assert "as pt2 (batch 8)" in out
    cfg = json.loads(model_config_path(path).read_text())
    assert cfg["model"]["batch_size"] == N_IMAGES and cfg["model"]["sha256"] == sha256_file(path)
    extra = {"tpsexplore.json": ""}
    program = torch.export.load(path, extra_files=extra)
    assert json.loads(extra["tpsexplore.json"])["tpsexplore.batch_size"] == str(N_IMAGES)
    with torch.no_grad():
        got, want = program.module()(real_images), eager(real_images)
    assert torch.allclose(got, want, atol=PT2_TOL, rtol=0), (got - want).abs().max()


def test_without_format_the_json_export_is_unchanged(study: Path, trial: int, tmp_path: Path):
    path = tmp_path / "config.json"
    rc, out, err = run_cli(["export", str(study), "--trial", str(trial), "-o", str(path)])
    assert rc == 0, err
    cfg = json.loads(path.read_text())
    assert "model" not in cfg and cfg["weights"]["path"] == f"weights/trial_{trial}.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


# ------------------------------------------------------------------ faults: exit 2, one line, nothing written
def _fault_cases(study: Path, trial: int, tmp: Path) -> dict[str, tuple[list[str], str]]:
    bare = tmp / "no-weights" / "smoke"  # the same study, its trial's weights gone
    shutil.copytree(study, bare)
    (bare / "weights" / f"trial_{trial}.safetensors").unlink()
    (tmp / "a-file").write_bytes(b"not a folder")
    (tmp / "a-dir").mkdir()
    base = ["export", str(study), "--trial", str(trial)]
    return {
        "no weights": (["export", str(bare), "--trial", str(trial), "--format", "onnx", "-o", str(tmp / "old.onnx")],
                       "weights:"),
        "-o is a directory": ([*base, "--format", "onnx", "-o", str(tmp / "a-dir")], "is a directory"),
        "-o under a file": ([*base, "--format", "pt2", "-o", str(tmp / "a-file" / "m.pt2")], "cannot be written"),
        "-o names JSON": ([*base, "--format", "onnx", "-o", str(tmp / "m.json")], "names a JSON file"),
        "--format without -o": ([*base, "--format", "onnx"], "give -o FILE"),
        "dynamic torchscript": ([*base, "--format", "torchscript", "--batch-size", "dynamic", "-o",
                                 str(tmp / "m.ts")], "dynamic is not possible for torchscript"),
        "dynamic without --format": ([*base, "--batch-size", "dynamic", "-o", str(tmp / "c.json")], "--format"),
    }


def test_export_faults_exit_2_in_one_line_and_write_nothing(study: Path, trial: int, tmp_path: Path):
    cases = _fault_cases(study, trial, tmp_path)
    (tmp_path / "old.onnx").write_bytes(b"previous export")
    before = {p: p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")}
    for name, (argv, needle) in cases.items():
        rc, out, err = run_cli(argv)
        assert rc == 2, (name, err)
        assert out == "" and err.count("\n") == 1 and err.startswith("tpsexplore export: error: "), (name, err)
        assert needle in err, (name, err)
        after = {p: p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")}
        assert after == before, (name, set(after) ^ set(before))  # nothing written, the old file untouched


# ----------------------------------------------------------------------------- profile on each runtime
TINY_PROXY_KW = dict(img_size=16, patch_size=4, epochs=1, batch_size=32, lr=3e-3, train_limit=64, val_limit=32,
                     min_top1=None, model_kwargs=dict(depth=4, embed_dim=32, num_heads=2))


@pytest.mark.parametrize("runtime", ["onnxruntime", "compile"])
def test_profile_runtime_gives_a_paired_speedup(runtime: str, tmp_path_factory):
    from tpsexplore.measure.train import ProxyConfig

    cache = tmp_path_factory.getbasetemp() / "e2e-profile-cache"  # one proxy pre-training for both runtimes
    cfg = ProfileConfig(backbone="deit_t", reduction=ReductionConfig("topk", (1, 2), (0.5,)), finetune_steps=0,
                        device="cpu", batch_sizes=(4,), window_s=0.05, windows=2, val_limit=16, train_limit=32,
                        cache_dir=str(cache), proxy=ProxyConfig(**TINY_PROXY_KW), progress=False, runtime=runtime)
    r = profile(cfg)
    assert r["runtime"]["name"] == runtime
    if runtime == "onnxruntime":
        assert r["runtime"]["intra_op_threads"] == 1 and r["runtime"]["opset"] >= 17
    else:
        assert r["runtime"]["fullgraph"] is True and r["runtime"]["compile_s"] > 0
    [s] = r["speedups"]
    assert (s["dtype"], s["batch_size"]) == ("fp32", 4)  # fp32 only off eager
    assert len(s["window_ratios"]) == 3 and min(s["window_ratios"]) <= s["speedup"] <= max(s["window_ratios"])
    [t] = r["throughput"]
    assert t["status"] == "ok" and t["images_per_s"] > 0 and t["baseline_images_per_s"] > 0
    assert "zero_shot" in r["accuracy"]
    assert "runtime  " + ("onnxruntime" if runtime == "onnxruntime" else "torch.compile") in format_profile(r)


def test_profile_runtime_flags_are_checked_before_any_work():
    from tpsexplore.measure import profile as profile_module, profile_cli
    from tpsexplore.report import export_cli

    assert profile_cli.RUNTIMES == profile_module.RUNTIMES and export_cli.FORMATS == deploy.FORMATS  # torch-free copies
    for argv, needle in ((["--runtime", "onnxruntime", "--dtypes", "fp32,bf16"], "--dtypes: fp32,bf16"),
                         (["--runtime", "onnxruntime", "--device", "cuda"], "--device: 'cuda'"),
                         (["--runtime", "tvm"], "invalid choice: 'tvm'")):
        rc, out, err = run_cli(["profile", "--backbone", "deit_t", *argv])
        assert rc == 2 and err.count("\n") == 1 and needle in err, err
