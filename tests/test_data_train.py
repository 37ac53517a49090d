"""Data sets (digits proxy, labels file of real JPEGs, ImageFolder tree), short fine-tuning, evaluation
and the proxy pre-training cache, on real tiny random-init timm ViTs. The full deit_t proxy run is a
benchmark (benchmarks/proxy_pretrain.py), not a test."""
from __future__ import annotations

import copy
import csv
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from tpsexplore.backbones import create_backbone
from sklearn.datasets import load_digits

from tpsexplore.measure.data import (
    CLUTTER,
    PROXY_VERSIONS,
    ClutteredData,
    ClutterSpec,
    DataSpec,
    ImageListData,
    TensorData,
    build_datasets,
    render_cluttered,
)
from tpsexplore.measure.train import (
    FinetuneConfig,
    ProxyConfig,
    amp_dtype_for,
    evaluate,
    finetune,
    native_bf16,
    proxy_backbone,
    proxy_cache_path,
    proxy_lr,
    token_distill_loss,
    tps_lr,
)
from tpsexplore.reduce import ReductionConfig, apply, last_info

from conftest import IMAGENET_SAMPLE  # noqa: E402
TINY = dict(depth=2, embed_dim=32, num_heads=2)
FAST = dict(batch_size=32, lr=3e-3, progress=False)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_vit(img_size: int = 16, patch_size: int = 4, num_classes: int = 10, **kw):
    return create_backbone("deit_t", weights="random", img_size=img_size, patch_size=patch_size,
                           num_classes=num_classes, **{**TINY, **kw})


@pytest.fixture(scope="module")
def proxy_small():
    torch.manual_seed(0)
    model = tiny_vit()
    # the old digits proxy: a tiny model learns it in a few dozen steps (the cluttered one needs hundreds)
    train, val, info = build_datasets(DataSpec(seed=0, train_limit=64, val_limit=48, proxy="digits"), model)
    return model, train, val, info


# ----------------------------------------------------------------------------- data: proxies
def _digit_indices(ds) -> set[int]:
    return set(ds.indices.tolist())


def test_cluttered_proxy_is_the_default_with_a_fixed_large_val_set_from_disjoint_digits():
    model = tiny_vit(img_size=56, patch_size=8, depth=1)
    train, val, info = build_datasets(DataSpec(seed=3), model)
    assert DataSpec().proxy == "cluttered" and info["source"] == "cluttered"
    assert isinstance(train, ClutteredData) and isinstance(val, TensorData)
    assert len(val) == info["n_val"] >= 4000 and val.images.shape[1:] == (3, 56, 56)
    # train and val come from disjoint real digits; each val digit appears at several placements
    assert _digit_indices(train).isdisjoint(_digit_indices(val))
    assert len(train) == info["n_train"] == info["proxy"]["n_train_digits"] == 1797 - 359
    assert info["proxy"]["n_val_digits"] == len(_digit_indices(val)) == 359
    assert set(train.labels.tolist()) == set(range(10)) == set(val.labels.tolist())
    digits = torch.from_numpy(load_digits().images).float() / 16
    assert torch.equal(train.digits, digits[train.indices])  # fragments are cut from the training digits only
    # the definition is recorded
    d = info["proxy"]
    assert (d["name"], d["version"], d["seed"], d["canvas"]) == ("cluttered", PROXY_VERSIONS["cluttered"], 3, 56)
    assert d["digit_px"] == [28.0, 42.0] and d["fragments"] == list(CLUTTER.fragments)
    assert d["fragment_crop"] == list(CLUTTER.fragment_crop) and d["val_images"] == len(val)
    assert "not ImageNet" in info["note"] and (info["num_patches"], info["num_tokens"]) == (49, 50)
    # normalised to [-1, 1], three equal channels, black background: the digit covers part of the canvas
    assert val.images.min() == -1.0 and val.images.max() <= 1.0 and torch.equal(val.images[:, 0], val.images[:, 2])
    ink = (val.images[:, 0] > -0.9).float().mean().item()
    assert 0.1 < ink < 0.45, ink  # 29% at the defaults
    # the val set is identical across builds with the same seed, and another seed gives another one
    _, again, again_info = build_datasets(DataSpec(seed=3), model)
    assert torch.equal(again.images, val.images) and torch.equal(again.labels, val.labels)
    assert torch.equal(again.indices, val.indices) and again_info["proxy"] == info["proxy"]
    other_train, other, _ = build_datasets(DataSpec(seed=4), model)
    assert len(other) == len(val) and not torch.equal(other.images, val.images)
    assert _digit_indices(other_train) != _digit_indices(train)
    # limits keep a seed-fixed subset of the training digits and of the val images
    small, small_val, info = build_datasets(DataSpec(seed=3, train_limit=50, val_limit=20), model)
    assert (len(small), len(small_val), info["n_train"], info["n_val"]) == (50, 20, 50, 20)
    assert _digit_indices(small) <= _digit_indices(train)
    same = (small_val.images[:, None, 0] == val.images[None, :, 0]).flatten(2).all(-1)  # (20, 4000)
    assert same.any(1).all() and torch.equal(small_val.labels, val.labels[same.float().argmax(1)])


