"""Modules a reduction adds to a timm block: the DynamicViT predictor and a per-stage holder."""
from __future__ import annotations

import torch
from torch import nn


class TokenPredictor(nn.Module):
    """DynamicViT's prediction module (spec 1.1): log p(keep), log p(drop) per spatial token.

    Local features (first C/2 channels) are joined with the masked mean of the global half, then a
    C -> C/2 -> C/4 -> 2 MLP ends in LogSoftmax. Channel 0 is keep.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.in_conv = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(dim, dim // 2), nn.GELU(),
            nn.Linear(dim // 2, dim // 4), nn.GELU(),
            nn.Linear(dim // 4, 2), nn.LogSoftmax(dim=-1),
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        z = self.in_conv(x)
        half = z.shape[-1] // 2
        local, glob = z[..., :half], z[..., half:]
        if mask is None:
            glob = glob.mean(dim=1, keepdim=True)
        else:
            m = mask.unsqueeze(-1).to(glob.dtype)
            glob = (glob * m).sum(dim=1, keepdim=True) / m.sum(dim=1, keepdim=True).clamp_min(1e-6)
        return self.out_conv(torch.cat([local, glob.expand(-1, z.shape[1], -1)], dim=-1))


class ReductionStage(nn.Module):
    """What one block needs for its reduction step: the static counts and any parameters or buffers.

    kept: tokens kept (non-prefix) when the step runs on the eval path; removed: tokens that go
    (for ToMe, r). The predictor exists for learned policies; random_scores for random pruning.
    """

    def __init__(self, block_index: int, kept: int, removed: int, dim: int, num_patches: int,
                 policy: str, treatment: str, placement: str, seed: int = 0) -> None:
        super().__init__()
        self.block_index = block_index
        self.kept = kept
        self.removed = removed
        self.policy = policy
        self.treatment = treatment
        self.placement = placement
        self.target = 1.0  # cumulative keep target of a learned stage (ratio loss)
        self.mode = ""  # PiToMe: 'bipartite' or 'protect' (set by apply from the block and the depth)
        self.margin = 0.0  # PiToMe's energy margin at this block
        self.predictor = TokenPredictor(dim) if policy == "predictor" else None
        if policy == "random":
            g = torch.Generator().manual_seed(seed * 1000 + block_index)
            # one fixed random ranking of patch positions per seed: seeded and batch-independent
            self.register_buffer("random_scores", torch.rand(num_patches, generator=g), persistent=False)
        else:
            self.random_scores = None

    def extra_repr(self) -> str:
        return (f"block={self.block_index}, policy={self.policy}, treatment={self.treatment}, "
                f"placement={self.placement}, kept={self.kept}, removed={self.removed}"
                + (f", mode={self.mode}" if self.mode else ""))
