"""Pure tensor functions for token scoring, selection, squeezing, fusing and merging.

Shapes: tokens (B, N, C); scores (B, N); index tensors (B, K) int64. Nothing here holds state or
syncs with the host, and every output shape depends only on input shapes and integer arguments.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .config import SIMILARITY_METRICS

Tensor = torch.Tensor


# ----------------------------------------------------------------------------- basics
def cosine_similarity(a: Tensor, b: Tensor, eps: float = 1e-6) -> Tensor:
    """Pairwise cosine similarity (B, Na, C) x (B, Nb, C) -> (B, Na, Nb), eps added to each norm.

    The norms scale the small (Na, Nb) product instead of normalising both token tensors, which saves
    two full passes over (B, N, C) on the hot path.
    """
    na = a.norm(dim=-1, keepdim=True) + eps
    nb = b.norm(dim=-1, keepdim=True) + eps
    return (a @ b.transpose(-2, -1)) / (na * nb.transpose(-2, -1))


def gather_tokens(x: Tensor, idx: Tensor) -> Tensor:
    """Rows ``idx`` (B, K) of ``x`` (B, N, ...) -> (B, K, ...)."""
    if x.dim() == 2:
        return x.gather(1, idx)
    return x.gather(1, idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:]))


def _flat_rows(idx: Tensor, n: int) -> Tensor:
    """Row numbers of ``idx`` (B, K) in the (B * n) rows of a flattened (B, n, C) tensor, (B * K,)."""
    return (idx + torch.arange(idx.shape[0], device=idx.device).unsqueeze(1) * n).reshape(-1)


def take_rows(x: Tensor, idx: Tensor) -> Tensor:
    """`gather_tokens` for (B, N, C) by whole rows: one index_select over the flattened rows (a row copy each,
    where gather reads an index per element: 2-3x faster on CPU for wide rows), (B, K, C)."""
    b, n, c = x.shape
    return x.reshape(b * n, c).index_select(0, _flat_rows(idx, n)).view(b, idx.shape[1], c)


def put_rows(base: Tensor, idx: Tensor, rows: Tensor) -> Tensor:
    """``base`` (B, N, C) with its rows ``idx`` (B, K, distinct per image) replaced by ``rows`` (B, K, C), out of
    place: the scatter of whole rows by one index_copy (cheaper than scatter's index per element)."""
    b, n, c = base.shape
    return base.reshape(b * n, c).index_copy(0, _flat_rows(idx, n), rows.reshape(-1, c)).view(b, n, c)


def rows_on_zeros(idx: Tensor, rows: Tensor, n: int, out: Tensor | None = None) -> Tensor:
    """A (B, n, C) tensor of zeros but its rows ``idx`` (B, K, distinct per image), which hold ``rows`` (B, K, C).

    ``out``: a flat tensor of at least B * n * C elements (rows' dtype and device) to write it into, zeroed here,
    instead of a fresh allocation (on CPU a fresh tensor's page faults cost more than the zeroing)."""
    b, k, c = rows.shape
    grid = rows.new_zeros(b * n, c) if out is None else out[: b * n * c].view(b * n, c).zero_()
    return grid.index_copy_(0, _flat_rows(idx, n), rows.reshape(b * k, c)).view(b, n, c)


def descending_order(scores: Tensor) -> Tensor:
    """Indices that order ``scores`` (B, N) from highest to lowest, (B, N).

    Eager, torch.compile and torch.export run ``argsort``. Inside ``torch.onnx.export`` it is ``topk`` over all
    N (a Python int: token counts are static), which becomes an ONNX TopK with a constant K, as TensorRT needs;
    argsort would export with K read from the input's Shape. The orders can differ only among exactly equal
    scores (ONNX TopK puts the lower index first).
    """
    if torch.onnx.is_in_onnx_export():
        return scores.topk(scores.shape[-1], dim=-1).indices
    return scores.argsort(dim=-1, descending=True)


def ascending_indices(idx: Tensor, dim: int = 1) -> Tensor:
    """Distinct integer indices sorted ascending along ``dim`` (values only); a constant-K TopK under ONNX export."""
    if torch.onnx.is_in_onnx_export():
        return idx.topk(idx.shape[dim], dim=dim, largest=False).values
    return idx.sort(dim=dim).values


def split_by_score(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Indices of the ``k`` highest scores (descending) and of the rest, (B, k) and (B, N - k)."""
    order = descending_order(scores)
    return order[:, :k], order[:, k:]


def nearest_distance(points: Tensor, centres: Tensor) -> Tensor:
    """Euclidean distance from each point (B, N, D) to its nearest centre (B, K, D) -> (B, N).

    ``torch.cdist`` has no ONNX form, so inside ``torch.onnx.export`` this is `nearest_distance_matmul`; eager
    keeps cdist, which is 10-15% faster at batch 64 on CPU. Both give the same values on integer grid
    coordinates, which is what it is used on.
    """
    if torch.onnx.is_in_onnx_export():
        return nearest_distance_matmul(points, centres)
    return torch.cdist(points, centres).amin(dim=-1)


def nearest_distance_matmul(points: Tensor, centres: Tensor) -> Tensor:
    """`nearest_distance` as |p|^2 - 2 p.c + |c|^2 (one batched matmul) with one square root after the minimum.

    Exact on integer coordinates (every step is an exact float operation there, and sqrt is monotonic).
    """
    sq = torch.baddbmm(centres.square().sum(dim=-1).unsqueeze(1), points, centres.transpose(1, 2), alpha=-2.0)
    return (sq + points.square().sum(dim=-1, keepdim=True)).amin(dim=-1).clamp_min(0.0).sqrt()


# ----------------------------------------------------------------------------- TPS squeeze
def squeeze(reserved: Tensor, pruned: Tensor, temperature: float = 1.0, similarity: Tensor | None = None,
            host_weight: float = math.e) -> tuple[Tensor, Tensor]:
    """TPS squeeze (spec 3.1): fuse every pruned token into its most similar reserved token (its host).

    R'_j = (e R_j + sum_{i in Q_j} exp(S_ij) P_i) / (e + sum_{i in Q_j} exp(S_ij)), with S the cosine
    similarity over temperature. The host's weight is e at every temperature, as in the official TPSModule
    (its self-similarity taken as 1, untempered); ``host_weight`` exists only for tests of other forms.
    ``similarity`` (B, Np, Nr), when given, replaces the cosine of the tokens for matching and weighting
    (the TPS ablations of spec 11: another matching feature, or the previous attention map); the fusion
    still averages the tokens themselves. Exact ties add a pruned token to every tied host, as the
    reference does. Returns the new reserved tokens (B, Nr, C) and the fusion weights (B, Nr, Np), which
    are exp(S) for a (host, pruned) pair and 0 elsewhere.
    """
    fresh = similarity is None or temperature != 1.0  # a tensor made here may be updated in place
    sim = cosine_similarity(pruned, reserved) if similarity is None else similarity  # (B, Np, Nr)
    if temperature != 1.0:
        sim = sim / temperature
    not_host = sim < sim.amax(dim=-1, keepdim=True)
    sim = sim.masked_fill_(not_host, -math.inf) if fresh else sim.masked_fill(not_host, -math.inf)
    weight = sim.exp_().transpose(1, 2)
    num = torch.baddbmm(reserved.to(weight.dtype), weight, pruned.to(weight.dtype), beta=host_weight)  # eR + W P
    den = weight.sum(dim=-1, keepdim=True) + host_weight
    return (num / den).to(reserved.dtype), weight


def squeeze_masked(x: Tensor, keep: Tensor, prune: Tensor, temperature: float = 1.0,
                   similarity: Tensor | None = None, host_weight: float = math.e) -> Tensor:
    """Training form of the squeeze on a fixed-length tensor (dTPS, spec 3.2).

    x (B, N, C) spatial tokens; keep and prune (B, N) are the stage's hard decisions (straight-through,
    so they carry gradients). Pruned-at-this-stage rows pick their host among kept columns; earlier-pruned
    tokens are neither hosts nor squeezed. Non-host rows are returned unchanged. ``similarity`` (B, N, N)
    replaces the cosine of x as in `squeeze`.

    The weights are built as exp(M * S) * M with M = host mask * prune, as the official training code
    does, not as M * exp(S): the forward values are the same (M is 0 or 1), but the gradient that reaches
    the predictor through the straight-through M differs. Per (row, host) pair it is exp(S) (1 + S) on a
    pruned row and 1 on any other row (M * exp(S) gives exp(S) on both), and the published dTPS models
    were trained with the official gradient.
    """
    n = x.shape[1]
    sim = cosine_similarity(x, x) if similarity is None else similarity
    if temperature != 1.0:
        sim = sim / temperature
    eye = torch.eye(n, dtype=torch.bool, device=x.device)
    sim = sim.masked_fill(eye | (keep < 0.5).unsqueeze(1), -100.0)
    mask = (sim == sim.amax(dim=-1, keepdim=True)).to(x.dtype) * prune.unsqueeze(-1)  # (B, N pruned, N hosts)
    weight = ((mask * sim).exp() * mask).transpose(1, 2)  # (B, N hosts, N pruned)
    return (host_weight * x + weight @ x) / (host_weight + weight.sum(dim=-1, keepdim=True))


# ----------------------------------------------------------------------------- EViT
def fuse_tokens(tokens: Tensor, weights: Tensor) -> Tensor:
    """EViT's inattentive token: sum_j a_j x_j, (B, M, C) x (B, M) -> (B, 1, C), not renormalised."""
    return weights.unsqueeze(1).to(tokens.dtype) @ tokens


def class_attention(q: Tensor, k: Tensor, scale: float, bias: Tensor | None = None) -> Tensor:
    """Head-averaged attention of the class query to every key, (B, H, N, d) -> (B, N).

    Only the class-token row is computed (one q.K^T row per head), so the block keeps fused attention.
    """
    logits = (q[:, :, :1] * scale) @ k.transpose(-2, -1)  # (B, H, 1, N)
    if bias is not None:
        logits = logits + bias
    return logits.float().softmax(dim=-1).mean(dim=1)[:, 0]


# ----------------------------------------------------------------------------- DynamicViT
def gumbel_keep(log_probs: Tensor, tau: float = 1.0) -> Tensor:
    """Straight-through hard Gumbel-softmax sample of the keep channel (B, N, 2) -> (B, N)."""
    return F.gumbel_softmax(log_probs, tau=tau, hard=True)[..., 0]


def masked_attention(q: Tensor, k: Tensor, v: Tensor, policy: Tensor, scale: float, eps: float = 1e-6) -> Tensor:
    """DynamicViT's masked softmax attention in fp32 (spec 1.2 step 3).

    policy (B, N) is 1 for live tokens; a dropped token still attends to itself (G_ii = 1) and nobody
    attends to it. Returns (B, H, N, d).
    """
    return masked_attention_probs(q, k, policy, scale, eps).to(v.dtype) @ v


def masked_attention_probs(q: Tensor, k: Tensor, policy: Tensor, scale: float, eps: float = 1e-6) -> Tensor:
    """The attention probabilities of `masked_attention`, (B, H, N, N) in fp32."""
    n = q.shape[2]
    logits = ((q * scale) @ k.transpose(-2, -1)).float()
    logits = logits - logits.amax(dim=-1, keepdim=True)
    p = policy.float()[:, None, None, :]
    eye = torch.eye(n, device=q.device, dtype=torch.float32)
    gate = p + (1.0 - p) * eye
    e = logits.exp() * gate
    return (e + eps / n) / (e.sum(dim=-1, keepdim=True) + eps)


def ratio_loss_terms(decisions: list[Tensor], targets: list[float]) -> Tensor:
    """DynamicViT ratio loss without its weight: 1/S sum_s mean_b(mean_i D_s - rho_s)^2."""
    terms = [(d.float().mean(dim=1) - t).pow(2).mean() for d, t in zip(decisions, targets)]
    return torch.stack(terms).sum() / len(terms)


# ----------------------------------------------------------------------------- similarity pruning
def pairwise_similarity(features: Tensor, metric: str = "cosine") -> Tensor:
    """Pairwise similarity of tokens (B, N, C) -> (B, N, N) for similarity pruning (spec 12).

    cosine (the preprint's default); euclidean: minus the L2 distance, via |a|^2 + |b|^2 - 2 a.b (one
    matmul plus one squared norm, exportable, unlike cdist); dot: the raw inner product, which favours
    high-norm tokens.
    """
    if metric == "cosine":
        return cosine_similarity(features, features)
    if metric == "dot":
        return features @ features.transpose(-2, -1)
    if metric == "euclidean":
        sq = (features * features).sum(dim=-1)
        d2 = torch.baddbmm(sq.unsqueeze(1), features, features.transpose(-2, -1), alpha=-2.0) + sq.unsqueeze(-1)
        return -d2.clamp_min(0.0).sqrt()
    raise ValueError(f"similarity_metric: {metric!r}; allowed: {', '.join(SIMILARITY_METRICS)}")


def redundancy(features: Tensor, metric: str = "cosine") -> Tensor:
    """Mean similarity of each token to every other token, (B, N, C) -> (B, N) (`pairwise_similarity`)."""
    sim = pairwise_similarity(features, metric)
    n = features.shape[1]
    return (sim.sum(dim=-1) - sim.diagonal(dim1=-2, dim2=-1)) / max(n - 1, 1)


def redundancy_linear(features: Tensor, metric: str = "cosine") -> Tensor:
    """`redundancy` in O(N C) for the cosine and dot metrics, (B, N, C) -> (B, N).

    The mean over j != i of f_i . f_j is (f_i . sum_j f_j - f_i . f_i) / (N - 1), with f the embeddings
    normalised as `cosine_similarity` does (cosine) or as they are (dot): one product with the summed features
    instead of the N x N matrix (2 N C MACs with the norms, against N^2 C; Swin's stage 0 has N = 3136).
    """
    n = features.shape[1]
    if metric == "cosine":
        norm = features.norm(dim=-1, keepdim=True)
        f = features / (norm + 1e-6)
        self_sim = ((norm / (norm + 1e-6)) ** 2)[..., 0]
    elif metric == "dot":
        f = features
        self_sim = (features * features).sum(dim=-1)
    else:
        raise ValueError(f"similarity_metric: {metric!r} has no O(N C) form; allowed: cosine, dot")
    total = (f @ f.sum(dim=1, keepdim=True).transpose(1, 2))[..., 0]
    return (total - self_sim) / max(n - 1, 1)


def diverse_topk(scores: Tensor, k: int, coords: Tensor, weight: float, rounds: int = 4) -> tuple[Tensor, Tensor]:
    """Top-k with a spatial-diversity bonus (similarity pruning, spec 8.1 step 5 — its form is inferred).

    Selection runs in a fixed number of rounds (not per token). Each round takes the next share of k by
    min-max-normalised score + weight * (grid distance to the nearest token already kept, over the grid
    diagonal). weight = 0 is plain top-k. coords (B, N, 2) are patch-grid positions.
    """
    if weight == 0.0 or k >= scores.shape[1]:
        return split_by_score(scores, k)
    b, n = scores.shape
    lo = scores.amin(dim=-1, keepdim=True)
    hi = scores.amax(dim=-1, keepdim=True)
    base = (scores - lo) / (hi - lo + 1e-6)
    coords = coords.float()
    diag = coords.flatten(1).amax(dim=-1).clamp_min(1.0).view(b, 1) * math.sqrt(2.0)
    taken = torch.zeros(b, n, dtype=torch.bool, device=scores.device)
    nearest = torch.ones(b, n, device=scores.device)  # no kept token yet: every bonus equal
    chunks = [k // rounds + (1 if i < k % rounds else 0) for i in range(rounds)]
    picked = []
    for size in (c for c in chunks if c > 0):
        total = (base + weight * nearest).masked_fill(taken, -math.inf)
        idx = total.topk(size, dim=-1).indices
        picked.append(idx)
        taken = taken.scatter(1, idx, torch.ones_like(idx, dtype=torch.bool))
        dist = nearest_distance(coords, gather_tokens(coords, idx)) / diag
        nearest = torch.minimum(nearest, dist)
    keep = torch.cat(picked, dim=1)
    rest = descending_order(torch.where(taken, -math.inf, scores))[:, : n - k]
    return keep, rest


# ----------------------------------------------------------------------------- attention rollout
def attention_rollout(attentions: list[Tensor], num_prefix: int = 1) -> Tensor:
    """Rollout (Abnar & Zuidema): R = prod_l norm(0.5 A_l + 0.5 I), head-mean A_l; cls row over patches.

    attentions: per block (B, H, N, N) post-softmax. Only the class row of R is needed, so it is carried
    backwards from the last block as a (B, 1, N) row (N^2 per block instead of N^3).
    Returns (B, N - num_prefix).
    """
    n = attentions[0].shape[-1]
    eye = torch.eye(n, device=attentions[0].device, dtype=torch.float32)
    row = None
    for attn in reversed(attentions):
        a = 0.5 * attn.float().mean(dim=1) + 0.5 * eye
        a = a / a.sum(dim=-1, keepdim=True)
        row = a[:, :1] if row is None else row @ a
    return row[:, 0, num_prefix:]


# ----------------------------------------------------------------------------- ToMe
class MergePlan(NamedTuple):
    """Bipartite matching result over the non-prefix tokens: A-token indices left unmerged, merged sources and
    their destinations (indices into the A and B sets of `merge_sets`), and the number of prefix tokens."""

    unm_idx: Tensor  # (B, Na - r, 1)
    src_idx: Tensor  # (B, r, 1)
    dst_idx: Tensor  # (B, r, 1)
    num_protected: int


def merge_sets(num_prefix: int) -> tuple[int, int]:
    """First index of the A set and of the B set: the even and the odd sequence positions after the prefix.

    Splitting by the parity of the position in the whole sequence (not in the non-prefix part) keeps ToMe's
    own split for one class token (A = 2, 4, ...; B = 1, 3, ...) and for a class + distillation token, so
    those models merge exactly as before; any number of prefix tokens (registers) stays out of the matching.
    """
    a_start = num_prefix + num_prefix % 2
    return a_start, 2 * num_prefix + 1 - a_start


def bipartite_soft_matching(metric: Tensor, r: int, num_protected: int = 1) -> MergePlan:
    """ToMe matching (spec 4.2): alternate A/B split, each A token's best cosine match in B, top-r edges.

    The first ``num_protected`` tokens (class, distillation and register tokens: every prefix token) take
    no part in the matching: they are never a source or a destination, and `merge_apply` puts them back in
    front, in place. ``r`` must not exceed the A set (half of the non-prefix tokens, rounded down).
    """
    a_start, b_start = merge_sets(num_protected)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, a_start::2], metric[:, b_start::2]
    scores = a @ b.transpose(-1, -2)
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = descending_order(node_max)[..., None]
    unm_idx = edge_idx[:, r:]
    src_idx = edge_idx[:, :r]
    dst_idx = node_idx[..., None].gather(1, src_idx)
    if num_protected:
        unm_idx = ascending_indices(unm_idx, dim=1)  # unmerged tokens in sequence order after the prefix
    return MergePlan(unm_idx, src_idx, dst_idx, num_protected)


def merge_apply(plan: MergePlan, x: Tensor, reduce: str | None = "sum") -> Tensor:
    """Apply a merge plan to (B, N, C): [prefix tokens, unmerged A, B with sources scatter-reduced in].

    ``reduce=None`` moves tokens without combining (for index bookkeeping). The prefix tokens come back
    unchanged at their own positions.
    """
    p = plan.num_protected
    a_start, b_start = merge_sets(p)
    a, b = x[:, a_start::2], x[:, b_start::2]
    c = x.shape[-1]
    unm = a.gather(1, plan.unm_idx.expand(-1, -1, c))
    if reduce is not None:
        src = a.gather(1, plan.src_idx.expand(-1, -1, c))
        b = b.scatter_reduce(1, plan.dst_idx.expand(-1, -1, c), src, reduce=reduce)
    return torch.cat([x[:, :p], unm, b], dim=1)


def merge_wavg(plan: MergePlan, x: Tensor, size: Tensor) -> tuple[Tensor, Tensor]:
    """Size-weighted average merge: returns merged tokens and their new sizes (B, N - r, 1)."""
    x = merge_apply(plan, x * size, "sum")
    size = merge_apply(plan, size, "sum")
    return x / size, size