def test_cluttered_training_batches_are_fresh_renderings():
    model = tiny_vit(img_size=56, patch_size=8, depth=1)
    train, _, _ = build_datasets(DataSpec(seed=0, train_limit=64, val_limit=8), model)
    idx = torch.arange(16)
    x0, y0 = train.batch(idx)  # not augmented: the fixed pool
    assert torch.equal(x0, train.images[:16]) and torch.equal(y0, train.labels[:16])
    xa, ya = train.batch(idx, torch.Generator().manual_seed(1), augment=True)
    xb, _ = train.batch(idx, torch.Generator().manual_seed(1), augment=True)
    xc, _ = train.batch(idx, torch.Generator().manual_seed(2), augment=True)
    assert torch.equal(ya, y0) and xa.shape == x0.shape and torch.equal(xa, xb)  # seed-fixed
    assert not torch.allclose(xa, x0) and not torch.allclose(xa, xc)  # new placements every draw


def test_render_cluttered_draws_the_digit_inside_its_box_and_fragments_from_other_digits():
    digits = torch.zeros(5, 8, 8)
    digits[0] = 1.0  # the drawn digit is a solid square; the others are blank
    spec = ClutterSpec(digit_size=(0.25, 0.5), fragments=(3, 3), fragment_intensity=(0.5, 0.7))
    x = render_cluttered(digits, torch.zeros(32, dtype=torch.long), 56, spec, torch.Generator().manual_seed(0))
    assert x.shape == (32, 1, 56, 56) and x.min() >= 0.0 and x.max() > 0.999
    side = (x[:, 0] > 0.5).sum(dim=(1, 2)).float().sqrt()  # one solid square of 14..28 px per image
    assert side.min() >= 14 - 1 and side.max() <= 28 + 1
    # the same blank/solid digits swapped: only fragments carry ink, at their intensity, never the digit itself
    digits = 1.0 - digits
    x = render_cluttered(digits, torch.zeros(32, dtype=torch.long), 56, spec, torch.Generator().manual_seed(0))
    assert 0.5 - 1e-6 <= x.amax(dim=(1, 2, 3)).min() and x.max() <= 0.7 + 1e-6
    x = render_cluttered(digits, torch.zeros(4, dtype=torch.long), 56,
                         ClutterSpec(fragments=(0, 0)), torch.Generator().manual_seed(0))
    assert x.max() == 0.0  # no fragments: a blank digit gives a blank image
    with pytest.raises(ValueError, match=r"^fragment_crop: \(2, 9\) must satisfy"):
        ClutterSpec(fragment_crop=(2, 9))


