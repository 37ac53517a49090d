"""Backbones (short names, checkpoints, offline errors) and the CLI's one-line errors with exit code 2."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from tpsexplore import WeightsUnavailableError, create_backbone
from tpsexplore.backbones import SHORT_NAMES, resolve_name
from tpsexplore.cli import main

TINY = dict(img_size=32, patch_size=16, num_classes=10)


def test_short_names_resolve_to_the_papers_models():
    assert resolve_name("deit_t") == "deit_tiny_patch16_224"
    assert resolve_name("vit_b16") == "vit_base_patch16_224"
    assert resolve_name("deit3_small_patch16_224") == "deit3_small_patch16_224"
    assert set(SHORT_NAMES) == {"deit_t", "deit_s", "deit_b", "vit_b16"}
    with pytest.raises(ValueError, match=r"^backbone: unknown backbone 'deit_xl'; allowed: deit_t, deit_s"):
        resolve_name("deit_xl")


def test_overrides_reach_timm():
    m = create_backbone("deit_s", weights="random", img_size=48, patch_size=8, num_classes=7)
    assert m.patch_embed.num_patches == 36 and m.head.out_features == 7 and m.embed_dim == 384


def test_non_vit_backbone_is_rejected():
    with pytest.raises(ValueError, match=r"^backbone: 'resnet18' builds a ResNet, not a timm VisionTransformer"):
        create_backbone("resnet18", weights="random")


@pytest.mark.parametrize("fmt", ["pth_model_key", "pth_plain", "safetensors"])
def test_checkpoint_formats_load_strictly(tmp_path, fmt):
    torch.manual_seed(0)
    src = create_backbone("deit_t", weights="random", **TINY)
    state = src.state_dict()
    if fmt == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        path = tmp_path / "w.pth"
        torch.save({"model": state, "epoch": 3} if fmt == "pth_model_key" else state, path)
    loaded = create_backbone("deit_t", checkpoint=path, **TINY)
    for k, v in state.items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_checkpoint_that_does_not_fit_lists_the_keys(tmp_path):
    src = create_backbone("deit_t", weights="random", **TINY).state_dict()
    src.pop("head.bias")
    src["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(src, path)
    with pytest.raises(ValueError) as err:
        create_backbone("deit_t", checkpoint=path, img_size=32, patch_size=16, num_classes=5)
    msg = str(err.value)
    assert msg.startswith("checkpoint: ") and "does not fit" in msg and "\n" not in msg
    assert "missing [head.bias]" in msg and "unexpected [extra.weight]" in msg and "head.weight (10, 192) vs (5, 192)" in msg


def test_missing_or_garbage_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^checkpoint: '.*nope.pth' does not exist"):
        create_backbone("deit_t", checkpoint=tmp_path / "nope.pth", **TINY)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"^checkpoint: '.*junk.pth' is not a readable"):
        create_backbone("deit_t", checkpoint=junk, **TINY)


def test_offline_without_weights_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", "/nonexistent-tpsexplore-cache")
    with pytest.raises(WeightsUnavailableError, match=r"^backbone: no pretrained weights for 'deit_t'.*checkpoint=PATH.*"
                                                      r"weights='random'"):
        create_backbone("deit_t")


# ----------------------------------------------------------------------------- CLI errors: exit 2, one line
@pytest.mark.parametrize("argv,needle", [
    (["profile", "--backbone", "deit_xl", "--method", "etps", "--locations", "3", "--keep", "0.7"],
     "backbone: unknown backbone 'deit_xl'"),
    (["profile", "--backbone", "deit_t", "--method", "fancy", "--locations", "3", "--keep", "0.7"],
     "method: unknown method 'fancy'"),
    (["profile", "--backbone", "deit_t", "--method", "etps", "--locations", "3", "--keep", "1.5"],
     "--keep: 1.5 is outside (0, 1]"),  # the CLI names its flag, not the field (keep_ratios)
    (["profile", "--backbone", "deit_t", "--method", "etps", "--locations", "6,3", "--keep", "0.7"],
     "locations: [6, 3] must be strictly increasing"),
    (["profile", "--backbone", "deit_t", "--method", "etps", "--locations", "3", "--keep", "0.7",
      "--data", "/nonexistent/data"], "data: '/nonexistent/data' does not exist"),
])
def test_cli_bad_input_exits_2_with_one_line(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err


def test_cli_out_of_range_location_exits_2_before_any_work(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("TPSEXPLORE_CACHE", str(tmp_path))  # an empty cache: a late check would train first
    assert main(["profile", "--backbone", "deit_t", "--method", "etps", "--locations", "3,12", "--keep", "0.7"]) == 2
    err = capsys.readouterr().err.strip()
    assert "locations: [3, 12] out of range; allowed 0..11" in err and len(err.splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_methods_command_lists_every_method(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ("dtps", "etps", "dynamicvit", "evit", "topk", "tome", "similarity", "rollout", "random"):
        assert f"\n{name} " in "\n" + out


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("methods", "profile", "search", "report", "export"):
        assert cmd in out


def test_deployment_json_is_written_atomically_by_config(tmp_path):
    from tpsexplore.reduce import ReductionConfig

    cfg = ReductionConfig("tome", r=4)
    cfg.to_json(tmp_path / "c.json")
    assert json.loads((tmp_path / "c.json").read_text())["r"] == 4
