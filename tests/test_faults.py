"""Faults and bad input (issue 11): preflight before any write, exit 1 when no trial completed, the reason a
killed coordinator leaves, one-line errors instead of tracebacks, no silent acceptance, data that cannot work.

Every CLI case asserts the exit code, a single stderr line naming the bad value (never a traceback) and, where
nothing may change, that the files are byte-identical (sha256 of every file). Real timm models (a 2-block,
32-wide ViT on 32x32 images), real image folders, real journals and SQLite stores; no mocks.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cli_run import run_cli
from tpsexplore.backbones import create_backbone
from tpsexplore.reduce import ReductionConfig, apply

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2, num_classes=2)
pytestmark = pytest.mark.usefixtures("one_torch_thread")

STUDY = """
study_name = "real"
backbone = "deit_t"
budget = 0.6
trials = {trials}
max_stages = 1
finetune_steps = {steps}
methods = ["topk"]
threads = 1
workers = {workers}
data = "{data}"
checkpoint = "{checkpoint}"

[model]
img_size = 32
patch_size = 8
depth = 2
embed_dim = 32
num_heads = 2
num_classes = 2

[train]
batch_size = 4
{train}

[measure]
batch_size = 4
warmup_s = 0.0
window_s = 0.01
windows = 1
latency = false

[gate]
min_finetuned = 1

[confirm]
top = 0

[sampler]
n_startup_trials = 1
"""


# ----------------------------------------------------------------------------- helpers
def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}


def _cli(*args: str) -> SimpleNamespace:
    """`tpsexplore ARGS` through the real entry point (`tpsexplore.cli.main`) in this process: an exception that
    escapes it (a traceback for a user) fails the test. Subprocesses are used where signals are the point."""
    code, out, err = run_cli(list(args))
    return SimpleNamespace(returncode=code, stdout=out, stderr=err)


def _one_line(res: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """The run exited ``code`` with exactly one stderr line (no traceback) holding every needle."""
    err = res.stderr.strip()
    assert res.returncode == code, (res.returncode, res.stderr[-2000:])
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _tree(path: Path) -> dict[str, str]:
    """sha256 of every file under ``path`` ({} when it does not exist)."""
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _images(folder: Path, n: int, seed: int, good: bool = True, ext: str = ".png", prefix: str = "") -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        if good:
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{prefix}{i}{ext}")
        else:
            (folder / f"{prefix}{i}{ext}").write_bytes(b"not a jpeg " + bytes(rng.integers(0, 255, 64, dtype=np.uint8)))


def _study(tmp: Path, name: str = "study.toml", *, data: Path, checkpoint: Path, trials: int = 3, steps: int = 1,
           workers: int = 1, train: str = "", extra: str = "") -> Path:
    p = tmp / name
    p.write_text(STUDY.format(trials=trials, steps=steps, workers=workers, data=data, checkpoint=checkpoint,
                              train=train) + extra)
    return p


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny ImageFolder, an undecodable one, a half-undecodable one, a fitting, a corrupt and a
    non-fitting checkpoint."""
    root = tmp_path_factory.mktemp("faults")
    for split, n in (("train", 6), ("val", 4)):
        for c in ("a", "b"):
            _images(root / "data" / split / c, n, seed=hash((split, c)) % 1000)
            _images(root / "bad" / split / c, 2, seed=1, good=False, ext=".jpg")
            _images(root / "half" / split / c, 1, seed=2)  # 0.png decodes (the preflight), the rest do not
            _images(root / "half" / split / c, 4, seed=3, good=False, ext=".jpg", prefix="x")
    model = create_backbone("deit_t", weights="random", **TINY)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "ok.safetensors"))
    (root / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    other = create_backbone("deit_t", weights="random", **{**TINY, "num_classes": 5})
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(root / "misfit.safetensors"))
    return root


@pytest.fixture(scope="module")
def real_study(files, tmp_path_factory):
    """One complete search on the tiny real-image folder (random-init checkpoint: a chance-level baseline)."""
    tmp = tmp_path_factory.mktemp("real")
    study = _study(tmp, data=files / "data", checkpoint=files / "ok.safetensors")
    res = _cli("search", "--study", study, "--out", tmp / "out", "--quiet")
    return {"res": res, "dir": tmp / "out" / "real", "tmp": tmp}