def test_old_digits_proxy_stays_reachable_by_name():
    model = tiny_vit(img_size=24, patch_size=8)
    train, val, info = build_datasets(DataSpec(seed=3, proxy="digits"), model)
    assert type(train) is TensorData and isinstance(val, TensorData)
    assert train.images.shape[1:] == (3, 24, 24) and train.images.dtype == torch.float32
    assert len(train) + len(val) == 1797 and abs(len(val) - 359) <= 1
    assert _digit_indices(train).isdisjoint(_digit_indices(val))
    assert (info["source"], info["num_classes"], info["img_size"], info["patch_size"]) == ("digits", 10, 24, 8)
    assert info["proxy"]["name"] == "digits" and (info["num_patches"], info["num_tokens"]) == (9, 10)
    assert torch.equal(train.images[:, 0], train.images[:, 2])
    assert train.images.min() >= -1.0 and train.images.max() <= 1.0
    # the random shift augments its training batches only
    train, val, _ = build_datasets(DataSpec(seed=0, proxy="digits", proxy_shift=0.2, train_limit=16, val_limit=8),
                                   model)
    idx = torch.arange(8)
    x0, y0 = train.batch(idx)
    xa, ya = train.batch(idx, torch.Generator().manual_seed(1), augment=True)
    assert torch.equal(y0, ya) and xa.shape == x0.shape and not torch.allclose(xa, x0)
    assert torch.equal(val.batch(idx, torch.Generator(), augment=True)[0], val.images[:8])
    with pytest.raises(ValueError, match=r"^proxy: 'mnist'; allowed: cluttered, digits"):
        DataSpec(proxy="mnist")
    with pytest.raises(ValueError, match=r"^proxy_shift: 0.1 applies to the 'digits' proxy only"):
        DataSpec(proxy_shift=0.1)
    with pytest.raises(ValueError, match=r"^proxy: 'mnist'; allowed: cluttered, digits"):
        ProxyConfig(proxy="mnist")


# ----------------------------------------------------------------------------- data: real images
@pytest.mark.skipif(not (IMAGENET_SAMPLE / "labels.csv").is_file(),
                    reason=f"{IMAGENET_SAMPLE} (1,000 real ImageNet JPEGs + labels.csv) is not present")
def test_labels_file_loads_real_jpegs_as_rgb():
    model = tiny_vit(img_size=32, patch_size=8, num_classes=1000)
    spec = DataSpec(path=str(IMAGENET_SAMPLE), seed=0, train_limit=16, val_limit=16, train_augment=False)
    train, val, info = build_datasets(spec, model)
    assert isinstance(train, ImageListData) and (len(train), len(val)) == (16, 16)
    assert (info["source"], info["num_classes"], info["n_train"], info["n_val"]) == ("labels", 1000, 16, 16)
    assert train.classes[0] == "n01440764" and len(train.classes) == 1000 and "classes" not in info
    assert set(p for p, _ in train.samples).isdisjoint(p for p, _ in val.samples)
    for ds in (train, val):
        for i in range(len(ds)):
            x, y = ds[i]
            assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and torch.isfinite(x).all()
            assert Path(ds.samples[i][0]).name.startswith(ds.classes[y])  # n0xxxxxxx_name.JPEG
    # the split is seed-fixed
    again, _, _ = build_datasets(spec, model)
    assert again.samples == train.samples
    # greyscale JPEGs come out with three channels
    with open(IMAGENET_SAMPLE / "labels.csv") as f:
        names = [row["filename"] for row in csv.DictReader(f)]
    grey = next(n for n in names if Image.open(IMAGENET_SAMPLE / n).mode == "L")
    img, _ = ImageListData([(str(IMAGENET_SAMPLE / grey), 0)])[0]
    assert img.mode == "RGB"
    x, _ = ImageListData([(str(IMAGENET_SAMPLE / grey), 0)], val.transform)[0]
    assert x.shape == (3, 32, 32)


def _write_images(folder: Path, n: int, color, mode: str = "RGB") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new(mode, (20, 12), color).save(folder / f"img{i}.png")


def test_image_folder_tree(tmp_path):
    _write_images(tmp_path / "train" / "cat", 3, (200, 10, 10))
    _write_images(tmp_path / "train" / "dog", 2, 90, mode="L")  # greyscale class
    _write_images(tmp_path / "val" / "cat", 1, (200, 10, 10))
    _write_images(tmp_path / "val" / "dog", 2, 90, mode="L")
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    model = tiny_vit(num_classes=2)
    train, val, info = build_datasets(DataSpec(path=str(tmp_path), train_augment=False), model)
    assert (info["source"], info["classes"], len(train), len(val)) == ("imagefolder", ["cat", "dog"], 5, 3)
    assert sorted(train.targets) == [0, 0, 0, 1, 1] and sorted(val.targets) == [0, 1, 1]
    x, y = val[2]
    assert x.shape == (3, 16, 16) and y == 1
    raw = x * torch.tensor(info["std"])[:, None, None] + torch.tensor(info["mean"])[:, None, None]
    assert torch.allclose(raw, torch.full_like(raw, 90 / 255), atol=1e-2)  # greyscale became equal R, G, B
    record = finetune(model, train, val, FinetuneConfig(steps=2, batch_size=4, progress=False))
    assert record["n"] == 3
    with pytest.raises(ValueError, match=r"^num_classes: the data has 2 classes but the model head has 1"):
        build_datasets(DataSpec(path=str(tmp_path)), tiny_vit(num_classes=1))


