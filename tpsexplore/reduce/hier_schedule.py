"""Token counts of a reduction on a hierarchical backbone (PVT v1 and v2, CvT), in plain Python (no model, no
tensors).

Where tokens are reduced (issue 13, methods-spec 13.2), and the rule that gives every block's counts:

* ``locations`` are **global** 0-based block indices, counting the blocks of all stages in order (PVT-S: stage 0 is
  blocks 0-2, stage 1 3-6, stage 2 7-12, stage 3 13-15). Each location belongs to one model stage; a reduction
  never crosses a stage boundary. At the start of every stage all of its tokens are live again (a fresh grid from
  the stage's patch embedding).
* Within a stage, the ViT rule of `schedule.token_schedule` applies to that stage's own tokens, locations and
  keep ratios: ``cumulative`` (DynamicViT, dTPS) keeps int(M_s * prod of the stage's ratios so far), ``ceil``
  (EViT, eTPS, Top-K, random) ceil(kappa * live), ToMe r per block. M_s is the stage's grid cells (3136 / 784 / 196
  / 49 for PVT at 224; 3136 / 784 / 196 for CvT); the class token (PVT's last stage, CvT's last stage) is never
  reduced.
* Two forms, by what the stage's token mixer needs:

  - **physical** (PVT v1's last stage: ratio r = 1, global attention, a class token, no grid after it): pruned
    tokens are removed, exactly the ViT recipe. Every supported method runs here.
  - **keep-the-grid** (every other stage, and every stage of PVT v2: PVT's spatial-reduction conv, CvT's depthwise
    conv projections, PVT v2's depthwise conv inside the MLP, and the next stage's patch embedding need the full
    H x W grid): the live tokens run q, the attention rows, proj and
    the MLP; pruned slots keep the value they had when pruned (frozen), and the dense grid (live values
    scattered back over the frozen ones) feeds norm1, the SR / conv K-V branch and the stage exit. Only query-side
    work shrinks. Policies whose scores need a key per token (class attention) or that add tokens without a slot
    (EViT's fused token, ToMe's merges) cannot run here: the learned predictor (DynamicViT, dTPS) and random
    pruning can, with drop or squeeze. PVT v2's MLP runs fc1 and fc2 on the live tokens only, its depthwise conv
    densely over a hidden grid whose pruned slots are zero (`patch_hier`'s docstring). PVT v2 has no class token, so
    M_s is the whole grid (3136 / 784 / 196 / 49 at 224).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .config import OPTIONAL_DEFAULTS, ReductionConfig
from .schedule import Stage, TokenSchedule, check_merge_r, token_schedule

#: hierarchical families token reduction supports, and the methods it runs on them
HIER_FAMILIES = ("pvt_v1", "cvt", "pvt_v2")
HIER_METHODS = ("dtps", "dynamicvit", "etps", "evit", "topk", "tome", "random")
#: policies and treatments the keep-the-grid form can run (a score per live token, no token without a slot)
GRID_POLICIES = ("predictor", "random")
GRID_TREATMENTS = ("drop", "squeeze")
_FAMILY_TITLES = {"pvt_v1": "PVT v1", "cvt": "CvT", "swin": "Swin", "pvt_v2": "PVT v2"}


@dataclass(frozen=True)
class HierStageTokens:
    """One model stage as token reduction sees it: grid cells, class tokens, blocks, and the form it reduces in."""

    num_spatial: int
    num_prefix: int
    depth: int
    first_block: int
    physical: bool

    @property
    def blocks(self) -> range:
        """Global indices of the stage's blocks."""
        return range(self.first_block, self.first_block + self.depth)


def is_physical(family: str, sr_ratio: int, num_prefix: int) -> bool:
    """True for a stage whose tokens can be removed: PVT v1's global-attention stage with its class token (the
    last one). CvT's conv projections and PVT's SR conv need the grid, so every other stage keeps it."""
    return family == "pvt_v1" and sr_ratio == 1 and num_prefix > 0