# ============================================================================= 1. preflight before writes
@pytest.mark.parametrize("case, needle", [
    ("undecodable", "cannot be decoded as an image"),
    ("corrupt", "corrupt.safetensors"),
    ("misfit", "does not fit"),
    ("resnet", "'resnet18'"),
])
def test_failed_preflight_writes_nothing_and_the_fix_runs(files, tmp_path, case, needle):
    data, ckpt, extra = files / "data", files / "ok.safetensors", ""
    if case == "undecodable":
        data = files / "bad"
    elif case in ("corrupt", "misfit"):
        ckpt = files / f"{case}.safetensors"
    study = _study(tmp_path, data=data, checkpoint=ckpt)
    out = tmp_path / "out"
    args = ["search", "--study", study, "--out", out, "--quiet"] + (["--backbone", "resnet18"] if case == "resnet"
                                                                    else [])
    line = _one_line(_cli(*args), 2, needle)
    assert "error:" in line
    assert not out.exists(), sorted(out.rglob("*"))  # nothing written: not even the study directory
    if case == "corrupt":  # the corrected command in the same --out runs (1 trial keeps it short)
        fixed = _study(tmp_path, "fixed.toml", data=files / "data", checkpoint=files / "ok.safetensors", trials=1)
        res = _cli("search", "--study", fixed, "--out", out, "--quiet")
        assert res.returncode == 0, res.stderr[-2000:]
        assert (out / "real" / "results.db").is_file()


def test_failed_preflight_leaves_an_existing_study_byte_identical(real_study, files):
    assert real_study["res"].returncode == 0, real_study["res"].stderr[-2000:]
    before = _tree(real_study["dir"])
    study = _study(real_study["tmp"], "bad.toml", data=files / "data", checkpoint=files / "corrupt.safetensors")
    _one_line(_cli("search", "--study", study, "--out", real_study["dir"].parent, "--quiet"), 2,
              "corrupt.safetensors")
    assert _tree(real_study["dir"]) == before


def test_profile_with_undecodable_images_is_one_line(files, tmp_path):
    out = tmp_path / "p.json"
    _one_line(_cli("profile", "--backbone", "deit_t", "--data", files / "bad", "--weights", "random", "--json", out,
                   "--quiet"), 2, "cannot be decoded as an image", ".jpg")
    assert not out.exists()


@pytest.mark.parametrize("args, needle", [
    (["--backbone", "resnet18"], "'resnet18'"),
    (["--backbone", "deit_t", "--data", "DATA", "--checkpoint", "CORRUPT"], "corrupt.safetensors"),
    (["--backbone", "deit_t", "--method", "tome", "--r", "1000", "--data", "DATA", "--weights", "random"],
     "at most 98"),
])
def test_profile_bad_model_checkpoint_or_r_is_one_line(files, args, needle):
    args = [str(files / "data") if a == "DATA" else str(files / "corrupt.safetensors") if a == "CORRUPT" else a
            for a in args]
    _one_line(_cli("profile", *args, "--quiet"), 2, needle)


# ============================================================================= 2. no trial completed
@pytest.mark.parametrize("case, reason", [("nan", "nan loss"), ("undecodable", "undecodable image")])
def test_search_where_no_trial_completes_exits_1(files, tmp_path, case, reason):
    data = files / ("half" if case == "undecodable" else "data")
    train = "lr = 1e30" if case == "nan" else ""
    study = _study(tmp_path, data=data, checkpoint=files / "ok.safetensors", trials=2, steps=2, train=train)
    res = _cli("search", "--study", study, "--out", tmp_path / "out", "--quiet")
    assert res.returncode == 1, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    summary = [ln for ln in res.stderr.splitlines() if ln.startswith("search: ")]
    assert len(summary) == 1, res.stderr
    assert summary[0].startswith("search: 0 of 2 trials completed (2 failed") and reason in summary[0]
    assert str(tmp_path / "out" / "real" / "results.db") in summary[0]