# ----------------------------------------------------------------------------- data: bad input
def _flat_folder(tmp_path: Path, rows: list[str], header: str = "filename,synset,class_index") -> Path:
    for name in ("a.png", "b.png", "c.png"):
        Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / name)
    (tmp_path / "labels.csv").write_text("\n".join([header, *rows]) + "\n")
    return tmp_path


def test_flat_folder_with_labels_file(tmp_path):
    root = _flat_folder(tmp_path, ["a.png,n1,0", "b.png,n2,1", "c.png,n1,0"])
    train, val, info = build_datasets(DataSpec(path=str(root), val_fraction=0.34), tiny_vit(num_classes=2))
    assert (len(train), len(val), info["classes"]) == (2, 1, ["n1", "n2"])


@pytest.mark.parametrize("rows, header, error, match", [
    (["a.png,n1,0", "missing.png,n2,1"], None, FileNotFoundError, r"^labels: 'missing.png' \(line 3"),
    (["a.png,n1,0"], "file,synset,label", ValueError, r"^labels: .* lacks column\(s\) filename, class_index"),
    (["a.png,n1,0", "b.png,n2,5"], None, ValueError, r"^class_index: 5 for 'b.png' .* out of range \[0, 3\)"),
    (["a.png,n1,-1"], None, ValueError, r"^class_index: -1 "),
    (["a.png,n1,x"], None, ValueError, r"^class_index: 'x' \(line 2 of labels.csv\) is not an integer"),
    (["a.png,n1,0", "b.png,n2,0"], None, ValueError, r"^class_index: 0 is given to two synsets"),
    ([], None, ValueError, r"^labels: .* lists no images"),
])
def test_labels_file_mismatch_errors(tmp_path, rows, header, error, match):
    root = _flat_folder(tmp_path, rows, header or "filename,synset,class_index")
    with pytest.raises(error, match=match):
        build_datasets(DataSpec(path=str(root)), tiny_vit(num_classes=3))


