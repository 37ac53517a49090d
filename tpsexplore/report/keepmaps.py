"""Token-keep maps (TPS Figure 7 style): which patches each reduction stage keeps, squeezes, merges or drops.

The maps come from the core's source tracking (`tpsexplore.reduce.track_sources` and
``last_info(model).stage_sources``): after each stage, row t of the source map lists the input patches that
token t holds. A patch held by no token was dropped; a patch alone in its token was kept; a patch sharing a
token was squeezed into a host (TPS), fused (EViT) or merged (ToMe). Which patch of a squeezed group is the
host (the kept token itself) is read from ``last_info(model).token_ids`` of the same model with the config cut
after that stage: selection at a stage depends only on the blocks before it, so the cut model keeps exactly
the same tokens there.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import seaborn as sns
import torch
from matplotlib.patches import Patch, Rectangle

from ..reduce import ReductionConfig, apply, last_info, track_sources
from .plots import new_figure

KEPT, HOST, SHARED, DROPPED = 0, 1, 2, 3
STATUS_NAMES = {KEPT: "kept", HOST: "host", SHARED: "squeezed", DROPPED: "dropped"}


@dataclass
class StageMap:
    """One stage of one image: per patch (grid_h, grid_w) a status code and the id of the token holding it."""

    block: int
    status: np.ndarray  # KEPT / HOST / SHARED / DROPPED
    holder: np.ndarray  # row of the token holding the patch after the stage, -1 when dropped
    treatment: str

    def counts(self) -> dict[str, int]:
        shared = {"squeeze": "squeezed", "fuse": "fused", "merge": "merged",
                  "mlerp": "merged"}.get(self.treatment, "squeezed")
        names = {KEPT: "kept", HOST: "kept", SHARED: shared, DROPPED: "dropped"}
        out: dict[str, int] = {}
        for code, name in names.items():
            out[name] = out.get(name, 0) + int((self.status == code).sum())
        return out


@dataclass
class KeepMaps:
    """Keep maps of one config on a batch of images: ``stages[i]`` is the list of StageMaps of image i."""

    config: ReductionConfig
    images: np.ndarray  # (B, H, W, 3) floats in [0, 1] for display
    grid: tuple[int, int]
    stages: list[list[StageMap]] = field(default_factory=list)
    title: str = ""


def _display_images(x: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) normalised input -> (B, H, W, 3) in [0, 1], min-max per image (any normalisation)."""
    img = x.detach().float().cpu()
    lo = img.amin(dim=(1, 2, 3), keepdim=True)
    hi = img.amax(dim=(1, 2, 3), keepdim=True)
    img = (img - lo) / (hi - lo).clamp_min(1e-6)
    if img.shape[1] == 1:
        img = img.expand(-1, 3, -1, -1)
    return img[:, :3].permute(0, 2, 3, 1).numpy()


def _truncated(config: ReductionConfig, k: int) -> ReductionConfig:
    """``config`` reducing only at its first k+1 locations."""
    locs = config.locations[: k + 1]
    keeps = config.keep_ratios if len(config.keep_ratios) == 1 else config.keep_ratios[: k + 1]
    return config.with_(locations=locs, keep_ratios=keeps)


@torch.no_grad()
def compute_keep_maps(model: torch.nn.Module, config: ReductionConfig | dict | str, images: torch.Tensor,
                      state_dict: dict[str, torch.Tensor] | None = None, title: str = "") -> KeepMaps:
    """Run ``images`` (B, C, H, W) through ``model`` reduced by ``config`` and read each stage's keep map.

    ``model`` is a timm VisionTransformer (patched or not; it is left patched with ``config``).
    ``state_dict`` restores learned parts (predictors) after the model is re-patched for the host look-up;
    by default the model's own state is used.
    """
    model.eval()
    # the state before re-patching: a patched model's learned predictors are dropped by apply()
    state = {k: v.clone() for k, v in model.state_dict().items()} if state_dict is None else state_dict
    apply(model, config)
    config = model.tps_config
    model.load_state_dict(state, strict=False)
    state = {k: v.clone() for k, v in model.state_dict().items()}  # now with this config's learned parts
    with track_sources(model):
        model(images)
    info = last_info(model)
    p = model.num_prefix_tokens
    gh, gw = model.patch_embed.grid_size
    treatment = config.effective_treatment or "drop"
    blocks = sorted(info.stage_sources)
    sources = {b: info.stage_sources[b].detach().cpu() for b in blocks}
    hosts: dict[int, torch.Tensor] = {}
    if treatment == "squeeze" and config.spec is not None and not config.spec.merges:
        # the host of each squeezed group: token ids of the model cut after that stage
        stage_index = {loc: j for j, loc in enumerate(config.locations)}
        for b in blocks:
            apply(model, _truncated(config, stage_index[b]))
            model.load_state_dict(state, strict=False)
            model(images)
            hosts[b] = last_info(model).token_ids.detach().cpu()
        apply(model, config)
        model.load_state_dict(state, strict=False)
    out = KeepMaps(config=config, images=_display_images(images), grid=(gh, gw), title=title)
    for i in range(images.shape[0]):
        maps = []
        for b in blocks:
            src = sources[b][i] > 0.5  # (N, N0)
            patches = src[:, p:]  # tokens x patches
            held_by = torch.where(patches.any(dim=0), patches.float().argmax(dim=0),
                                  torch.full((patches.shape[1],), -1))
            size = patches.sum(dim=1)  # patches per token
            status = torch.full((patches.shape[1],), DROPPED, dtype=torch.long)
            alive = held_by >= 0
            alone = alive & (size[held_by.clamp_min(0)] == 1)
            status[alone] = KEPT
            status[alive & ~alone] = SHARED
            if b in hosts:
                ids = hosts[b][i]
                own = ids[ids >= p] - p
                is_host = torch.zeros_like(alive)
                is_host[own] = True
                status[alive & ~alone & is_host] = HOST
            maps.append(StageMap(b, status.view(gh, gw).numpy(), held_by.view(gh, gw).numpy(), treatment))
        out.stages.append(maps)
    return out


