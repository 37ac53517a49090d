"""Token counts of a reduction on Swin (timm ``swin_*``), in plain Python (no model, no tensors): issue 13.

Swin's token mixer is window attention over a fixed partition of the H x W grid (7 x 7 windows, shifted by half a
window every other block), and every later stage starts with a 2 x 2 patch merging of the whole grid. A token set
that shrinks or shuffles breaks both, so Swin reduces in one of two forms, each of which keeps the grid
(``ReductionConfig.swin_form``):

* **cheap** (DynamicSwin, methods-spec 13.1): only in **stage 2** (0-based; the third stage, 14 x 14 = 196 tokens
  on Swin-T at 224). Window attention stays dense over every token; after its residual the kept tokens take
  ``x + MLP(LN2(x))`` and the others ``x + fastMlp(x)`` (LayerNorm + Linear C -> C), scattered back, so the grid,
  the shift and the patch merging never change. Keep ratios are **not cumulative**: each location's scorer sees
  all M_s tokens of the stage and keeps K = int(M_s * k) of them (DynamicSwin's [rho, rho-0.2, rho-0.4] is the
  config ``keep_ratios=(0.7, 0.5, 0.3)``); that split holds from its block until the next location or the end
  of the stage. Methods: dynamicvit, dtps (the learned predictor, drop or squeeze into the kept tokens) and random.
  Saves MLP work only: 7 C^2 MACs per fast token and block (norms included), minus the scorers.
* **window** (equal counts per window): in a block that reduces, every window of that block's own partition
  (shifted or not) keeps the same number c of tokens, its top c by the latest score map (pruned tokens keep their
  value: frozen in the grid); attention (with the relative-position bias and shift mask of the kept pairs), proj,
  both norms and the MLP run on the kept c per window only, and the window is scattered back into the grid before
  the next block's (shifted) partition or the patch merging. Counts per window follow the ViT rule of
  `schedule.token_schedule` on the window's A = wh * ww tokens and the stage's own locations and depth: cumulative
  int(A * prod k) for dynamicvit, ceil(k * current) for random; a reduction holds to the end of its stage, and
  the next stage starts with every token live. Methods: dynamicvit (the predictor scores the whole grid at each
  location), random (a fixed seeded ranking of the stage's grid) and similarity (below); drop only. Needs every
  reducing stage's grid to be a whole number of windows (Swin-T at 224: 56/28/14/7 with window 7).
* **similarity** (the 2025 preprint's training-free pruning, spec 8; window form). Placement 'pre' (location
  [0], one keep ratio k): the patch embeddings are scored once before block 0 by their mean similarity to every
  other patch (cosine or dot; in O(N C) by summing the normalised embeddings first, `ops.redundancy_linear`), the
  score map is carried to the later stages by 2 x 2 max pooling (a merged token is as distinct as its most
  distinct part), and every block of every stage keeps ceil(k * A) tokens per window. Placement 'layerwise':
  at each location the stage's current tokens are scored the same way, counts as for random.

``locations`` are global 0-based block indices as for PVT and CvT (Swin-T: stage 0 is blocks 0-1, stage 1 2-3,
stage 2 4-9, stage 3 10-11). ``swin_form='auto'`` picks `DEFAULT_FORMS` (the form measured faster, README).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .config import OPTIONAL_DEFAULTS, ReductionConfig
from .hier_schedule import StagedBlocks
from .schedule import Stage, token_schedule

_EPS = 1e-6
#: the stage DynamicSwin makes adaptive (0-based)
CHEAP_STAGE = 2
#: methods each form runs
CHEAP_METHODS = ("dynamicvit", "dtps", "random")
WINDOW_METHODS = ("dynamicvit", "random", "similarity")
SWIN_METHODS = ("dynamicvit", "dtps", "random", "similarity")
#: the form ``swin_form='auto'`` runs, per method: the window form where it runs, as it was measured faster at
#: equal GMACs (benchmarks/results/swin_forms.json); dtps squeezes, which only the cheap form does
DEFAULT_FORMS = {"dynamicvit": "window", "random": "window", "similarity": "window", "dtps": "cheap"}
SIMILARITY_METRICS_SWIN = ("cosine", "dot")


@dataclass(frozen=True)
class SwinStageTokens:
    """One Swin stage as token reduction sees it: its grid, window (after timm's clamp to the grid), blocks."""

    grid: tuple[int, int]
    window: tuple[int, int]
    depth: int
    first_block: int

    @property
    def num_spatial(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_prefix(self) -> int:
        return 0

    @property
    def window_area(self) -> int:
        return self.window[0] * self.window[1]

    @property
    def whole_windows(self) -> bool:
        """True when the grid is a whole number of windows (no padding): the window form needs it."""
        return self.grid[0] % self.window[0] == 0 and self.grid[1] % self.window[1] == 0

    @property
    def num_windows(self) -> int:
        return math.ceil(self.grid[0] / self.window[0]) * math.ceil(self.grid[1] / self.window[1])

    @property
    def blocks(self) -> range:
        return range(self.first_block, self.first_block + self.depth)


@dataclass(frozen=True)
class SwinSchedule(StagedBlocks):
    """Per global block: (tokens through attention, tokens through the full MLP), and the tokens kept per window
    (``per_window``: the window form; the window area where a block runs every token); the reduction steps
    (``Stage.block`` global; ``before``/``after`` are the stage's tokens, ``kept`` those through the full MLP or
    attention, ``removed`` the rest), their ratio-loss targets, and the form that runs."""

    family: str
    form: str
    stages: tuple[SwinStageTokens, ...]
    blocks: tuple[tuple[int, int], ...]
    per_window: tuple[int, ...]
    reductions: tuple[Stage, ...]
    targets: tuple[float, ...] = ()

    @property
    def final_tokens(self) -> int:
        return self.stages[-1].num_spatial


def swin_form(config: ReductionConfig) -> str:
    """The form ``config`` runs on Swin: its ``swin_form``, or the method's default for 'auto' ('' for none)."""
    if config.spec is None:
        return ""
    return DEFAULT_FORMS.get(config.method, "window") if config.swin_form == "auto" else config.swin_form


def check_swin_config(config: ReductionConfig, stages: tuple[SwinStageTokens, ...]) -> str:
    """Refuse (one-line ValueError) what neither Swin form can run; return the form that runs."""
    depth = sum(s.depth for s in stages)
    config.validate(depth)
    spec = config.spec
    if spec is None:
        return ""
    if config.method not in SWIN_METHODS:
        raise ValueError(f"method: {config.method!r} is not supported on Swin; allowed: {', '.join(SWIN_METHODS)}")
    for name in ("squeeze_feature", "squeeze_similarity"):
        if getattr(config, name) != OPTIONAL_DEFAULTS[name]:
            raise ValueError(f"{name}: {getattr(config, name)!r} is not supported on Swin (no position table or "
                             f"attention map over the tokens); allowed: {OPTIONAL_DEFAULTS[name]!r}")
    form = swin_form(config)
    treatment = config.effective_treatment
    if form == "cheap":
        if config.method not in CHEAP_METHODS:
            raise ValueError(f"swin_form: 'cheap' runs {', '.join(CHEAP_METHODS)}, not {config.method!r}; "
                             f"{config.method} runs in the 'window' form")
        if len(stages) <= CHEAP_STAGE:
            raise ValueError(f"model: the cheap form reduces in stage {CHEAP_STAGE}; this Swin has {len(stages)} "
                             "stages")
        st = stages[CHEAP_STAGE]
        bad = [b for b in config.locations if b not in st.blocks]
        if bad:
            raise ValueError(f"locations: {bad} lie outside stage {CHEAP_STAGE} (blocks {st.blocks[0]}.."
                             f"{st.blocks[-1]}), the only stage the cheap form (DynamicSwin) reduces in")
        return form
    if config.method not in WINDOW_METHODS:
        raise ValueError(f"swin_form: 'window' runs {', '.join(WINDOW_METHODS)}, not {config.method!r}; "
                         f"{config.method} runs in the 'cheap' form")
    if treatment != "drop":
        raise ValueError(f"treatment: {treatment!r} is not supported by Swin's window form (pruned tokens stay "
                         "frozen in the grid); allowed: 'drop', or swin_form 'cheap'")
    if spec.policy == "similarity":
        if config.similarity_metric not in SIMILARITY_METRICS_SWIN:
            raise ValueError(f"similarity_metric: {config.similarity_metric!r} is not supported on Swin (no O(N C) "
                             f"form); allowed: {', '.join(SIMILARITY_METRICS_SWIN)}")
        if config.similarity_with_pos:
            raise ValueError("similarity_with_pos: Swin has no position embedding; allowed: false")
        if config.diversity:
            raise ValueError(f"diversity: {config.diversity:g} is not supported on Swin (equal counts per window "
                             "already spread the kept tokens); allowed: 0")
    if spec.policy == "similarity" and config.similarity_placement == "pre":
        reducing = list(stages)
    else:
        reducing = [st for st in stages if any(b in st.blocks for b in config.locations)]
    for i, st in enumerate(stages):
        if st in reducing and not st.whole_windows:
            raise ValueError(f"model: stage {i}'s {st.grid[0]}x{st.grid[1]} grid is not a whole number of "
                             f"{st.window[0]}x{st.window[1]} windows; the window form needs it (image size a "
                             "multiple of patch size x window x 2^stage)")
    return form


def swin_token_schedule(config: ReductionConfig, stages: tuple[SwinStageTokens, ...]) -> SwinSchedule:
    """Per-block token counts of ``config`` on a Swin with ``stages`` (validates the config; module docstring)."""
    form = check_swin_config(config, stages)
    blocks: list[tuple[int, int]] = []
    per_window: list[int] = []
    reductions: list[Stage] = []
    targets: list[float] = []
    ratios = dict(zip(config.locations, config.stage_keep_ratios)) if form else {}
    for st in stages:
        n, a = st.num_spatial, st.window_area
        if form == "cheap":
            k = n
            for b in st.blocks:
                if b in ratios:
                    k = min(n, max(1, int(n * ratios[b] + _EPS)))  # not cumulative: of all n tokens
                    if k < n:
                        reductions.append(Stage(b, n, k, n - k, n))
                        targets.append(ratios[b])
                blocks.append((n, k))
                per_window.append(a)
            continue
        if form == "window" and config.spec.policy == "similarity" and config.similarity_placement == "pre":
            c = max(1, math.ceil(config.stage_keep_ratios[0] * a - _EPS))
            c = min(c, a)
            if c < a and st.first_block == 0:
                reductions.append(Stage(0, n, c * st.num_windows, n - c * st.num_windows, n))
                targets.append(1.0)
            counts = [c] * st.depth
        elif form == "window":
            local = [b - st.first_block for b in config.locations if b in st.blocks]
            counts = [a] * st.depth
            if local:
                sub = config.with_(locations=tuple(local), keep_ratios=tuple(ratios[b + st.first_block]
                                                                            for b in local), swin_form="auto")
                sched = token_schedule(sub, num_patches=a, num_prefix=0, depth=st.depth)
                counts = [q for q, _ in sched.blocks]
                seen: list[float] = []
                for j in local:
                    seen.append(ratios[j + st.first_block])
                    c = counts[j]
                    if c < a:
                        reductions.append(Stage(j + st.first_block, n, c * st.num_windows,
                                                n - c * st.num_windows, n))
                        targets.append(math.prod(seen) if config.spec.count_rule == "cumulative" else seen[-1])
        else:
            counts = [a] * st.depth
        for c in counts:
            t = n if c == a else c * st.num_windows
            blocks.append((t, t))
            per_window.append(c)
    return SwinSchedule("swin", form, tuple(stages), tuple(blocks), tuple(per_window), tuple(reductions),
                        tuple(targets))


def dynamicswin_config(rho: float = 0.7, depths: tuple[int, ...] = (2, 2, 6, 2),
                       loc: tuple[int, ...] = (1, 2, 3), method: str = "dynamicvit") -> ReductionConfig:
    """DynamicSwin's config (spec 13.1) in this project's terms: ``loc`` within stage 2 as global blocks, keep
    ratios rho, rho - 0.2, rho - 0.4 (not cumulative), the cheap form. Swin-T at 224, rho 0.7: 4.04 GMACs."""
    first = sum(depths[:CHEAP_STAGE])
    keeps = tuple(round(rho - 0.2 * i, 6) for i in range(len(loc)))
    return ReductionConfig(method, tuple(first + b for b in loc), keeps, swin_form="cheap")
