"""Token counts per block for a config, computed in plain Python (no model, no tensors).

The patched model's forward follows exactly these counts, so analytic FLOPs, budget checks and the
tests all share this one definition of each method's keep-ratio rule.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .config import ReductionConfig
from .methods import RATIO_RULES

_EPS = 1e-6


@dataclass(frozen=True)
class Stage:
    """One reduction step: at ``block``, ``before`` non-prefix tokens become ``after``.

    ``kept`` tokens are selected, ``removed`` tokens go (dropped, fused, squeezed or merged).
    For ToMe, ToFu and PiToMe, ``kept`` is the number of unmerged tokens and ``removed`` is r.
    """

    block: int
    before: int
    kept: int
    removed: int
    after: int


@dataclass(frozen=True)
class TokenSchedule:
    """Tokens through attention and MLP for every block, plus the reduction stages."""

    num_prefix: int
    num_patches: int
    blocks: tuple[tuple[int, int], ...]
    stages: tuple[Stage, ...]
    scoring_pass: bool = False  # attention rollout runs one full forward pass to score patches

    @property
    def final_tokens(self) -> int:
        return self.blocks[-1][1]

    def counts(self) -> list[int]:
        """Distinct token counts in order, e.g. [197, 138, 97, 68]."""
        return distinct_counts(self.blocks)


def distinct_counts(blocks) -> list[int]:
    """[(attention, MLP) tokens per block] -> the distinct counts in order, e.g. [197, 138, 97, 68]."""
    out: list[int] = []
    for a, m in blocks:
        for n in (a, m):
            if not out or out[-1] != n:
                out.append(n)
    return out


def cumulative_keep(n0: int, ratios: list[float]) -> int:
    """DynamicViT/dTPS rule: int(n0 * prod(ratios)), floor, at least 1."""
    return max(1, int(n0 * math.prod(ratios) + _EPS))


def ceil_keep(n: int, ratio: float) -> int:
    """EViT rule: ceil(ratio * n), at least 1."""
    return max(1, math.ceil(ratio * n - _EPS))


def max_merge_r(num_patches: int) -> int:
    """The largest r a ToMe block can merge: half of the patch tokens (every larger r acts as this one)."""
    return num_patches // 2


def ratio_merge_r(tokens: int, num_prefix: int, keep: float, count_prefix: bool) -> int:
    """Tokens a ToFu/PiToMe block removes at keep ratio ``keep``: floor(n - n * keep) in float64, as both
    codes compute it, with n all ``tokens`` (ToFu counts the class token, spec 9.2; ``count_prefix``) or the
    non-prefix ones (PiToMe, spec 10.2); at most half of the non-prefix tokens (the matching's A set)."""
    n = tokens if count_prefix else tokens - num_prefix
    return max(0, min(math.floor(n - n * keep), (tokens - num_prefix) // 2))


def tofu_merges(block: int, depth: int) -> bool:
    """ToFu merges (MLERP) in blocks after depth // 2 and prunes up to it (spec 9.2 step 3: blocks 0-6 of 12)."""
    return block > depth // 2


def pitome_protects(block: int, depth: int) -> bool:
    """PiToMe's DeiT patch (spec 10.2 step 5): blocks from ceil(depth / 2) on protect the T - 2r lowest-energy
    tokens (``pitome``); the earlier ones run the energy-ordered bipartite matching (``pitome_bsm``)."""
    return block >= math.ceil(depth / 2)


PITOME_MARGIN = 0.75  # PiToMe's DeiT/MAE margin at block 0 (spec 10.2 step 7)


def pitome_margin(block: int, depth: int) -> float:
    """PiToMe's energy margin of a block: 0.75 - 0.75 * block / depth, falling with depth (spec 10.2 step 7)."""
    return PITOME_MARGIN - PITOME_MARGIN * block / depth


def check_merge_r(config: ReductionConfig, num_patches: int, depth: int) -> None:
    """Refuse a ToMe config whose r no block can merge, instead of clamping it without a word.

    ToMe merges at most half of a block's tokens, so a per-block r above ``num_patches // 2`` is always cut
    down. Refused (ValueError naming the allowed maximum): a constant ``r``, or an ``r_schedule`` entry, above
    that limit, and an (r, inflection) schedule whose every block asks for more. Schedules that ask a late block
    for more than its remaining tokens allow stay as ToMe defines them (ToMe's r=16 on DeiT does that).
    """
    if config.spec is None or config.spec.policy != "merge":
        return
    limit = max_merge_r(num_patches)
    if config.r_schedule:
        for i, r in enumerate(config.r_schedule):
            if r > limit:
                raise ValueError(f"r_schedule: {r} at block {i} is more than a block can merge; at most {limit} "
                                 f"for {num_patches} patch tokens (ToMe merges at most half of a block's tokens)")
        return
    asked = [r for i, r in enumerate(config.merge_schedule(depth))
             if not config.locations or i in config.locations]
    if asked and min(asked) > limit:
        allowed = config.r
        while allowed > 0 and min(r for i, r in enumerate(config.with_(r=allowed - 1).merge_schedule(depth))
                                  if not config.locations or i in config.locations) >= limit:
            allowed -= 1
        how = f" with r_inflection {config.r_inflection:g}" if config.r_inflection else ""
        raise ValueError(f"r: {config.r} is more than a block can merge; at most {allowed}{how} for "
                         f"{num_patches} patch tokens (ToMe merges at most half of a block's tokens)")


def token_schedule(config: ReductionConfig, num_patches: int = 196, num_prefix: int = 1,
                   depth: int = 12) -> TokenSchedule:
    """Per-block (attention tokens, MLP tokens) for ``config`` on a ViT with the given geometry."""
    config.validate(depth)
    if config.swin_form != "auto":
        raise ValueError(f"swin_form: {config.swin_form!r} applies only to Swin backbones; allowed here: 'auto'")
    m = num_patches  # non-prefix tokens alive
    blocks: list[tuple[int, int]] = []
    stages: list[Stage] = []
    spec = config.spec
    if spec is None:
        return TokenSchedule(num_prefix, num_patches, tuple((num_prefix + m, num_prefix + m) for _ in range(depth)), ())
    if spec.policy == "merge":
        rs = config.merge_schedule(depth)
        t = num_prefix + m
        for i in range(depth):
            r = min(rs[i], (t - num_prefix) // 2)
            if r > 0:
                stages.append(Stage(i, t - num_prefix, t - num_prefix - r, r, t - num_prefix - r))
            blocks.append((t, t - max(r, 0)))
            t -= max(r, 0)
        return TokenSchedule(num_prefix, num_patches, tuple(blocks), tuple(stages))
    if spec.count_rule in RATIO_RULES:  # ToFu, PiToMe: intra-block, r from each block's keep ratio
        t = num_prefix + m
        for i, keep in enumerate(config.block_keep_ratios(depth)):
            r = ratio_merge_r(t, num_prefix, keep, count_prefix=spec.count_rule == "ratio")
            if r > 0:
                stages.append(Stage(i, t - num_prefix, t - num_prefix - r, r, t - num_prefix - r))
            blocks.append((t, t - r))
            t -= r
        return TokenSchedule(num_prefix, num_patches, tuple(blocks), tuple(stages))

    ratios = dict(zip(config.locations, config.stage_keep_ratios))
    fuse = config.effective_treatment == "fuse"
    seen: list[float] = []
    for i in range(depth):
        n_attn = num_prefix + m
        if i in ratios:
            seen.append(ratios[i])
            k = cumulative_keep(num_patches, seen) if spec.count_rule == "cumulative" else ceil_keep(m, ratios[i])
            k = min(k, m)
            if k < m:
                after = k + 1 if fuse else k
                stages.append(Stage(i, m, k, m - k, after))
                m = after
            if spec.placement == "inter":
                n_attn = num_prefix + m
        blocks.append((n_attn, num_prefix + m))
    return TokenSchedule(num_prefix, num_patches, tuple(blocks), tuple(stages), scoring_pass=spec.policy == "rollout")
