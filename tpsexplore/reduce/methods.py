"""Registry of token-reduction methods: each one is a policy, a treatment, a placement and a count rule.

A *policy* decides which tokens go, a *treatment* decides what happens to them. Named methods are
presets of the two (``methods-spec.md``); any policy may be combined with the treatments it allows,
e.g. ``similarity`` + ``squeeze`` or ``topk`` + ``squeeze``.
"""
from __future__ import annotations

from dataclasses import dataclass

POLICIES = ("predictor", "cls_attn", "similarity", "rollout", "random", "merge", "bipartite", "energy")
TREATMENTS = ("drop", "fuse", "squeeze", "merge", "mlerp")
RATIO_RULES = ("ratio", "ratio_patches")  # ToFu, PiToMe: a keep ratio per block, in every block by default


@dataclass(frozen=True)
class MethodSpec:
    """What a registered method does.

    placement: ``inter`` reduces before block i runs (block i sees the reduced set);
    ``intra`` reduces inside block i after attention and before the MLP.
    count_rule: ``cumulative`` keeps int(n0 * prod(rho)) tokens (DynamicViT, dTPS);
    ``ceil`` keeps ceil(kappa * n_current) tokens (EViT, eTPS, Top-K, similarity, rollout, random);
    ``merge`` removes r tokens per block (ToMe);
    ``ratio`` removes floor(n - n * rho) per block, n counting the prefix tokens (ToFu, spec 9.2);
    ``ratio_patches`` the same with n the non-prefix tokens only (PiToMe, spec 10.2). Both remove at most
    half of a block's non-prefix tokens, in every block unless locations are given.
    policy ``bipartite`` is ToMe's matching on keys used to choose redundant tokens (ToFu); ``energy`` is
    PiToMe's energy ranking. Treatment ``mlerp`` is ToFu's own: drop (prune) the matched tokens in blocks
    0..depth//2 and MLERP-merge them after; ToFu + ``squeeze`` squeezes instead of dropping in those early
    blocks (the late blocks already fuse, so MLERP stays). PiToMe merges only: it never drops a token, so a
    squeeze would replace one fusion rule by another rather than rescue pruned tokens.
    """

    name: str
    policy: str
    treatment: str
    treatments: tuple[str, ...]
    placement: str
    count_rule: str
    trainable: bool = False
    description: str = ""

    @property
    def merges(self) -> bool:
        """True for the merging family (ToMe, ToFu, PiToMe): it reduces in every block by default and has no
        single pruning stage to name."""
        return self.count_rule in ("merge", "ratio", "ratio_patches")


_SPECS = (
    MethodSpec("dtps", "predictor", "squeeze", ("squeeze",), "inter", "cumulative", True,
               "TPS with the DynamicViT predictor policy (dTPS)"),
    MethodSpec("etps", "cls_attn", "squeeze", ("squeeze",), "intra", "ceil", False,
               "TPS with the EViT class-attention policy (eTPS)"),
    MethodSpec("dynamicvit", "predictor", "drop", ("drop", "squeeze"), "inter", "cumulative", True,
               "DynamicViT learned predictor, tokens dropped"),
    MethodSpec("evit", "cls_attn", "fuse", ("fuse", "drop", "squeeze"), "intra", "ceil", False,
               "EViT class-attention top-k with the fused inattentive token"),
    MethodSpec("topk", "cls_attn", "drop", ("drop", "fuse", "squeeze"), "intra", "ceil", False,
               "Top-K by class attention (EViT without the fused token)"),
    MethodSpec("tome", "merge", "merge", ("merge",), "intra", "merge", False,
               "ToMe bipartite soft matching with size-weighted merging"),
    MethodSpec("tofu", "bipartite", "mlerp", ("mlerp", "squeeze"), "intra", "ratio", False,
               "ToFu: ToMe's matching; prunes in the first half of the blocks, norm-preserving MLERP merge after"),
    MethodSpec("pitome", "energy", "merge", ("merge",), "intra", "ratio_patches", False,
               "PiToMe: energy score protects isolated tokens; size-weighted merging of the rest"),
    MethodSpec("similarity", "similarity", "drop", ("drop", "squeeze"), "inter", "ceil", False,
               "training-free similarity-based patch pruning (mean cosine redundancy)"),
    MethodSpec("rollout", "rollout", "drop", ("drop", "squeeze"), "inter", "ceil", False,
               "attention-rollout ranking from a full scoring pass"),
    MethodSpec("random", "random", "drop", ("drop", "squeeze"), "inter", "ceil", False,
               "seeded uniform random pruning"),
)

METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in _SPECS}


def get_method(name: str) -> MethodSpec:
    """The spec of a registered method, or a ValueError that lists the allowed names."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"method: unknown method {name!r}; allowed: {', '.join(METHODS)} (or 'none')") from None


def method_names() -> tuple[str, ...]:
    return tuple(METHODS)