def _pick_stages(n: int, limit: int) -> list[int]:
    """At most ``limit`` stage indices spread over n, always the first and the last."""
    if n <= limit:
        return list(range(n))
    return sorted({int(round(v)) for v in np.linspace(0, n - 1, limit)})


def plot_keep_maps(maps: Sequence[KeepMaps], max_stages: int = 6, panel: float = 1.9,
                   title: str | None = None) -> Any:
    """One row per (config, image): the input, then each stage's map.

    Dropped patches are dark, patches squeezed/fused/merged into another token are tinted with that token's
    colour, and hosts (kept tokens that absorbed others) are outlined in the same colour; kept patches are
    shown as they are.
    """
    rows = [(m, i) for m in maps for i in range(len(m.stages))]
    cols = 1 + max((len(_pick_stages(len(m.stages[0]), max_stages)) for m in maps if m.stages), default=0)
    fig = new_figure(max(6.5, panel * cols + 0.6), panel * max(1, len(rows)) + 1.0)
    colors = sns.color_palette("tab20", 20)
    with sns.axes_style("white"):
        axes = fig.subplots(max(1, len(rows)), max(1, cols), squeeze=False)
        for ax in axes.flat:
            ax.set_xticks([])
            ax.set_yticks([])
            ax.axis("off")
        for r, (m, i) in enumerate(rows):
            img = m.images[i]
            h, w = img.shape[:2]
            gh, gw = m.grid
            ph, pw = h / gh, w / gw
            ax = axes[r, 0]
            ax.axis("on")
            ax.imshow(img, interpolation="nearest")
            ax.set_ylabel(f"{m.title}\nimage {i}" if m.title else f"image {i}", fontsize=7)
            if r == 0:
                ax.set_title("input", fontsize=8)
            picked = _pick_stages(len(m.stages[i]), max_stages)
            for c, s in enumerate(picked, start=1):
                st = m.stages[i][s]
                ax = axes[r, c]
                ax.axis("on")
                ax.imshow(img, interpolation="nearest")
                overlay = np.zeros((gh, gw, 4))
                for y in range(gh):
                    for x in range(gw):
                        code = st.status[y, x]
                        if code == DROPPED:
                            overlay[y, x] = (0.08, 0.08, 0.08, 0.88)
                        elif code == SHARED:
                            overlay[y, x] = (*colors[st.holder[y, x] % len(colors)], 0.62)
                ax.imshow(overlay, extent=(-0.5, w - 0.5, h - 0.5, -0.5), interpolation="nearest")
                for y, x in zip(*np.nonzero(st.status == HOST)):
                    ax.add_patch(Rectangle((x * pw - 0.5, y * ph - 0.5), pw, ph, fill=False, lw=1.3,
                                           edgecolor=colors[st.holder[y, x] % len(colors)]))
                ax.set_xlim(-0.5, w - 0.5)
                ax.set_ylim(h - 0.5, -0.5)
                counts = st.counts()
                ax.set_title(f"block {st.block}\n" + ", ".join(f"{v} {k}" for k, v in counts.items() if v),
                             fontsize=6.5)
        if title:
            fig.suptitle(title, fontsize=9)
        legend = [Patch(facecolor="white", edgecolor="grey", label="kept"),
                  Patch(facecolor=(*colors[0], 0.62), edgecolor="none",
                        label="squeezed / fused / merged (colour = its token)"),
                  Patch(facecolor="none", edgecolor=colors[0], lw=1.3, label="host of squeezed patches"),
                  Patch(facecolor=(0.08, 0.08, 0.08, 0.88), edgecolor="none", label="dropped")]
        fig.legend(handles=legend, loc="outside upper center", ncols=2, fontsize=7, frameon=False)
    return fig
