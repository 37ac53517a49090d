"""Pure tensor functions of the two newer training-free merging methods: ToFu and PiToMe (spec 9 and 10).

Both run inside a block, between attention and MLP, on tokens (B, N, C) and the block's head-averaged keys
(B, N, d), like ToMe; they reuse ToMe's matching and merge bookkeeping (`ops.bipartite_soft_matching`,
`ops.merge_apply`), so prefix tokens (class, distillation, registers) are handled the same way in all three.
Nothing here holds state or syncs with the host, every output shape depends only on input shapes and integer
arguments, and no Python loop runs over tokens or images.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .ops import MergePlan, descending_order, gather_tokens, merge_apply, merge_sets

Tensor = torch.Tensor


# ----------------------------------------------------------------------------- ToFu (spec 9)
def removed_tokens(plan: MergePlan, x: Tensor) -> Tensor:
    """The r tokens a ToMe-style plan takes away (its sources), (B, N, C) -> (B, r, C), in the A/B split of
    `ops.merge_apply` (`ops.merge_sets`)."""
    a_start, _ = merge_sets(plan.num_protected)
    return x[:, a_start::2].gather(1, plan.src_idx.expand(-1, -1, x.shape[-1]))


def mlerp_merge(plan: MergePlan, x: Tensor, dst_norm: bool = False) -> Tensor:
    """ToFu's MLERP merge (spec 9.2 step 3): every destination and its sources become one token along their
    plain (unweighted) mean, with the largest norm of the group.

    x'_j = m_j * n_j / ||m_j||, m_j = mean({x_j} + sources of j), n_j = max(||x_j||, max_i ||x_i||): the merged
    token keeps the norm distribution that averaging would shrink (the paper's aim; no official code exists).
    ``dst_norm=True`` is the unofficial re-implementation's variant, which divides by the destination's own norm
    ||x_j|| instead of ||m_j|| and so does not preserve the norm. No sizes are kept (the re-implementation never
    updates them). Tokens that receive nothing (and the prefix tokens) come back bit for bit. Output order and
    prefix handling are `ops.merge_apply`'s: N - r tokens.
    """
    total = merge_apply(plan, x, "sum")  # destinations hold x_j + sum of their sources
    count = merge_apply(plan, x.new_ones(x.shape[0], x.shape[1], 1), "sum")
    norms = x.norm(dim=-1, keepdim=True)
    largest = merge_apply(plan, norms, "amax")
    mean = total / count
    denom = merge_apply(plan, norms, None) if dst_norm else mean.norm(dim=-1, keepdim=True)
    denom = denom.clamp_min(torch.finfo(denom.dtype).tiny)  # a zero mean (opposite tokens) stays finite
    return torch.where(count > 1, mean * (largest / denom), total)


# ----------------------------------------------------------------------------- PiToMe (spec 10)
class EnergyPlan(NamedTuple):
    """PiToMe's merge decision for one block.

    order: (B, T) the T non-prefix tokens by descending energy. The first ``span`` of that order take part in a
    bipartite merge (``merge``: A = even, B = odd positions of that span; no protected tokens inside it); the
    remaining T - span pass through untouched (PiToMe's protected, isolated tokens).
    """

    order: Tensor
    merge: MergePlan
    span: int
    num_prefix: int


def pitome_energy(sim: Tensor, margin: float, alpha: float = 1.0) -> Tensor:
    """PiToMe's energy score (spec 10.2 step 3): E_i = 1/T sum_j ELU_alpha(S_ij - margin), (B, T, T) -> (B, T).

    The diagonal is included (the self term adds 1 - margin). A token in a large cluster of similar tokens has
    high energy and is a merge candidate; an isolated token has low energy and is protected.
    """
    return F.elu(sim - margin, alpha=alpha).mean(dim=-1)


def pitome_matching(metric: Tensor, r: int, margin: float, num_prefix: int = 1, protect: bool = True,
                    alpha: float = 1.0) -> EnergyPlan:
    """PiToMe's matching on (B, N, d) keys, prefix tokens left out (spec 10.2), removing r tokens.

    Cosine similarity S of the T = N - num_prefix tokens (F.normalize, diagonal kept), energies, then tokens
    ordered by descending energy. ``protect=True`` (PiToMe's ``pitome``, the later blocks of its DeiT patch):
    only the 2r highest-energy tokens take part, alternately A and B, and every A merges into its most similar
    B; the other T - 2r are protected. ``protect=False`` (``pitome_bsm``, the early blocks): every token takes
    part, A/B alternate along the energy order, and the r A tokens with the best match merge; the unmerged A
    stay in match-score order (not re-sorted). S is computed once; the matching gathers from it.
    """
    p = num_prefix
    m = F.normalize(metric[:, p:], dim=-1)
    b, t, _ = m.shape
    sim = m @ m.transpose(-1, -2)
    order = descending_order(pitome_energy(sim, margin, alpha))
    span = 2 * r if protect else t
    a_idx, b_idx = order[:, :span:2], order[:, 1:span:2]
    rows = sim.gather(1, a_idx[..., None].expand(-1, -1, t))  # (B, |A|, T)
    scores = rows.gather(2, b_idx[:, None, :].expand(-1, a_idx.shape[1], -1))  # (B, |A|, |B|)
    node_max, node_idx = scores.max(dim=-1)
    if protect:  # |A| = |B| = r: every A merges
        src_idx = torch.arange(r, device=metric.device).expand(b, r)[..., None]
        unm_idx = order.new_empty(b, 0, 1)
    else:
        edge_idx = descending_order(node_max)[..., None]
        src_idx, unm_idx = edge_idx[:, :r], edge_idx[:, r:]
    dst_idx = node_idx[..., None].gather(1, src_idx)
    return EnergyPlan(order, MergePlan(unm_idx, src_idx, dst_idx, 0), span, p)


def energy_apply(plan: EnergyPlan, x: Tensor, reduce: str | None = "sum") -> Tensor:
    """Apply an `EnergyPlan` to (B, N, ...): [prefix, protected (energy order), unmerged A, B with sources
    reduced in], N - r tokens. ``reduce=None`` moves tokens without combining (index bookkeeping)."""
    p = plan.num_prefix
    ordered = gather_tokens(x[:, p:], plan.order)
    merged = merge_apply(plan.merge, ordered[:, : plan.span], reduce)
    return torch.cat([x[:, :p], ordered[:, plan.span:], merged], dim=1)


def energy_wavg(plan: EnergyPlan, x: Tensor, size: Tensor) -> tuple[Tensor, Tensor]:
    """PiToMe's size-weighted merge (spec 10.2 step 6, as ToMe's merge_wavg): tokens and their new sizes."""
    x = energy_apply(plan, x * size, "sum")
    size = energy_apply(plan, size, "sum")
    return x / size, size