class StagedBlocks:
    """What the hierarchical schedules (`HierSchedule`, `swin_schedule.SwinSchedule`) share: ``stages`` (each with
    its global ``blocks``) and ``blocks``, (query tokens, MLP tokens) per global block."""

    def stage_of(self, block: int) -> int:
        """The stage holding global block ``block``; one-line ValueError outside the model."""
        for i, st in enumerate(self.stages):
            if block in st.blocks:
                return i
        raise ValueError(f"locations: block {block} is outside 0..{sum(s.depth for s in self.stages) - 1}")

    def counts(self) -> list[tuple[int, int]]:
        """(query tokens, MLP tokens) per global block, as `ReductionInfo.token_counts` reads them."""
        return list(self.blocks)


@dataclass(frozen=True)
class HierSchedule(StagedBlocks):
    """Per global block (query tokens, MLP tokens), the reduction steps (``Stage.block`` global), and per model
    stage the `TokenSchedule` of its own tokens (``None`` where nothing is reduced)."""

    family: str
    stages: tuple[HierStageTokens, ...]
    blocks: tuple[tuple[int, int], ...]
    reductions: tuple[Stage, ...]
    per_stage: tuple[TokenSchedule | None, ...]
    targets: tuple[float, ...] = ()  # cumulative keep target of each reduction (ratio loss), in stage order

    @property
    def final_tokens(self) -> int:
        """Tokens leaving the last block (physical stage: after its removals; grid form: every slot)."""
        last = self.stages[-1]
        return self.blocks[-1][1] if last.physical else last.num_spatial + last.num_prefix


def check_hier_config(config: ReductionConfig, stages: tuple[HierStageTokens, ...], family: str) -> None:
    """Refuse (one-line ValueError) what the hierarchical forms cannot run; see the module docstring."""
    depth = sum(s.depth for s in stages)
    if family not in HIER_FAMILIES:
        title = _FAMILY_TITLES.get(family, family)
        raise ValueError(f"model: token reduction on hierarchical backbones supports PVT v1 (pvt_t, pvt_s), PVT v2 "
                         f"(pvt_v2_b0..b5) and CvT (cvt_13, cvt_21); {title} is not supported yet")
    config.validate(depth)
    spec = config.spec
    if spec is None:
        return
    if config.method not in HIER_METHODS:
        raise ValueError(f"method: {config.method!r} is not supported on hierarchical backbones; allowed: "
                         f"{', '.join(HIER_METHODS)}")
    for name in ("squeeze_feature", "squeeze_similarity"):
        if getattr(config, name) != OPTIONAL_DEFAULTS[name]:
            raise ValueError(f"{name}: {getattr(config, name)!r} is not supported on hierarchical backbones (no "
                             f"ViT position table or attention map over the tokens); allowed: "
                             f"{OPTIONAL_DEFAULTS[name]!r}")
    physical = [s for s in stages if s.physical]
    where = (f"blocks {physical[0].first_block}..{physical[-1].blocks[-1]}" if physical else "no stage of "
             f"{_FAMILY_TITLES[family]}")
    treatment = config.effective_treatment
    if spec.policy == "merge":
        if config.r_schedule:
            raise ValueError("r_schedule: not supported on hierarchical backbones; give r (and r_inflection)")
        if not physical:
            raise ValueError(f"method: 'tome' merges tokens without a grid slot, which {_FAMILY_TITLES[family]} "
                             f"cannot (every stage keeps its grid); allowed: {', '.join(_grid_methods())}")
        bad = [b for b in config.locations if not any(b in s.blocks for s in physical)]
        if bad:
            raise ValueError(f"locations: {bad} lie in stages that keep the token grid; ToMe merges only in the "
                             f"physical stage ({where})")
        return
    for b in config.locations:
        st = next((s for s in stages if b in s.blocks), None)
        if st is None or st.physical:
            continue
        if spec.policy not in GRID_POLICIES or treatment not in GRID_TREATMENTS:
            why = ("scores by class attention, which needs a key per token" if spec.policy == "cls_attn"
                   else f"treats pruned tokens by {treatment!r}")
            raise ValueError(f"locations: block {b} lies in a stage that keeps the token grid, where "
                             f"{config.label!r} cannot run (it {why}); allowed there: "
                             f"{', '.join(_grid_methods())}; {config.method} runs in {where}")