def test_completed_study_exits_0(real_study):
    assert real_study["res"].returncode == 0, real_study["res"].stderr[-2000:]
    assert "search: 0 of" not in real_study["res"].stderr


# ============================================================================= 3. what stopped a trial
def _journal_reasons(study_dir: Path) -> list[str]:
    import optuna

    from tpsexplore.search.backend import SearchJournalBackend, end

    storage = optuna.storages.JournalStorage(SearchJournalBackend(str(study_dir / "optuna.journal")))
    trials = optuna.load_study(study_name="real", storage=storage).get_trials(deepcopy=False)
    return [end(t, "reason") or "" for t in trials]


def _running_trial(study_dir: Path) -> bool:
    journal = study_dir / "optuna.journal"
    return journal.exists() and journal.read_text().count('"tpsx_heartbeat"') >= 2  # a trial after the baseline


def _start_and_wait(cmd: list[str], study_dir: Path, timeout: float = 120) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    t_end = time.time() + timeout
    while not _running_trial(study_dir):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() < t_end, "no trial started"
        time.sleep(0.2)
    return proc


# ~25 s on an idle 2-core machine (two spawned workers must start a trial before the kill); in the default run
# because nothing else covers a killed coordinator
def test_killed_coordinator_is_recorded_by_its_workers(files, tmp_path):
    study = _study(tmp_path, data=files / "data", checkpoint=files / "ok.safetensors", trials=6, steps=400,
                   workers=2)
    d = tmp_path / "out" / "real"
    proc = _start_and_wait([sys.executable, "-m", "tpsexplore.cli", "search", "--study", str(study), "--out",
                            str(tmp_path / "out"), "--quiet"], d)
    pid = proc.pid
    os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    t_end = time.time() + 90
    while time.time() < t_end:  # the orphaned workers notice, record and stop
        reasons = _journal_reasons(d)
        if any(f"coordinator {pid} exited" in r for r in reasons):
            break
        time.sleep(0.5)
    assert any(f"interrupted: coordinator {pid} exited" in r for r in reasons), reasons
    assert not any("Ctrl-C" in r for r in reasons), reasons
    try:  # the workers are gone (their process group was the coordinator's session)
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_sigterm_is_recorded_as_terminated(files, tmp_path):
    study = _study(tmp_path, data=files / "data", checkpoint=files / "ok.safetensors", trials=4, steps=400)
    d = tmp_path / "out" / "real"
    proc = _start_and_wait([sys.executable, "-m", "tpsexplore.cli", "search", "--study", str(study), "--out",
                            str(tmp_path / "out"), "--quiet"], d)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    reasons = _journal_reasons(d)
    assert any("interrupted: terminated (SIGTERM)" in r for r in reasons), reasons


# ============================================================================= 4. one line instead of a traceback
@pytest.mark.parametrize("section, needle", [
    ('[model]\ndepth = "four"\n', "model.depth: 'four' is not an integer"),
    ('[train]\nlr = "fast"\n', "train.lr: 'fast' is not a finite number"),
])
def test_study_file_value_of_the_wrong_type(files, tmp_path, section, needle):
    text = STUDY.format(trials=1, steps=1, workers=1, data=files / "data", checkpoint=files / "ok.safetensors",
                        train="")
    key = section.split("\n")[1].split(" =")[0]
    table = section.split("\n")[0]
    lines = text.splitlines()
    at = lines.index(table)
    lines = [ln for i, ln in enumerate(lines) if not (i > at and ln.startswith(f"{key} ="))]
    lines.insert(at + 1, section.split("\n")[1])
    study = tmp_path / "s.toml"
    study.write_text("\n".join(lines) + "\n")
    _one_line(_cli("search", "--study", study, "--out", tmp_path / "out"), 2, needle)
    assert not (tmp_path / "out").exists()


def _read_only_dir(tmp_path: Path) -> Path:
    """A directory writes fail in, for root too (a read-only tmpfs), else by permission bits."""
    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() == 0:
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(d)], capture_output=True)
        if res.returncode != 0:
            pytest.skip(f"cannot mount a read-only tmpfs: {res.stderr!r}")
    else:
        d.chmod(0o555)
    return d


