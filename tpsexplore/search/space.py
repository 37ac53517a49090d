"""The search space: method x stage locations x keep ratios (or ToMe's r schedule) x method options.

Parametrisation (every name has one fixed distribution for the whole study, so TPE can model it):

* ``method``: categorical over *variants*, a registered method or a policy x treatment combination
  (``similarity+squeeze``). By default every registered method plus every combination that is not the same
  (policy, treatment, placement, count rule) as a named method: ``dynamicvit+squeeze`` is dTPS and
  ``topk+squeeze`` is eTPS, so those are searched once, under the named method. Listing a combination in
  ``--methods`` searches it under its own name.
* keep-ratio variants: ``n_stages`` in 1..max_stages, ``first`` in [0, 1] (relative: mapped onto
  first_min..first_max of that variant; first_max is the latest block at which the variant can still meet the
  budget, first_min the first block from which it can run in every later block: 0 on the ViTs and for the grid
  methods (dTPS, DynamicViT, random) on the hierarchical backbones, the last stage's first block for the
  class-attention methods (eTPS, EViT, Top-K) on PVT v1, which exclude them on CvT and PVT v2; ToMe merges in
  PVT v1's last stage only and is excluded on CvT and PVT v2),
  ``gap`` in 1..gap_max (stages at first, first+gap, ...; repaired to fit the depth), raw keep ratios
  ``keep_i`` and ``fill`` in [fill_min, 1]. The raw keep ratios give the *shape* of the schedule; they are
  raised to one common power s (k_i = max(floor, raw_i ** s)) chosen by bisection on the analytic count so
  that the config costs at most ``fill`` x budget x baseline GMACs. So nearly every sample is feasible, and
  ``fill`` spreads the samples along the cost axis instead of piling them at the budget.
* ToMe: ``r_inflection`` in [-1, 0.5] (ToMe's (r, alpha) schedule; -1 is the paper's decreasing schedule,
  strongly increasing ones leave the first blocks unmerged and rarely fit a budget) and ``fill``; r itself is
  the smallest integer whose analytic cost fits ``fill`` x budget.
* ToFu, PiToMe: ``fill`` only; one keep ratio for every block (as their papers run them), the largest in
  [0.5, 1] at three decimals whose analytic cost fits ``fill`` x budget; ToFu also samples ``mlerp_dst_norm``
  (the re-implementation's MLERP) and, as ``tofu+squeeze``, the squeeze options of its pruning blocks.
* options: ``temperature`` and ``squeeze_match`` (squeeze treatments: the matching of TPS Tables 4-5, one of
  full / content / position / attention, see `SQUEEZE_MATCHES`), ``sim_placement``/``sim_with_pos``/
  ``diversity``/``similarity_metric`` (similarity policy), ``prop_attn`` (ToMe's proportional attention).

Grid mode (``SpaceSettings.grid_locations``, the TPS paper study): ``locations`` is a categorical over the
given location sets and ``keep`` over the given keep ratios (one ratio for every stage, as in the papers);
variants that cannot express the locations (ToMe, ToFu, PiToMe; similarity placed before block 0) are matched
to the analytic cost of eTPS at that (locations, keep) point. ``grid_options`` (the ablation studies) adds one grid
axis per listed `ReductionConfig` option (`GRID_OPTIONS`, e.g. squeeze_feature = [full, content, position]),
named as the config field; an option is set only on the variants it applies to (the others run at its
default, so list only methods the ablation is about).

The budget is checked with the analytic count only (`tpsexplore.measure.flops.analytic_macs`, about
0.05 ms); no model is built for a sample.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..measure.flops import ViTGeometry, analytic_macs, analytic_params
from ..reduce.config import SIMILARITY_METRICS, SIZE_POLICIES, ReductionConfig
from ..reduce.methods import METHODS, RATIO_RULES, MethodSpec, get_method
from ..reduce.swin_schedule import SIMILARITY_METRICS_SWIN

PAPER_LOCATIONS = ((3, 6, 9),)
PAPER_KEEP = 0.7
PAPER_TOME_R = 13
PAPER_DEPTH = 12
PAPER_PATCHES = 196
#: sampled ``squeeze_match`` -> (squeeze_feature, squeeze_similarity): TPS Tables 4 and 5 in one categorical
SQUEEZE_MATCHES = {"full": ("full", "cosine"), "content": ("content", "cosine"),
                   "position": ("position", "cosine"), "attention": ("full", "attention")}
#: `ReductionConfig` options a grid study may list in ``[space.grid_options]``
GRID_OPTIONS = ("squeeze_feature", "squeeze_similarity", "similarity_metric", "similarity_placement", "prop_attn",
                "temperature", "seed")


# ----------------------------------------------------------------------------- variants
@dataclass(frozen=True)
class Variant:
    """A searchable method: a registered method with its own or another allowed treatment."""

    method: str
    treatment: str | None = None  # None: the method's own treatment

    @property
    def spec(self) -> MethodSpec:
        return METHODS[self.method]

    @property
    def effective_treatment(self) -> str:
        return self.treatment or self.spec.treatment

    @property
    def key(self) -> str:
        return self.method if self.treatment in (None, self.spec.treatment) else f"{self.method}+{self.treatment}"

    @property
    def signature(self) -> tuple[str, str, str, str]:
        s = self.spec
        return (s.policy, self.effective_treatment, s.placement, s.count_rule)

    @property
    def is_named(self) -> bool:
        return self.treatment in (None, self.spec.treatment)


def parse_variant(text: str) -> Variant:
    """``etps`` or ``similarity+squeeze`` -> Variant; ValueError naming the bad part."""
    name, _, treatment = str(text).strip().partition("+")
    spec = get_method(name.strip()) if name.strip() in METHODS else None
    if spec is None:
        raise ValueError(f"methods: unknown method {name.strip()!r}; allowed: {', '.join(METHODS)} "
                         "(optionally +treatment, e.g. similarity+squeeze)")
    treatment = treatment.strip() or None
    if treatment is not None and treatment not in spec.treatments:
        raise ValueError(f"methods: treatment {treatment!r} is not allowed for {spec.name!r}; allowed: "
                         f"{', '.join(spec.treatments)}")
    return Variant(spec.name, None if treatment == spec.treatment else treatment)


def default_variants() -> tuple[Variant, ...]:
    """Every registered method, then every policy x treatment combination not equal to a named method."""
    out: list[Variant] = [Variant(name) for name in METHODS]
    seen = {v.signature for v in out}
    for spec in METHODS.values():
        for t in spec.treatments:
            v = Variant(spec.name, t)
            if v.signature not in seen:
                seen.add(v.signature)
                out.append(v)
    return tuple(out)


def resolve_variants(methods: Any) -> tuple[Variant, ...]:
    """``None``/``"all"`` -> `default_variants`; else a list or comma-separated string of variant names."""
    if methods is None or (isinstance(methods, str) and methods.strip().lower() == "all"):
        return default_variants()
    items = methods.split(",") if isinstance(methods, str) else list(methods)
    items = [str(m).strip() for m in items if str(m).strip()]
    if not items:
        raise ValueError("methods: empty; give 'all' or names such as etps,tome,similarity+squeeze")
    if any(m.lower() == "all" for m in items):
        return default_variants()
    out: dict[str, Variant] = {}
    for m in items:
        v = parse_variant(m)
        out.setdefault(v.key, v)
    return tuple(out.values())


# ----------------------------------------------------------------------------- settings / results
@dataclass(frozen=True)
class SpaceSettings:
    """Ranges of the sampled parameters (see the module docstring)."""

    fill_min: float = 0.5
    keep_range: tuple[float, float] = (0.3, 0.95)
    keep_floor: float = 0.05
    temperature_range: tuple[float, float] = (0.25, 4.0)
    diversity_max: float = 0.5
    gap_max: int = 0  # 0: depth // 4
    sample_options: bool = True
    grid_locations: tuple[tuple[int, ...], ...] = ()
    grid_keep_ratios: tuple[float, ...] = ()
    grid_options: dict[str, tuple[Any, ...]] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.grid_options, dict):
            raise ValueError(f"space.grid_options: {self.grid_options!r} is not a table of option = [values]")
        object.__setattr__(self, "grid_options", {str(k): tuple(v) if isinstance(v, (list, tuple)) else v
                                                  for k, v in self.grid_options.items()})
        object.__setattr__(self, "keep_range", tuple(float(v) for v in self.keep_range))
        object.__setattr__(self, "temperature_range", tuple(float(v) for v in self.temperature_range))
        object.__setattr__(self, "grid_locations", tuple(tuple(int(x) for x in locs) for locs in self.grid_locations))
        object.__setattr__(self, "grid_keep_ratios", tuple(float(k) for k in self.grid_keep_ratios))
        self.validate()

    @property
    def grid(self) -> bool:
        return bool(self.grid_locations)

    def validate(self) -> "SpaceSettings":
        if not 0.0 < self.fill_min <= 1.0:
            raise ValueError(f"space.fill_min: {self.fill_min} is outside (0, 1]")
        lo, hi = self.keep_range if len(self.keep_range) == 2 else (None, None)
        if lo is None or not 0.0 < lo < hi < 1.0:
            raise ValueError(f"space.keep_range: {list(self.keep_range)} must be [lo, hi] with 0 < lo < hi < 1")
        if not 0.0 < self.keep_floor <= lo:
            raise ValueError(f"space.keep_floor: {self.keep_floor} must be in (0, keep_range lo={lo}]")
        t = self.temperature_range
        if len(t) != 2 or not 0.0 < t[0] <= t[1]:
            raise ValueError(f"space.temperature_range: {list(t)} must be [lo, hi] with 0 < lo <= hi")
        if not 0.0 <= self.diversity_max <= 10.0:
            raise ValueError(f"space.diversity_max: {self.diversity_max} is outside [0, 10]")
        if self.gap_max < 0:
            raise ValueError(f"space.gap_max: {self.gap_max} must be >= 0 (0 = depth // 4)")
        if bool(self.grid_locations) != bool(self.grid_keep_ratios):
            raise ValueError("space.grid_locations: grid mode needs both grid_locations and grid_keep_ratios")
        for locs in self.grid_locations:
            if not locs or any(b <= a for a, b in zip(locs, locs[1:])) or locs[0] < 0:
                raise ValueError(f"space.grid_locations: {list(locs)} must be non-empty, >= 0 and strictly "
                                 "increasing")
        for k in self.grid_keep_ratios:
            if not 0.0 < k <= 1.0:
                raise ValueError(f"space.grid_keep_ratios: {k} is outside (0, 1]")
        if self.grid_options and not self.grid_locations:
            raise ValueError("space.grid_options: needs grid mode (grid_locations and grid_keep_ratios)")
        for name, values in self.grid_options.items():
            if name not in GRID_OPTIONS:
                raise ValueError(f"space.grid_options.{name}: unknown option; allowed: {', '.join(GRID_OPTIONS)}")
            if not isinstance(values, tuple) or not values:
                raise ValueError(f"space.grid_options.{name}: {values!r} is not a non-empty list of values")
            for v in values:
                try:
                    ReductionConfig(**{name: v})
                except ValueError as e:
                    if str(e).startswith(f"{name}: ") and "applies only" not in str(e):
                        raise ValueError(f"space.grid_options.{e}") from None
        features = set(self.grid_options.get("squeeze_feature", ())) - {"full"}
        if features and "attention" in self.grid_options.get("squeeze_similarity", ()):
            raise ValueError("space.grid_options.squeeze_feature: the attention similarity takes no matching feature; "
                             "list squeeze_feature or squeeze_similarity, not both")
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"fill_min": self.fill_min, "keep_range": list(self.keep_range), "keep_floor": self.keep_floor,
                "temperature_range": list(self.temperature_range), "diversity_max": self.diversity_max,
                "gap_max": self.gap_max, "sample_options": self.sample_options,
                "grid_locations": [list(x) for x in self.grid_locations],
                "grid_keep_ratios": list(self.grid_keep_ratios),
                **({"grid_options": {k: list(v) for k, v in self.grid_options.items()}} if self.grid_options
                   else {})}


@dataclass(frozen=True)
class Candidate:
    """One point of the space with its analytic cost; no model has been built for it.

    constraint = gmacs / baseline_gmacs - budget (Optuna's convention: <= 0 is feasible).
    """

    variant: str
    config: ReductionConfig
    gmacs: float
    params: int
    baseline_gmacs: float
    budget: float
    target_gmacs: float | None = None
    note: str = ""
    macs_parts: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def fraction(self) -> float:
        return self.gmacs / self.baseline_gmacs

    @property
    def constraint(self) -> float:
        return self.fraction - self.budget

    @property
    def feasible(self) -> bool:
        return self.constraint <= 1e-12

    @property
    def reference(self) -> bool:
        """The unreduced baseline: measured as a reference whatever the budget."""
        return self.config.method == "none"


class _Fixed:
    """A minimal FixedTrial (``suggest_*`` return the given params) without Optuna's warnings."""

    def __init__(self, params: dict[str, Any]) -> None:
        self.params = params

    def suggest_categorical(self, name: str, choices: Any) -> Any:
        return self.params[name]

    def suggest_float(self, name: str, low: float, high: float, log: bool = False) -> float:
        return float(self.params[name])

    def suggest_int(self, name: str, low: int, high: int) -> int:
        return int(self.params[name])


# ----------------------------------------------------------------------------- the space
class SearchSpace:
    """Samples `Candidate`s through an Optuna trial's ``suggest_*`` calls (or a FixedTrial of params)."""

    def __init__(self, geometry: ViTGeometry, budget: float, variants: tuple[Variant, ...],
                 max_stages: int = 3, settings: SpaceSettings | None = None, seed: int = 0) -> None:
        if not 0.0 < budget <= 1.0:
            raise ValueError(f"budget: {budget} is outside (0, 1]; give a fraction of the baseline GFLOPs")
        if not 1 <= max_stages <= 4:
            raise ValueError(f"max_stages: {max_stages} is outside 1..4")
        self.geometry = geometry
        self.budget = float(budget)
        self.settings = settings or SpaceSettings()
        self.seed = int(seed)
        self.depth = geometry.depth
        self.max_stages = min(max_stages, self.depth)
        self.gap_max = max(1, self.settings.gap_max or self.depth // 4)
        self.baseline_gmacs = analytic_macs(ReductionConfig(), geometry).gmacs
        self.budget_gmacs = self.budget * self.baseline_gmacs
        self.first_max: dict[str, int] = {}
        self.first_min: dict[str, int] = {}
        self.excluded: dict[str, str] = {}
        kept: list[Variant] = []
        for v in variants:
            try:
                why = self._exclusion(v)
            except ValueError as e:  # hierarchical backbones: the method cannot run from block 0 on (or at all)
                if isinstance(geometry, ViTGeometry):
                    raise
                why = str(e)
            if why:
                self.excluded[v.key] = why
            else:
                kept.append(v)
        self.variants = tuple(kept)
        self._by_key = {v.key: v for v in self.variants}
        if self.settings.grid:
            self.grid_locations = tuple(",".join(map(str, locs)) for locs in self.settings.grid_locations
                                        if len(locs) <= self.max_stages and locs[-1] < self.depth)
            if not self.grid_locations:
                raise ValueError(f"space.grid_locations: none fits a {self.depth}-block model with at most "
                                 f"{self.max_stages} stages")

    @property
    def _swin(self) -> bool:
        """True on a Swin backbone, whose similarity pruning takes fewer options (`reduce.swin_schedule`)."""
        return getattr(self.geometry, "family", "") == "swin"

    # ------------------------------------------------------------------ analytic cost
    def cost(self, config: ReductionConfig) -> float:
        """Analytic GMACs of ``config`` (batch 1, eval path)."""
        return analytic_macs(config, self.geometry).gmacs

    def _floor_config(self, v: Variant, locations: tuple[int, ...]) -> ReductionConfig:
        return self._config(v, locations, (self.settings.keep_floor,) * len(locations), {})

    def _exclusion(self, v: Variant) -> str:
        """Why ``v`` can never meet the budget ('' if it can); also fills first_max for keep-ratio variants."""
        if v.spec.count_rule in RATIO_RULES:
            cheapest = self.cost(self._config(v, (), (0.5,), {}))
        elif v.spec.policy == "merge":
            cheapest = self.cost(ReductionConfig("tome", r=2 * self.geometry.num_patches, r_inflection=-1.0))
        else:
            best = -1
            hier = not isinstance(self.geometry, ViTGeometry)  # a reduction acts within its stage (PVT, CvT):
            lo = self._first_min(v) if hier else 0
            self.first_min[v.key] = lo
            for f in range(lo, self.depth):  # there the cheapest shape from f spreads its stages over the blocks
                locs = self._locations(f, self.gap_max, self.max_stages, lo) if hier else (f,)
                if self.cost(self._floor_config(v, locs)) <= self.budget_gmacs:
                    best = f
                else:
                    break
            self.first_max[v.key] = best
            if best >= 0:
                return ""
            first = self._locations(lo, self.gap_max, self.max_stages, lo) if hier else (0,)
            cheapest = self.cost(self._floor_config(v, first))
        if cheapest <= self.budget_gmacs:
            return ""
        extra = " (attention rollout runs a full scoring pass first)" if v.spec.policy == "rollout" else ""
        return (f"cheapest config costs {cheapest / self.baseline_gmacs:.3f} x baseline GFLOPs > budget "
                f"{self.budget:g}{extra}")

    def _first_min(self, v: Variant) -> int:
        """The first block from which ``v`` can reduce at every later block (a hierarchical backbone's stages
        allow different methods); the backbone's refusal (one line) when it can reduce at none."""
        lo = None
        for b in range(self.depth - 1, -1, -1):
            try:
                self.cost(self._floor_config(v, (b,)))
            except ValueError:
                if lo is None:
                    raise
                break
            lo = b
        return lo

    # ------------------------------------------------------------------ config building
    def _config(self, v: Variant, locations: tuple[int, ...], keeps: tuple[float, ...],
                options: dict[str, Any]) -> ReductionConfig:
        kw: dict[str, Any] = {"method": v.method, "treatment": v.treatment, "seed": int(options.get("seed", self.seed))}
        if v.spec.policy == "similarity":
            placement = "pre" if tuple(locations) == (0,) and options.get("sim_placement", "pre") == "pre" \
                else "layerwise"
            kw.update(similarity_placement=placement,
                      similarity_with_pos=bool(options.get("sim_with_pos", False)),
                      diversity=float(options.get("diversity", 0.0)),
                      similarity_metric=str(options.get("similarity_metric", "cosine")))
        if v.effective_treatment == "squeeze":
            if "temperature" in options:
                kw["temperature"] = float(options["temperature"])
            feature, similarity = SQUEEZE_MATCHES[options.get("squeeze_match", "full")]
            feature = str(options.get("squeeze_feature", feature))
            similarity = str(options.get("squeeze_similarity", similarity))
            if similarity == "attention" and v.spec.placement == "inter" and 0 in locations:
                similarity = "cosine"  # no attention map before block 0: the published cosine instead
            kw.update(squeeze_feature=feature, squeeze_similarity=similarity)
        if v.spec.policy == "bipartite":
            kw["mlerp_dst_norm"] = bool(options.get("mlerp_dst_norm", False))
        return ReductionConfig(locations=tuple(locations), keep_ratios=tuple(keeps), **kw)

    def _scaled_keeps(self, v: Variant, locations: tuple[int, ...], raw: tuple[float, ...],
                      options: dict[str, Any], target: float) -> tuple[ReductionConfig, float, str]:
        """Raise the raw keep ratios to the smallest common power whose config costs <= target."""
        floor = self.settings.keep_floor

        def build(s: float) -> ReductionConfig:
            ks = tuple(max(floor, math.floor(max(floor, r ** s) * 1000.0) / 1000.0) for r in raw)
            return self._config(v, locations, ks, options)

        lo_e, hi_e = -6.0, 8.0  # s = 2**e: 1/64 (keep ~1) .. 256 (every ratio at the floor)
        cfg_lo = build(2.0 ** lo_e)
        if self.cost(cfg_lo) <= target:
            return cfg_lo, self.cost(cfg_lo), f"keep ratios kept near 1 (power {2.0 ** lo_e:g}): under target"
        cfg_hi = build(2.0 ** hi_e)
        cost_hi = self.cost(cfg_hi)
        if cost_hi > target:
            if target < self.budget_gmacs and cost_hi <= self.budget_gmacs:  # fill the budget instead
                cfg, cost, note = self._scaled_keeps(v, locations, raw, options, self.budget_gmacs)
                return cfg, cost, f"{note} (the fill target is below this shape's minimum: filled the budget)"
            return cfg_hi, cost_hi, "every keep ratio at the floor: the target is below this shape's minimum"
        for _ in range(22):
            mid = 0.5 * (lo_e + hi_e)
            cfg = build(2.0 ** mid)
            c = self.cost(cfg)
            if c <= target:
                hi_e, cfg_hi, cost_hi = mid, cfg, c
            else:
                lo_e = mid
        return cfg_hi, cost_hi, f"raw keep ratios raised to power {2.0 ** hi_e:.3g} to fit the target"

    def _ratio_config(self, v: Variant, options: dict[str, Any], target: float) -> tuple[ReductionConfig, float, str]:
        """ToFu/PiToMe: the largest keep ratio (every block, three decimals, in [0.5, 1]) whose cost fits ``target``."""
        def build(k: int) -> ReductionConfig:
            return self._config(v, (), (k / 1000.0,), options)

        lo, hi = 500, 1000
        cheapest = self.cost(build(lo))
        if target < cheapest <= self.budget_gmacs:  # the fill target is out of reach: fill the budget
            target = self.budget_gmacs
        if cheapest > target:
            return build(lo), cheapest, "keep 0.5 in every block: the target is below this method's minimum"
        if self.cost(build(hi)) <= target:
            return build(hi), self.cost(build(hi)), "keep 1: the target allows the unreduced model"
        while hi - lo > 1:  # invariant: cost(lo) <= target < cost(hi)
            mid = (lo + hi) // 2
            if self.cost(build(mid)) <= target:
                lo = mid
            else:
                hi = mid
        cfg = build(lo)
        return cfg, self.cost(cfg), f"keep {lo / 1000:g} in every block: the largest fitting the target"

    def _tome_config(self, inflection: float, target: float, options: dict[str, Any] | None = None
                     ) -> tuple[ReductionConfig, float, str]:
        """The smallest r (ToMe, every block) whose analytic cost fits ``target``."""
        options = options or {}
        seed, prop = int(options.get("seed", self.seed)), bool(options.get("prop_attn", True))

        def build(r: int) -> ReductionConfig:
            return ReductionConfig("tome", r=r, r_inflection=inflection, seed=seed, prop_attn=prop)

        lo, hi = 0, max(1, 2 * self.geometry.num_patches)  # 2x: with an inflection the first blocks get less
        if self.cost(build(hi)) > target and target < self.budget_gmacs and \
                self.cost(build(hi)) <= self.budget_gmacs:  # the fill target is out of reach: fill the budget
            target = self.budget_gmacs
        if self.cost(build(hi)) > target:
            return build(hi), self.cost(build(hi)), "r at its maximum: the target is below ToMe's minimum"
        while hi - lo > 1:  # invariant: cost(lo) > target >= cost(hi)
            mid = (lo + hi) // 2
            if self.cost(build(mid)) <= target:
                hi = mid
            else:
                lo = mid
        cfg = build(hi)
        return cfg, self.cost(cfg), f"r={hi}: smallest r fitting the target"

    def _locations(self, first: int, gap: int, n: int, lo: int = 0) -> tuple[int, ...]:
        """first, first+gap, ... (n stages), repaired to lie within blocks lo..depth-1 (at most one stage per
        block; gap shrinks, then first)."""
        last = self.depth - 1
        n = max(1, min(n, last - lo + 1))
        if n > 1 and first + (n - 1) * gap > last:
            gap = max(1, (last - first) // (n - 1))
        if first + (n - 1) * gap > last:
            first = max(lo, last - (n - 1) * gap)
        return tuple(first + i * gap for i in range(n))

    # ------------------------------------------------------------------ sampling
    def suggest(self, trial: Any) -> Candidate:
        """Sample a candidate through ``trial.suggest_*`` (an Optuna Trial, or FixedTrial for replay)."""
        key = trial.suggest_categorical("method", [v.key for v in self.variants])
        v = self._by_key[key]
        options = self._suggest_options(trial, v)
        if self.settings.grid:
            return self._suggest_grid(trial, v, options)
        fill = trial.suggest_float("fill", self.settings.fill_min, 1.0) if self.settings.fill_min < 1.0 else 1.0
        target = fill * self.budget_gmacs
        if v.spec.policy == "merge":
            alpha = round(trial.suggest_float("r_inflection", -1.0, 0.5), 2)
            cfg, cost, note = self._tome_config(alpha, target, options)
            return self.candidate(cfg, key, target, note)
        if v.spec.count_rule in RATIO_RULES:
            cfg, cost, note = self._ratio_config(v, options, target)
            return self.candidate(cfg, key, target, note)
        if v.spec.policy == "similarity" and options.get("sim_placement") == "pre":
            locations: tuple[int, ...] = (0,)
        else:
            n = trial.suggest_int("n_stages", 1, self.max_stages) if self.max_stages > 1 else 1
            rel = trial.suggest_float("first", 0.0, 1.0)
            lo = self.first_min.get(key, 0)
            first = lo + int(round(rel * (self.first_max[key] - lo)))
            gap = trial.suggest_int("gap", 1, self.gap_max) if n > 1 and self.gap_max > 1 else 1
            locations = self._locations(first, gap, n, lo)
        lo, hi = self.settings.keep_range
        raw = tuple(trial.suggest_float(f"keep_{i}", lo, hi) for i in range(len(locations)))
        cfg, cost, note = self._scaled_keeps(v, locations, raw, options, target)
        return self.candidate(cfg, key, target, note)

    def _suggest_options(self, trial: Any, v: Variant) -> dict[str, Any]:
        opts: dict[str, Any] = {}
        s = self.settings
        if v.spec.policy == "similarity":
            opts["sim_placement"] = trial.suggest_categorical("sim_placement", ["pre", "layerwise"]) \
                if s.sample_options or not s.grid else "layerwise"
            if s.sample_options:
                swin = self._swin  # Swin: no position embedding, equal counts per window instead of diversity
                if not swin:
                    opts["sim_with_pos"] = trial.suggest_categorical("sim_with_pos", [False, True])
                if s.diversity_max > 0 and not swin:
                    opts["diversity"] = round(trial.suggest_float("diversity", 0.0, s.diversity_max), 3)
                opts["similarity_metric"] = trial.suggest_categorical(
                    "similarity_metric", list(SIMILARITY_METRICS_SWIN if swin else SIMILARITY_METRICS))
        if v.effective_treatment == "squeeze" and s.sample_options and s.temperature_range[0] < s.temperature_range[1]:
            opts["temperature"] = round(trial.suggest_float("temperature", *s.temperature_range, log=True), 3)
        if v.effective_treatment == "squeeze" and s.sample_options and isinstance(self.geometry, ViTGeometry):
            # (hierarchical backbones squeeze on the full features only: no ViT position table or attention map)
            opts["squeeze_match"] = trial.suggest_categorical("squeeze_match", list(SQUEEZE_MATCHES))
        if v.spec.policy in SIZE_POLICIES and s.sample_options:
            opts["prop_attn"] = trial.suggest_categorical("prop_attn", [True, False])
        if v.spec.policy == "bipartite" and s.sample_options:
            opts["mlerp_dst_norm"] = trial.suggest_categorical("mlerp_dst_norm", [False, True])
        if s.grid:
            for name, values in s.grid_options.items():
                value = trial.suggest_categorical(name, list(values))
                opts["sim_placement" if name == "similarity_placement" else name] = value
        return opts

    def _suggest_grid(self, trial: Any, v: Variant, options: dict[str, Any]) -> Candidate:
        locs_text = trial.suggest_categorical("locations", list(self.grid_locations))
        keep = float(trial.suggest_categorical("keep", list(self.settings.grid_keep_ratios)))
        locations = tuple(int(x) for x in locs_text.split(","))
        reference = self.cost(ReductionConfig("etps", locations, (keep,)))
        if v.spec.policy == "merge":
            cfg, _, note = self._tome_config(0.0, reference, options)
            return self.candidate(cfg, v.key, reference, f"{note} (matched to etps k{keep:g}@{locs_text})")
        if v.spec.count_rule in RATIO_RULES:
            cfg, _, note = self._ratio_config(v, options, reference)
            return self.candidate(cfg, v.key, reference, f"{note} (matched to etps k{keep:g}@{locs_text})")
        if v.spec.policy == "similarity" and options.get("sim_placement") == "pre" and locations != (0,):
            cfg, _, note = self._scaled_keeps(v, (0,), (keep,), options, reference)
            return self.candidate(cfg, v.key, reference, f"{note} (matched to etps k{keep:g}@{locs_text})")
        return self.candidate(self._config(v, locations, (keep,), options), v.key, None, "paper grid point")

    def baseline(self) -> Candidate:
        """The unreduced model (enqueued first as the reference; infeasible whenever budget < 1)."""
        return self.candidate(ReductionConfig(seed=self.seed), "baseline", None, "unreduced reference")

    def candidate(self, config: ReductionConfig, variant: str, target: float | None = None,
                  note: str = "") -> Candidate:
        report = analytic_macs(config, self.geometry)
        return Candidate(variant=variant, config=config, gmacs=report.gmacs,
                         params=analytic_params(config, self.geometry).total,
                         baseline_gmacs=self.baseline_gmacs, budget=self.budget, target_gmacs=target, note=note,
                         macs_parts=report.as_dict())

    def from_params(self, params: dict[str, Any]) -> Candidate:
        """Replay a trial's params (e.g. from the Optuna storage) into the same candidate."""
        import optuna

        return self.suggest(optuna.trial.FixedTrial(dict(params)))

    # ------------------------------------------------------------------ enqueued defaults
    def default_params(self) -> list[dict[str, Any]]:
        """Params of each registered method's published default, scaled to the budget and the geometry.

        keep 0.7 at [3, 6, 9] (DynamicViT, dTPS, EViT, eTPS, Top-K), ToMe r=13 (its r follows from the
        budget), similarity / random / rollout pruning 30% before block 0 (the similarity paper's setting).
        Combinations (``+treatment``) are not enqueued: they have no published default; nor are ToFu and
        PiToMe, whose DeiT operating points could not be read (spec 9.3, 10: only an evaluation sweep of
        keep 0.9-0.975 per block); the sampler explores them from the start.
        """
        out = []
        scale = self.depth / PAPER_DEPTH
        first = max(0, int(round(3 * scale)))
        gap = max(1, min(self.gap_max, int(round(3 * scale))))
        for v in self.variants:
            if not v.is_named or v.spec.count_rule in RATIO_RULES:
                continue
            p: dict[str, Any] = {"method": v.key}
            if v.spec.policy == "similarity":
                p["sim_placement"] = "pre"
                if self.settings.sample_options and not self._swin:
                    p["sim_with_pos"] = False
                    if self.settings.diversity_max > 0:
                        p["diversity"] = 0.0
            if v.effective_treatment == "squeeze" and self.settings.sample_options and \
                    self.settings.temperature_range[0] < self.settings.temperature_range[1]:
                lo, hi = self.settings.temperature_range
                p["temperature"] = min(hi, max(lo, 1.0))
            if self.settings.sample_options:  # the ablation options at their published defaults
                if v.effective_treatment == "squeeze":
                    p["squeeze_match"] = "full"
                if v.spec.policy == "similarity":
                    p["similarity_metric"] = "cosine"
                if v.spec.policy in SIZE_POLICIES:
                    p["prop_attn"] = True
            if self.settings.grid:
                locs = ",".join(str(x) for x in PAPER_LOCATIONS[0])
                p["locations"] = locs if locs in self.grid_locations else self.grid_locations[0]
                p["keep"] = PAPER_KEEP if PAPER_KEEP in self.settings.grid_keep_ratios \
                    else self.settings.grid_keep_ratios[-1]
            else:
                f0 = max(first, self.first_min.get(v.key, 0))  # the paper's first block where v can run
                if self.settings.fill_min < 1.0:
                    # the paper's own cost when it fits the budget, else the whole budget
                    paper = self.cost(self._paper_config(v, f0, gap)) / self.budget_gmacs
                    p["fill"] = min(1.0, max(self.settings.fill_min, math.ceil(paper * 1e4) / 1e4))
                if v.spec.policy == "merge":
                    p["r_inflection"] = 0.0
                elif v.spec.policy in ("similarity", "random", "rollout"):
                    if v.spec.policy != "similarity":
                        if self.max_stages > 1:
                            p["n_stages"] = 1
                        p["first"] = 0.0
                    p["keep_0"] = PAPER_KEEP
                else:
                    n = min(3, self.max_stages)
                    if self.max_stages > 1:
                        p["n_stages"] = n
                    if n > 1 and self.gap_max > 1:
                        p["gap"] = gap
                    for i in range(n):
                        p[f"keep_{i}"] = PAPER_KEEP
                    p["first"] = self._default_first(v, p, f0)
            out.append(p)
        return out

    def _paper_config(self, v: Variant, first: int, gap: int) -> ReductionConfig:
        """The published default of ``v`` at this depth / token count, before fitting the budget."""
        if v.spec.policy == "merge":
            r = max(1, int(round(PAPER_TOME_R * self.geometry.num_patches / PAPER_PATCHES)))
            return ReductionConfig("tome", r=r, seed=self.seed)
        if v.spec.policy in ("similarity", "random", "rollout"):
            return self._config(v, (0,), (PAPER_KEEP,), {"sim_placement": "pre"})
        n = min(3, self.max_stages)
        locations = self._locations(first, gap, n, self.first_min.get(v.key, 0))
        return self._config(v, locations, (PAPER_KEEP,) * len(locations), {})

    def _default_first(self, v: Variant, params: dict[str, Any], paper_first: int) -> float:
        """The relative ``first`` of a default: the paper's first block, moved earlier (as the TPS paper
        does for its 35% budgets, e.g. keep 0.5 at [1, 4, 7]) while the budget would squeeze the keep ratio
        below 0.5."""
        fm, lo = self.first_max[v.key], self.first_min.get(v.key, 0)
        if fm <= lo:
            return 0.0
        rel = 0.0
        for f in range(min(paper_first, fm), lo - 1, -1):
            rel = (f - lo) / (fm - lo)
            if self.settings.grid:
                break
            cand = self.suggest(_Fixed({**params, "first": rel}))
            if min(cand.config.stage_keep_ratios) >= 0.5:
                break
        return rel

    def grid_space(self) -> dict[str, list[Any]] | None:
        """The full grid (method x locations x keep) for Optuna's GridSampler; None unless the space is a
        grid without sampled options."""
        if not self.settings.grid or self.settings.sample_options:
            return None
        return {"method": [v.key for v in self.variants], "locations": list(self.grid_locations),
                "keep": list(self.settings.grid_keep_ratios),
                **{name: list(values) for name, values in self.settings.grid_options.items()}}

    def describe(self) -> dict[str, Any]:
        """JSON summary for study.json."""
        return {"variants": [v.key for v in self.variants], "excluded": dict(self.excluded),
                "first_max": dict(self.first_max), "first_min": dict(self.first_min), "gap_max": self.gap_max,
                "max_stages": self.max_stages,
                "baseline_gmacs": self.baseline_gmacs, "budget_gmacs": self.budget_gmacs,
                "settings": self.settings.to_dict()}