def _grid_methods() -> list[str]:
    from .methods import METHODS

    return [m for m in HIER_METHODS if METHODS[m].policy in GRID_POLICIES]


def hier_token_schedule(config: ReductionConfig, stages: tuple[HierStageTokens, ...],
                        family: str) -> HierSchedule:
    """Per-block token counts of ``config`` on a hierarchical backbone with ``stages`` (validates the config)."""
    check_hier_config(config, stages, family)
    spec = config.spec
    ratios = dict(zip(config.locations, config.stage_keep_ratios)) if spec is not None and spec.policy != "merge" \
        else {}
    blocks: list[tuple[int, int]] = []
    reductions: list[Stage] = []
    per_stage: list[TokenSchedule | None] = []
    targets: list[float] = []
    for st in stages:
        n = st.num_spatial + st.num_prefix
        local = [b - st.first_block for b in config.locations if b in st.blocks]
        sub = None
        if spec is not None and spec.policy == "merge" and st.physical and (local or not config.locations):
            sub = config.with_(locations=tuple(local))
        elif spec is not None and spec.policy != "merge" and local:
            sub = config.with_(locations=tuple(local),
                               keep_ratios=tuple(ratios[b + st.first_block] for b in local))
        if sub is None:
            blocks.extend([(n, n)] * st.depth)
            per_stage.append(None)
            continue
        sched = token_schedule(sub, num_patches=st.num_spatial, num_prefix=st.num_prefix, depth=st.depth)
        blocks.extend(sched.blocks)
        per_stage.append(sched)
        kept = dict(zip(sub.locations, sub.stage_keep_ratios)) if spec.policy != "merge" else {}
        for r in sched.stages:
            reductions.append(Stage(r.block + st.first_block, r.before, r.kept, r.removed, r.after))
            # the ratio loss's target: the stage's cumulative keep ratio up to this location (DynamicViT's rho^s)
            targets.append(math.prod(k for b, k in kept.items() if b <= r.block) if kept else 1.0)
    return HierSchedule(family, tuple(stages), tuple(blocks), tuple(reductions), tuple(per_stage), tuple(targets))


#: TPS Table 2's GFLOPs (baseline, dTPS), in the project's convention (fvcore MACs with the normalisation layers,
#: `tpsexplore.measure.hier_flops.hier_analytic_macs(norms=True)`, which prints the paper's baselines exactly)
TABLE2_GMACS = {"pvt_t": (1.94, 1.69), "pvt_s": (3.83, 3.14), "cvt_13": (4.58, 3.04), "cvt_21": (7.21, 4.10)}
#: dTPS configs that reach Table 2's reduced GMACs at 224 (TPS released no PVT/CvT code, spec 13.2): three
#: DeiT-style locations in the late stages, one keep ratio, cumulative within each stage; the ratio is the one
#: (at two decimals) whose analytic count, predictors and squeeze included, meets the paper's GMACs.
TABLE2_CONFIGS = {
    "pvt_t": ReductionConfig("dtps", (4, 6, 7), (0.61,)),  # 1.689: stage 2 (196 -> 119 queries), stage 3 (49 -> 29 -> 18)
    "pvt_s": ReductionConfig("dtps", (8, 11, 13), (0.56,)),  # 3.139: stage 2 (196 -> 109 -> 61), stage 3 (49 -> 27)
    "cvt_13": ReductionConfig("dtps", (3, 6, 9), (0.66,)),  # 3.037: stage 2 (196 -> 129 -> 85 -> 56)
    "cvt_21": ReductionConfig("dtps", (6, 11, 16), (0.49,)),  # 4.102: stage 2 (196 -> 96 -> 47 -> 23)
}


def check_hier_merge_r(config: ReductionConfig, sched: HierSchedule) -> None:
    """`schedule.check_merge_r` for each stage ToMe merges in (its own patch tokens and depth): `apply` refuses an
    r no block can merge, while the analytic count (the search's bisection) takes any r, as for the ViTs."""
    if config.spec is None or config.spec.policy != "merge":
        return
    for st, per in zip(sched.stages, sched.per_stage):
        if per is not None:
            local = tuple(b - st.first_block for b in config.locations if b in st.blocks)
            check_merge_r(config.with_(locations=local), st.num_spatial, st.depth)