def _unmount(d: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["umount", str(d)], capture_output=True)
    else:
        d.chmod(0o755)


@pytest.mark.parametrize("target", ["report-ro", "export-ro", "export-proc", "export-dir-with-weights"])
def test_report_and_export_check_the_target_before_writing(real_study, tmp_path, target):
    assert real_study["res"].returncode == 0, real_study["res"].stderr[-2000:]
    d = real_study["dir"]
    before = _tree(d)
    ro = _read_only_dir(tmp_path) if target.endswith("-ro") else None
    try:
        if target == "report-ro":
            _one_line(_cli("report", d, "-o", ro / "rep", "--no-keep-maps", "--quiet"), 2, str(ro / "rep"),
                      "cannot be written")
        elif target == "export-ro":
            _one_line(_cli("export", d, "-o", ro / "c.json"), 2, str(ro / "c.json"), "cannot be written")
        elif target == "export-proc":
            _one_line(_cli("export", d, "-o", "/proc/x.json"), 2, "/proc/x.json", "cannot be written")
        else:
            w = tmp_path / "w.safetensors"
            (tmp_path / "cfgdir").mkdir()
            _one_line(_cli("export", d, "-o", tmp_path / "cfgdir", "--weights", w), 2, "is a directory")
            assert not w.exists()  # checked first, nothing copied
            assert list((tmp_path / "cfgdir").iterdir()) == []
    finally:
        if ro is not None:
            _unmount(ro)
    assert _tree(d) == before


def _completed_trials(db: Path) -> int:
    """Completed trials mirrored into a results database that a search is writing (read-only, WAL)."""
    import sqlite3

    if not db.exists():
        return 0
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as con:
            return con.execute("SELECT COUNT(*) FROM tpsx_trials WHERE state = 'complete'").fetchone()[0]
    except sqlite3.Error:
        return 0  # not created yet


