"""A few evaluation images of a study's data (the proxy digits or real images), for the keep maps."""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import torch


def study_images(data_info: Any, model: torch.nn.Module, n: int = 3) -> tuple[torch.Tensor | None, str]:
    """(images (n, C, H, W) normalised for ``model``, description) or (None, why not).

    Images come from the held-out split the study evaluated on (`tpsexplore.measure.data.build_datasets`
    with the study's recorded data spec), one per class where possible.
    """
    try:
        from ..measure.data import DataSpec, build_datasets
    except ImportError as e:  # pragma: no cover - measure.data is part of the package
        return None, f"the data module is unavailable ({e})"
    if not isinstance(data_info, dict):
        return None, f"the study does not describe its data ({data_info!r})"
    spec_dict = data_info.get("data_spec")
    if not isinstance(spec_dict, dict):
        if data_info.get("source") is None and data_info.get("path") is None:
            return None, f"the study's data ({data_info.get('kind') or data_info}) has no images to show"
        spec_dict = {"path": data_info.get("path"), "seed": data_info.get("seed", 0)}
    known = {f.name for f in fields(DataSpec)}
    spec_args = {k: v for k, v in spec_dict.items() if k in known}
    spec_args["train_augment"] = False
    if spec_args.get("path") and not Path(spec_args["path"]).exists():
        return None, f"the study's data folder {spec_args['path']!r} is not available here"
    try:
        spec = DataSpec(**spec_args)
        _, val, _ = build_datasets(spec, model)
    except (ValueError, FileNotFoundError, OSError, ImportError) as e:
        return None, f"the study's images could not be loaded ({' '.join(str(e).split())})"
    if len(val) == 0:
        return None, "the study's validation split is empty"
    picked: list[int] = []
    seen: set[int] = set()
    for i in range(min(len(val), 200)):
        _, label = val[i]
        if int(label) not in seen:
            seen.add(int(label))
            picked.append(i)
        if len(picked) == n:
            break
    for i in range(len(val)):
        if len(picked) >= n:
            break
        if i not in picked:
            picked.append(i)
    images = torch.stack([val[i][0] for i in picked])
    source = data_info.get("source") or ("proxy" if spec.is_proxy else "images")
    return images, f"{len(picked)} held-out {source} image(s)"