def test_missing_paths_and_bad_specs(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^data: '.*nowhere' does not exist"):
        build_datasets(DataSpec(path=str(tmp_path / "nowhere")))
    with pytest.raises(ValueError, match=r"^data: .* has neither train/ and val/ subfolders nor a labels.csv"):
        build_datasets(DataSpec(path=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match=r"^labels: '.*other.csv' does not exist"):
        build_datasets(DataSpec(path=str(tmp_path), labels=str(tmp_path / "other.csv")))
    with pytest.raises(ValueError, match=r"^val_fraction: 1.5 is outside \(0, 1\)"):
        DataSpec(val_fraction=1.5)
    with pytest.raises(ValueError, match=r"^train_limit: 0 must be a positive integer"):
        DataSpec(train_limit=0)
    with pytest.raises(ValueError, match=r"^amp: 'fp8'; allowed: auto, bf16, fp16, off"):
        FinetuneConfig(amp="fp8")
    with pytest.raises(ValueError, match=r"^token_loss: 'l1'"):
        FinetuneConfig(token_loss="l1")


# ----------------------------------------------------------------------------- fine-tune / evaluate
def test_finetune_reduces_loss_and_records_the_run(proxy_small):
    model, train, val, info = proxy_small
    model = copy.deepcopy(model)
    record = finetune(model, train, val, FinetuneConfig(steps=60, **FAST))
    assert record["steps"] == 60 and len(record["losses"]) == 60 and record["warmup_steps"] == 6
    assert record["loss_end"] < record["loss_start"] - 0.25, (record["loss_start"], record["loss_end"])
    assert record["amp"] == "fp32" and record["device"] == "cpu" and record["epochs"] == 60 * 32 / 64
    assert record["loss_parts"]["ratio"] == 0.0 and record["loss_parts"]["kl"] == 0.0
    assert 0.0 <= record["top1"] <= record["top5"] <= 1.0 and record["n"] == len(val)


def test_bf16_on_cpu_only_when_asked_and_training_restores_fused_attention(proxy_small):
    model, train, val, _ = proxy_small
    cpu = torch.device("cpu")
    assert amp_dtype_for("auto", cpu) is None and amp_dtype_for("off", cpu) is None
    assert amp_dtype_for("bf16", cpu) is torch.bfloat16
    model = copy.deepcopy(model)
    fused = [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")]
    assert fused and all(fused)
    record = finetune(model, train, None, FinetuneConfig(steps=3, **{**FAST, "amp": "bf16"}))
    assert record["amp"] == "bf16" and all(math.isfinite(v) for v in record["losses"])
    assert [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")] == fused  # restored after training
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast keeps fp32 master weights
    # the proxy's pre-training asks for bf16 exactly where the hardware has it (AMX on CPU)
    assert ProxyConfig().finetune_config(0, False).amp == ("bf16" if native_bf16(cpu) else "auto")
    assert ProxyConfig(amp="off").finetune_config(0, False).amp == "off"
    with pytest.raises(ValueError, match=r"^amp: 'fp8'; allowed: auto, bf16, fp16, off"):
        ProxyConfig(amp="fp8")


def test_finetune_is_deterministic_per_seed(proxy_small):
    model, train, val, _ = proxy_small
    runs = [finetune(copy.deepcopy(model), train, val, FinetuneConfig(steps=6, seed=s, **FAST)) for s in (1, 1, 2)]
    assert runs[0]["losses"] == runs[1]["losses"] and runs[0]["top1"] == runs[1]["top1"]
    assert runs[0]["losses"] != runs[2]["losses"]


def test_evaluate_top1_top5(proxy_small):
    model, _, val, _ = proxy_small
    model.train()
    result = evaluate(model, val, batch_size=20, progress=False)
    assert set(result) == {"top1", "top5", "n", "correct1", "correct5", "top1_bits"} and result["n"] == len(val) == 48
    assert result["top1_bits"].shape == (48,) and int(result["top1_bits"].sum()) == result["correct1"]
    assert 0.0 <= result["top1"] <= result["top5"] <= 1.0
    assert model.training  # the caller's mode is restored
    # hand check against the logits
    with torch.no_grad():
        model.eval()
        logits = model(val.images)
    assert result["top1"] == pytest.approx((logits.argmax(-1) == val.labels).float().mean().item())


def test_default_lr_follows_tps_rule():
    assert FinetuneConfig(batch_size=256).base_lr == pytest.approx(6.25e-5) == tps_lr(256)
    assert FinetuneConfig(epochs=2, batch_size=10).total_steps(55) == 10  # 5 full batches per epoch
    assert proxy_lr(192) == 5e-4 and proxy_lr(384) == pytest.approx(1.25e-4)  # deit_t, deit_s


def test_nan_loss_raises_floating_point_error(proxy_small):
    model, train, _, _ = proxy_small
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.head.bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"^loss: NaN at step 1 of 3"):
        finetune(model, train, None, FinetuneConfig(steps=3, **FAST))


def test_distillation_and_ratio_loss_with_reduced_students(proxy_small):
    teacher, train, _, _ = proxy_small
    for cfg in (ReductionConfig("dtps", (0,), (0.5,)), ReductionConfig("evit", (1,), (0.5,)),
                ReductionConfig("tome", r=3)):
        student = apply(copy.deepcopy(teacher), cfg)
        record = finetune(student, train, None, FinetuneConfig(steps=2, **FAST), teacher=teacher)
        parts = record["loss_parts"]
        assert record["weights"] == {"ce": 1.0, "ratio": 2.0, "kl": 0.5, "token": 0.5}
        assert all(math.isfinite(v) for v in parts.values())
        assert parts["kl"] > 0 and parts["token"] > 0, (cfg.method, parts)
        assert (parts["ratio"] > 0) == (cfg.method == "dtps"), (cfg.method, parts)


def test_token_term_aligns_student_tokens_with_teacher_tokens(proxy_small):
    teacher, train, _, _ = proxy_small
    x = train.images[:4]
    with torch.no_grad():
        t = teacher.forward_features(x)
        assert token_distill_loss(teacher, t, t.clone()) == 0.0  # plain timm model: token ids = arange
        student = apply(copy.deepcopy(teacher), ReductionConfig("topk", (1,), (0.5,))).eval()
        s = student.forward_features(x)
        ids = last_info(student).token_ids
        assert s.shape[1] < t.shape[1] and not torch.equal(ids, torch.arange(s.shape[1]).expand_as(ids))
        aligned = torch.gather(t, 1, ids[..., None].expand(-1, -1, t.shape[-1]))
        for kind in ("kl", "mse"):
            assert token_distill_loss(student, aligned, t, kind) < 1e-6
            assert token_distill_loss(student, t[:, :s.shape[1]], t, kind) > 1e-4
        with pytest.raises(ValueError, match=r"^teacher: outputs 9 tokens, the token term needs"):
            token_distill_loss(student, s, s)


# ----------------------------------------------------------------------------- proxy cache
def test_proxy_cache_written_then_reused(tmp_path, capsys):
    cfg = ProxyConfig(img_size=16, patch_size=4, epochs=1, batch_size=32, lr=3e-3, train_limit=64, val_limit=32,
                      min_top1=None, model_kwargs=TINY)
    model, info = proxy_backbone("deit_t", seed=0, cache_dir=tmp_path, cfg=cfg)
    err = capsys.readouterr().err
    assert info["cache"] == "trained" and "training deit_t on the cluttered proxy" in err and info["lr"] == 3e-3
    assert info["weights_note"] == "proxy-pretrained on cluttered (scikit-learn digits), not ImageNet"
    assert info["proxy"]["name"] == "cluttered" and info["proxy"]["n_val"] == info["n_val"] == 32
    assert (info["img_size"], info["patch_size"], info["num_patches"], info["num_tokens"]) == (16, 4, 16, 17)
    files = list(tmp_path.iterdir())
    assert [f.name for f in files] == [Path(info["checkpoint"]).name]  # no temporary files left behind
    assert model.tps_backbone.checkpoint == info["checkpoint"]
    again, info2 = proxy_backbone("deit_t", seed=0, cache_dir=tmp_path, cfg=cfg)
    err = capsys.readouterr().err
    assert info2["cache"] == "loaded" and "loading cached deit_t proxy weights" in err
    assert info2["val_top1"] == info["val_top1"]
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    # the cached model is the trained one: same accuracy on the same held-out split
    _, val, _ = build_datasets(DataSpec(**info["data_spec"]), again)
    assert evaluate(again, val, progress=False)["top1"] == info["val_top1"]
    # another seed is another cache entry; a missed accuracy floor raises and caches nothing
    with pytest.raises(RuntimeError, match=r"^proxy: deit_t reached val top-1 .* < 1.01"):
        proxy_backbone("deit_t", seed=1, cache_dir=tmp_path, progress=False,
                       cfg=ProxyConfig(**{**cfg.__dict__, "min_top1": 1.01}))
    assert len(list(tmp_path.iterdir())) == 1


def test_proxy_config_defaults_and_cache_key_follow_the_proxy_definition(tmp_path):
    cfg = ProxyConfig()
    assert (cfg.proxy, cfg.img_size, cfg.patch_size, cfg.epochs) == ("cluttered", 56, 8, None)
    assert cfg.min_top1 >= 0.85 and cfg.finetune_config(0, False).steps == cfg.steps
    by_epochs = ProxyConfig(epochs=2).finetune_config(0, False)
    assert (by_epochs.steps, by_epochs.epochs) == (None, 2)  # epochs, when set, give the length
    path = proxy_cache_path("deit_t", 0, tmp_path, cfg)
    old = proxy_cache_path("deit_t", 0, tmp_path, ProxyConfig(proxy="digits"))
    assert "cluttered56p8" in path.name and "digits56p8" in old.name and path != old
    assert proxy_cache_path("deit_t", 0, tmp_path, ProxyConfig(steps=cfg.steps + 1)) != path
    with pytest.raises(ValueError, match=r"^steps: 0 must be a positive integer"):
        ProxyConfig(steps=0)