def test_full_disk_during_a_search_is_one_line_and_keeps_completed_trials(files, tmp_path):
    """The disk fills once a trial has completed (a filler file takes the rest of a small tmpfs), so the
    search meets a full disk mid-study whatever the machine's speed."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"mount not permitted: {res.stderr!r}")
    try:
        study = _study(tmp_path, data=files / "data", checkpoint=files / "ok.safetensors", trials=40, steps=1)
        proc = subprocess.Popen([sys.executable, "-m", "tpsexplore.cli", "search", "--study", str(study), "--out",
                                 str(disk), "--quiet"], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        t_end = time.time() + 180
        while _completed_trials(disk / "real" / "results.db") < 1:
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.time() < t_end, "no trial completed"
            time.sleep(0.1)
        with open(disk / "filler", "wb") as f:  # take every free byte
            try:
                while True:
                    f.write(b"\0" * (1 << 20))
                    f.flush()
            except OSError:
                pass
        _, stderr = proc.communicate(timeout=180)
        assert proc.returncode == 2 and "Traceback" not in stderr, stderr[-2000:]
        errors = [ln for ln in stderr.splitlines() if "error" in ln.lower()]  # the search ran: progress lines
        assert len(errors) == 1 and errors[0] == stderr.strip().splitlines()[-1], stderr
        assert errors[0].startswith("tpsexplore search: error: disk: No space left on device")
        assert str(disk / "real") in errors[0]
        from tpsexplore.storage import ResultsStore

        (disk / "filler").unlink()  # room for SQLite to open the database again
        with ResultsStore(disk / "real" / "results.db") as store:  # readable, with what was completed
            frame = store.trials_frame("real")
        assert (frame["state"] == "complete").sum() >= 1, frame[["number", "state", "reason"]]
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_malformed_json_config_for_apply_names_file_and_position(tmp_path):
    model = create_backbone("deit_t", weights="random", **TINY)
    bad = tmp_path / "cfg.json"
    bad.write_text('{"method": "tome",\n "r": }\n')
    with pytest.raises(ValueError) as e:
        apply(model, bad)
    msg = str(e.value)
    assert msg.startswith("config: ") and str(bad) in msg and "line 2 column 7" in msg and "\n" not in msg
    with pytest.raises(ValueError, match=r"^config: .* not valid JSON"):
        ReductionConfig.from_json(bad)
    with pytest.raises(ValueError, match=r"^config: .* holds a JSON list"):
        apply(model, str(_write(tmp_path / "list.json", "[1, 2]")))


def _write(p: Path, text: str) -> Path:
    p.write_text(text)
    return p


# ============================================================================= 5. no silent acceptance
@pytest.mark.parametrize("kwargs, needle", [
    (dict(method="tome", r=1000), "r: 1000 is more than a block can merge; at most 8 for 16 patch tokens"),
    (dict(method="tome", r=9), "at most 8"),
    (dict(method="tome", r=40, r_inflection=0.5), "at most 16 with r_inflection 0.5"),
    (dict(method="tome", r_schedule=(1, 9)), "r_schedule: 9 at block 1"),
])
def test_tome_r_beyond_the_geometry_is_refused(kwargs, needle):
    model = create_backbone("deit_t", weights="random", **TINY)  # 16 patch tokens
    with pytest.raises(ValueError, match=r"^r(_schedule)?: ") as e:
        apply(model, ReductionConfig(**kwargs))
    assert needle in str(e.value) and "\n" not in str(e.value)
    apply(model, ReductionConfig("tome", r=8))  # the maximum itself is accepted
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        model(x)


@pytest.mark.parametrize("field, value", [("diversity", math.nan), ("diversity", math.inf),
                                          ("temperature", math.inf), ("r_inflection", math.nan),
                                          ("keep_ratios", (math.nan,))])
def test_non_finite_floats_are_refused(field, value):
    kw = dict(method="similarity", locations=(0,), keep_ratios=(0.5,))
    if field == "r_inflection":
        kw = dict(method="tome", r=2)
    with pytest.raises(ValueError, match=f"^{field}: "):
        ReductionConfig(**{**kw, field: value})


# ============================================================================= 6. data that cannot work
def test_validation_classes_never_in_training_are_warned(tmp_path):
    from tpsexplore.measure.data import DataSpec, build_datasets

    _images(tmp_path, 6, seed=5)  # 6 images, 6 classes: whichever go to validation never appear in training
    (tmp_path / "labels.csv").write_text("filename,synset,class_index\n" +
                                         "".join(f"{i}.png,n{i:08d},{i}\n" for i in range(6)))
    model = create_backbone("deit_t", weights="random", **{**TINY, "num_classes": 6})
    _, val, info = build_datasets(DataSpec(path=str(tmp_path), val_fraction=0.34), model)
    assert len(info["warnings"]) == 1
    w = info["warnings"][0]
    assert w.startswith(f"data: {len(val)} of {len(val)} validation classes") and "never appear in training" in w


def test_chance_level_baseline_is_warned_and_recorded(real_study):
    res = real_study["res"]
    assert res.returncode == 0, res.stderr[-2000:]
    warned = [ln for ln in res.stderr.splitlines() if "not above chance" in ln]
    assert len(warned) == 1 and warned[0].startswith("[search] WARNING: accuracy: the unreduced baseline scores")
    import optuna

    from tpsexplore.search.backend import SearchJournalBackend

    storage = optuna.storages.JournalStorage(SearchJournalBackend(str(real_study["dir"] / "optuna.journal")))
    attrs = optuna.load_study(study_name="real", storage=storage).user_attrs
    assert any("not above chance" in w for w in attrs["tpsx_warnings"])


def test_report_does_not_draw_published_points_beside_a_chance_baseline():
    import pandas as pd

    from tpsexplore.measure.data import chance_warning
    from tpsexplore.report.published import baseline_at_chance

    zero = pd.Series({"accuracy": 0.0, "accuracy_lo": 0.0})
    why = baseline_at_chance(zero, {"num_classes": 1000})
    assert why and "0.0% top-1" in why and "not drawn" in why
    assert baseline_at_chance(pd.Series({"accuracy": 0.72, "accuracy_lo": 0.70}), {"num_classes": 1000}) is None
    assert chance_warning(0, 50, 1000) is not None and chance_warning(40, 50, 10) is None
