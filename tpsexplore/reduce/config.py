"""`ReductionConfig`: a typed, validated, JSON round-trippable description of one token-reduction setup."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from .methods import METHODS, RATIO_RULES, get_method

SIMILARITY_PLACEMENTS = ("pre", "layerwise")
SQUEEZE_FEATURES = ("full", "content", "position")  # TPS Table 4 (spec 11.1)
SQUEEZE_SIMILARITIES = ("cosine", "attention")  # TPS Table 5 (spec 11.2)
SIMILARITY_METRICS = ("cosine", "euclidean", "dot")  # similarity-pruning preprint 4.4.1 (spec 12)
SWIN_FORMS = ("auto", "cheap", "window")  # Swin's two reduction forms (reduce/swin_schedule.py); auto: the default
SIZE_POLICIES = ("merge",)  # policies that carry token sizes, so proportional attention applies
#: fields written by to_dict only when they differ from these defaults: configs that do not use them keep
#: the JSON (and so the seeds derived from it) they had before the fields existed
OPTIONAL_DEFAULTS = {"prop_attn": True, "squeeze_feature": "full", "squeeze_similarity": "cosine",
                     "similarity_metric": "cosine", "mlerp_dst_norm": False, "swin_form": "auto"}


@dataclass(frozen=True)
class ReductionConfig:
    """Which method reduces tokens, where (0-based block indices) and how much.

    keep_ratios hold one ratio per location, or a single one broadcast to all locations. Each ratio is
    relative to the tokens alive before that stage; how it becomes a count is the method's count rule
    (``methods.MethodSpec``). ToMe uses ``r`` (constant), ``r`` with ``r_inflection`` (ToMe's (r, alpha)
    schedule) or ``r_schedule`` (one r per block) instead of keep ratios; its locations default to
    every block. similarity_with_pos scores the 'pre' placement on patch embeddings plus the position
    embedding (default: content only); 'layerwise' always scores the current tokens.

    The papers' ablations (each default is the published method):
    prop_attn: ToMe's proportional attention (log size added to the attention logits); ToMe's README turns
    it off for off-the-shelf MAE models.
    squeeze_feature: what the TPS squeeze matches pruned to reserved tokens on (Table 4): ``full`` x_i,
    ``content`` x_i - p_i or ``position`` p_i, with p_i the position embedding of the token's original patch.
    squeeze_similarity: the squeeze's similarity (Table 5): ``cosine`` of the matching features, or
    ``attention``, the head-averaged attention map computed last before the squeeze (block loc - 1 for
    reductions between blocks, the block's own for reductions after attention), pruned token as query row.
    similarity_metric: the redundancy metric of similarity pruning: ``cosine``, ``euclidean`` or ``dot``.

    ToFu and PiToMe take keep ratios, not r: one ratio for every block (no locations, the papers' setting) or
    one per location (or one for all locations); each is per block, relative to that block's tokens, in
    [0.5, 1]. mlerp_dst_norm: ToFu's MLERP as the unofficial re-implementation codes it (divide by the
    destination's norm, not the mean's: not norm-preserving); the default is the norm-preserving MLERP.

    swin_form: which of Swin's two reduction forms runs (`tpsexplore.reduce.swin_schedule`): ``cheap``
    (DynamicSwin's fast MLP path in stage 2), ``window`` (equal counts per window, pruned tokens frozen) or
    ``auto`` (the method's default form there); only Swin backbones take a value other than ``auto``.
    """

    method: str = "none"
    locations: tuple[int, ...] = ()
    keep_ratios: tuple[float, ...] = ()
    treatment: str | None = None
    r: int = 0
    r_inflection: float = 0.0
    r_schedule: tuple[int, ...] = ()
    temperature: float = 1.0
    similarity_placement: str = "pre"
    similarity_with_pos: bool = False
    diversity: float = 0.0
    seed: int = 0
    prop_attn: bool = True
    squeeze_feature: str = "full"
    squeeze_similarity: str = "cosine"
    similarity_metric: str = "cosine"
    mlerp_dst_norm: bool = False
    swin_form: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "locations", _int_tuple(self.locations, "locations"))
        object.__setattr__(self, "keep_ratios", _float_tuple(self.keep_ratios, "keep_ratios"))
        object.__setattr__(self, "r_schedule", _int_tuple(self.r_schedule, "r_schedule"))
        for name in ("r", "seed"):  # numpy integers and integral floats (from tables) become ints
            value = getattr(self, name)
            if not isinstance(value, bool) and (hasattr(value, "__index__") or
                                                (isinstance(value, float) and value.is_integer())):
                object.__setattr__(self, name, int(value))
        for name in ("r_inflection", "temperature", "diversity"):  # numpy floats become floats
            value = getattr(self, name)
            if not isinstance(value, (bool, str)) and hasattr(value, "__float__") and type(value).__name__ != "bool_":
                object.__setattr__(self, name, float(value))
        for name in ("similarity_with_pos", "prop_attn", "mlerp_dst_norm"):
            if type(getattr(self, name)).__name__ == "bool_":
                object.__setattr__(self, name, bool(getattr(self, name)))
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self, depth: int | None = None) -> "ReductionConfig":
        """Raise ValueError naming the bad field; with ``depth``, also check locations against the model."""
        for name in ("r", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name}: {value!r} is not an integer")
        for name in ("r_inflection", "temperature", "diversity"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name}: {value!r} is not a finite number")
        for name in ("similarity_with_pos", "prop_attn", "mlerp_dst_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: {getattr(self, name)!r} is not true or false")
        for name, allowed in (("squeeze_feature", SQUEEZE_FEATURES), ("squeeze_similarity", SQUEEZE_SIMILARITIES),
                              ("similarity_metric", SIMILARITY_METRICS), ("swin_form", SWIN_FORMS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: {getattr(self, name)!r}; allowed: {', '.join(allowed)}")
        if self.method == "none":
            if self.locations or self.keep_ratios or self.r or self.r_schedule:
                raise ValueError("method: 'none' takes no locations, keep_ratios or r")
            self._check_options(None, None)
            return self
        spec = get_method(self.method)
        if self.treatment is not None and self.treatment not in spec.treatments:
            raise ValueError(
                f"treatment: {self.treatment!r} is not allowed for method {self.method!r}; "
                f"allowed: {', '.join(spec.treatments)}")
        self._check_options(spec, self.treatment or spec.treatment)
        locs = self.locations
        if any(b <= a for a, b in zip(locs, locs[1:])):
            raise ValueError(f"locations: {list(locs)} must be strictly increasing")
        if any(loc < 0 for loc in locs):
            raise ValueError(f"locations: {list(locs)} must be >= 0 (0-based block indices)")
        if depth is not None and any(loc >= depth for loc in locs):
            raise ValueError(f"locations: {list(locs)} out of range; allowed 0..{depth - 1} for a {depth}-block model")
        for k in self.keep_ratios:
            if not (0.0 < k <= 1.0) or not math.isfinite(k):
                raise ValueError(f"keep_ratios: {k} is outside (0, 1]")
        if not self.temperature > 0:
            raise ValueError(f"temperature: {self.temperature} must be > 0")
        if self.diversity < 0:
            raise ValueError(f"diversity: {self.diversity} must be >= 0")
        if self.similarity_placement not in SIMILARITY_PLACEMENTS:
            raise ValueError(f"similarity_placement: {self.similarity_placement!r}; allowed: "
                             f"{', '.join(SIMILARITY_PLACEMENTS)}")
        if spec.policy == "merge":
            if self.keep_ratios:
                raise ValueError("keep_ratios: ToMe takes r, r_inflection or r_schedule, not keep ratios")
            if self.r < 0 or any(r < 0 for r in self.r_schedule):
                raise ValueError(f"r: must be >= 0 (got r={self.r}, r_schedule={list(self.r_schedule)})")
            if self.r_schedule and self.r:
                raise ValueError("r_schedule: give either r or r_schedule, not both")
            if not -1.0 <= self.r_inflection <= 1.0:
                raise ValueError(f"r_inflection: {self.r_inflection} outside [-1, 1]")
            if depth is not None and self.r_schedule and len(self.r_schedule) != depth:
                raise ValueError(f"r_schedule: has {len(self.r_schedule)} entries; the model has {depth} blocks")
            return self
        if self.r or self.r_schedule:
            raise ValueError(f"r: only ToMe takes r, not {self.method!r}")
        if spec.count_rule in RATIO_RULES:  # ToFu, PiToMe: a keep ratio per block, every block by default
            if len(self.keep_ratios) not in (1, max(1, len(locs))):
                raise ValueError(f"keep_ratios: {len(self.keep_ratios)} values for "
                                 f"{f'{len(locs)} locations' if locs else 'every block'}; give one for all blocks "
                                 "(or one per location)")
            if min(self.keep_ratios) < 0.5:
                raise ValueError(f"keep_ratios: {min(self.keep_ratios)} is below 0.5; {self.method} removes at most "
                                 "half of a block's tokens; allowed: [0.5, 1]")
            return self
        if not locs:
            raise ValueError(f"locations: method {self.method!r} needs at least one location")
        if len(self.keep_ratios) not in (1, len(locs)):
            raise ValueError(f"keep_ratios: {len(self.keep_ratios)} values for {len(locs)} locations; "
                             "give one per location or one for all")
        if spec.policy == "similarity" and self.similarity_placement == "pre" and locs != (0,):
            raise ValueError(f"locations: similarity_placement='pre' prunes once before block 0, so locations "
                             f"must be [0] (got {list(locs)}); use similarity_placement='layerwise' otherwise")
        return self

    def _check_options(self, spec, treatment: str | None) -> None:
        """The ablation options apply only where the method has the part they change."""
        name = self.method if spec is not None else "none"
        if not self.prop_attn and (spec is None or spec.policy not in SIZE_POLICIES):
            raise ValueError(f"prop_attn: false applies only to methods that merge tokens with sizes (ToMe); "
                             f"method {name!r} has none")
        if treatment != "squeeze":
            for field_name in ("squeeze_feature", "squeeze_similarity"):
                value = getattr(self, field_name)
                if value != OPTIONAL_DEFAULTS[field_name]:
                    raise ValueError(f"{field_name}: {value!r} applies only to the squeeze treatment; method "
                                     f"{name!r} treats pruned tokens by {treatment or 'nothing'!r}")
        if self.squeeze_similarity == "attention" and self.squeeze_feature != "full":
            raise ValueError(f"squeeze_feature: {self.squeeze_feature!r} needs squeeze_similarity 'cosine' (the "
                             "attention map matches tokens without features)")
        if self.squeeze_similarity == "attention" and spec is not None and spec.placement == "inter" \
                and 0 in self.locations:
            raise ValueError(f"squeeze_similarity: 'attention' uses the attention of the block before the "
                             f"reduction, and method {name!r} reduces before block 0, which has none; allowed: "
                             "locations >= 1, or 'cosine'")
        if self.similarity_metric != "cosine" and (spec is None or spec.policy != "similarity"):
            raise ValueError(f"similarity_metric: {self.similarity_metric!r} applies only to similarity pruning; "
                             f"method {name!r} does not score by similarity")
        if self.mlerp_dst_norm and name != "tofu":
            raise ValueError(f"mlerp_dst_norm: true applies only to ToFu's MLERP merge; method {name!r} has none")

    # ------------------------------------------------------------------ derived values
    @property
    def spec(self):
        return None if self.method == "none" else METHODS[self.method]

    @property
    def effective_treatment(self) -> str | None:
        if self.method == "none":
            return None
        return self.treatment or METHODS[self.method].treatment

    @property
    def stage_keep_ratios(self) -> tuple[float, ...]:
        """One keep ratio per location (broadcast applied)."""
        if len(self.keep_ratios) == 1:
            return self.keep_ratios * len(self.locations)
        return self.keep_ratios

    def block_keep_ratios(self, depth: int) -> tuple[float, ...]:
        """ToFu/PiToMe: the keep ratio of every block, 1.0 where it reduces nothing (every block reduces when no
        locations are given)."""
        if not self.locations:
            return (self.keep_ratios[0] if self.keep_ratios else 1.0,) * depth
        ratios = dict(zip(self.locations, self.stage_keep_ratios))
        return tuple(ratios.get(i, 1.0) for i in range(depth))

    def merge_schedule(self, depth: int) -> tuple[int, ...]:
        """ToMe's r for every block (ToMe's parse_r), restricted to ``locations`` when they are given."""
        if self.r_schedule:
            rs = list(self.r_schedule)
        elif self.r_inflection:
            lo = int(self.r * (1.0 - self.r_inflection))
            hi = 2 * self.r - lo
            step = (hi - lo) / (depth - 1) if depth > 1 else 0.0
            rs = [int(lo + step * i) for i in range(depth)]
        else:
            rs = [self.r] * depth
        if self.locations:
            rs = [r if i in self.locations else 0 for i, r in enumerate(rs)]
        return tuple(rs)

    @property
    def is_identity(self) -> bool:
        """True when the config cannot change any token (method none)."""
        return self.method == "none"

    @property
    def label(self) -> str:
        """A short human-readable name, e.g. ``etps k0.7@3,6,9`` or ``tome r13``."""
        if self.method == "none":
            return "baseline"
        name = self.method
        if self.treatment and self.treatment != METHODS[self.method].treatment:
            name += f"+{self.treatment}"
        if METHODS[self.method].policy == "merge":
            if self.r_schedule:
                return f"{name} r[{','.join(map(str, self.r_schedule))}]" + self._option_label()
            return f"{name} r{self.r}" + (f" a{self.r_inflection:g}" if self.r_inflection else "") + \
                self._option_label()
        ks = ",".join(f"{k:g}" for k in self.keep_ratios)
        where = f"@{','.join(map(str, self.locations))}" if self.locations else ""  # ToFu/PiToMe: every block
        return f"{name} k{ks}{where}" + self._option_label()

    def _option_label(self) -> str:
        """The ablation options that differ from their defaults, e.g. `` feat=content`` or `` noprop``."""
        out = ""
        if not self.prop_attn:
            out += " noprop"
        if self.squeeze_feature != "full":
            out += f" feat={self.squeeze_feature}"
        if self.squeeze_similarity != "cosine":
            out += f" sim={self.squeeze_similarity}"
        if self.similarity_metric != "cosine":
            out += f" metric={self.similarity_metric}"
        if self.mlerp_dst_norm:
            out += " mlerp=dst"
        if self.swin_form != "auto":
            out += f" form={self.swin_form}"
        return out

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["locations"] = list(self.locations)
        d["keep_ratios"] = list(self.keep_ratios)
        d["r_schedule"] = list(self.r_schedule)
        for name, default in OPTIONAL_DEFAULTS.items():
            if d[name] == default:
                del d[name]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ReductionConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown ReductionConfig field; allowed: {', '.join(sorted(known))}")
        return cls(**data)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> "ReductionConfig":
        """Parse JSON text or a file; a deployment config's ``reduction`` section is accepted too."""
        p = Path(text_or_path) if not str(text_or_path).lstrip().startswith("{") else None
        text = p.read_text() if p is not None else str(text_or_path)
        data = parse_json(text, str(p) if p is not None else "config")
        if "reduction" in data and isinstance(data["reduction"], dict):
            data = data["reduction"]
        return cls.from_dict(data)

    def with_(self, **changes: Any) -> "ReductionConfig":
        return replace(self, **changes)


def parse_json(text: str, source: str) -> dict[str, Any]:
    """A JSON object from ``text``; malformed JSON is one ValueError naming ``source`` and the position."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"config: {source!r} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno} "
                         f"(char {e.pos})") from None
    if not isinstance(data, dict):
        raise ValueError(f"config: {source!r} holds a JSON {type(data).__name__}, not an object of "
                         "ReductionConfig fields")
    return data


def _int_tuple(value: Any, name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        value = (value,)
    try:
        out = tuple(value)
    except TypeError:
        raise ValueError(f"{name}: expected a list of integers, got {value!r}") from None
    for v in out:
        if isinstance(v, bool) or not isinstance(v, int):
            if isinstance(v, float) and v.is_integer():
                continue
            raise ValueError(f"{name}: {v!r} is not an integer")
    return tuple(int(v) for v in out)


def _float_tuple(value: Any, name: str) -> tuple[float, ...]:
    if isinstance(value, (int, float)):
        value = (value,)
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected numbers, got {value!r}") from None
    return out
