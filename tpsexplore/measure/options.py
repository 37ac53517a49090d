"""Command-line options shared by `tpsexplore profile` and `tpsexplore search`: the data and the starting weights.

Defined once here so the two commands spell, default and check them the same way. Standard library only: the
parser is built without importing torch.
"""
from __future__ import annotations

import argparse
from pathlib import Path

#: ``--weights`` with real data: timm hub weights or random init (``--checkpoint PATH`` gives a local file).
WEIGHTS = ("pretrained", "random")


def add_data_weights_arguments(parser: argparse.ArgumentParser) -> None:
    """``--data``, ``--labels``, ``--weights``, ``--checkpoint`` (all default None: the offline proxy task)."""
    g = parser.add_argument_group(
        "data and weights", "default: the offline proxy task (cluttered digits) with a backbone pre-trained on it "
        "once and cached")
    g.add_argument("--data", metavar="PATH", help="real images: an ImageFolder root (train/ and val/ class "
                   "folders), or a flat folder of images with a labels file")
    g.add_argument("--labels", metavar="FILE", help="labels file of a flat image folder (columns filename,synset,"
                   "class_index; default DATA/labels.csv); needs --data")
    g.add_argument("--weights", choices=WEIGHTS, help="starting weights with --data: timm hub weights (pretrained, "
                   "the default) or random init")
    g.add_argument("--checkpoint", metavar="PATH", help="starting weights from a local file (.pth/.pt/.safetensors, "
                   "loaded strictly) instead; needs --data")


def check_data_weights(data: str | None, labels: str | None, weights: str | None, checkpoint: str | None) -> str:
    """Check the combination before any work and return the weights source for `create_backbone`
    ('pretrained', 'random' or 'checkpoint'). One-line ``ValueError`` / ``FileNotFoundError`` naming the field."""
    if data is None:
        for name, value in (("labels", labels), ("checkpoint", checkpoint), ("weights", weights)):
            if value is not None:
                raise ValueError(f"{name}: {value!r} needs --data (real images); without it the offline proxy task "
                                 "uses its own proxy-pretrained weights")
        return "pretrained"
    if weights is not None and weights not in WEIGHTS:
        raise ValueError(f"weights: {weights!r}; allowed: {', '.join(WEIGHTS)} (a local file: --checkpoint PATH)")
    if weights == "random" and checkpoint is not None:
        raise ValueError(f"weights: 'random' contradicts --checkpoint {checkpoint!r}; give one of them")
    for name, value in (("data", data), ("labels", labels), ("checkpoint", checkpoint)):
        if value is not None and not Path(value).exists():
            raise FileNotFoundError(f"{name}: {str(value)!r} does not exist")
    return "checkpoint" if checkpoint is not None else (weights or "pretrained")
