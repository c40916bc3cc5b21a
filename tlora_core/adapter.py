"""One representation for every trainer's T-LoRA: a per-rank low-rank pair.

For a binary prefix mask with ``r`` active ranks, every format's weight delta is::

    delta_W = up[:, :r*g] @ down[:r*g, :]

where the per-rank scales (``alpha / rank``, LyCORIS' ``lambda``, the strength is *not* in it)
are already folded into ``up``, and ``g`` is the number of columns per rank: 1 for plain
(vanilla) T-LoRA, 2 for the orthogonal variant, whose trained term and frozen base term are
interleaved column by column (``[P0 l0, -B0 b0, P1 l1, -B1 b1, ...]``). Interleaving makes the
active part of every format a *prefix*, so the runtime slices instead of multiplying by zeros and
has a single code path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class LowRankAdapter:
    name: str  # the module's name in the file, for messages
    up: torch.Tensor  # (out, rank * group), per-rank scales folded in
    down: torch.Tensor  # (rank * group, in)
    rank: int  # R, the length of the schedule's mask
    group: int = 1  # columns per rank: 1 plain, 2 ortho

    def __post_init__(self):
        k = self.rank * self.group
        if self.up.ndim != 2 or self.down.ndim != 2 or self.up.shape[1] != k or self.down.shape[0] != k:
            raise ValueError(
                f"{self.name}: inconsistent low-rank pair: up {tuple(self.up.shape)}, "
                f"down {tuple(self.down.shape)}, rank {self.rank} x {self.group}"
            )

    @property
    def out_features(self) -> int:
        return self.up.shape[0]

    @property
    def in_features(self) -> int:
        return self.down.shape[1]

    def delta_weight(self, active_rank: Optional[int] = None) -> torch.Tensor:
        """The (out, in) weight delta with the first ``active_rank`` ranks on (all if None)."""
        k = self.rank * self.group if active_rank is None else active_rank * self.group
        return self.up[:, :k].float() @ self.down[:k].float()


def plain(name: str, up: torch.Tensor, down: torch.Tensor, scale: float | torch.Tensor = 1.0) -> LowRankAdapter:
    """A vanilla T-LoRA: delta = scale * up diag(m) down.

    ``scale`` is a number (``alpha / rank``) or a per-rank vector (e.g. LyCORIS' ``lambda * alpha / rank``).
    """
    up = up.float()
    down = down.float()
    rank = down.shape[0]
    scale = torch.as_tensor(scale, dtype=torch.float32).reshape(-1)
    return LowRankAdapter(name, up * scale, down, rank, 1)


def ortho(
    name: str,
    p: torch.Tensor,
    lam: torch.Tensor,
    q: torch.Tensor,
    base_p: torch.Tensor,
    base_lam: torch.Tensor,
    base_q: torch.Tensor,
    scale: float = 1.0,
) -> LowRankAdapter:
    """An orthogonal T-LoRA: delta = scale * (P diag(lam m) Q - P0 diag(lam0 m) Q0).

    Stored as a rank-2R pair with trained and base columns interleaved (see module docstring).
    """
    rank = q.shape[0]
    lam = lam.float().reshape(-1)
    base_lam = base_lam.float().reshape(-1)
    if not (p.shape[1] == base_p.shape[1] == rank and base_q.shape[0] == rank and lam.numel() == base_lam.numel() == rank):
        raise ValueError(
            f"{name}: ortho terms disagree on the rank: q {tuple(q.shape)}, p {tuple(p.shape)}, "
            f"lambda {lam.numel()}, base_q {tuple(base_q.shape)}, base_p {tuple(base_p.shape)}, base_lambda {base_lam.numel()}"
        )
    up = torch.stack([p.float() * lam, -base_p.float() * base_lam], dim=2).reshape(p.shape[0], 2 * rank)
    down = torch.stack([q.float(), base_q.float()], dim=1).reshape(2 * rank, q.shape[1])
    return LowRankAdapter(name, up * scale, down, rank, 2)


@dataclass
class BoundAdapter:
    """An adapter placed on one module of a model: ``module`` is the dotted path of the layer
    inside the diffusion model (e.g. ``double_blocks.0.img_attn.qkv``); ``out_slice`` is
    ``(offset, size)`` on the output features when the target is a slice of a fused layer
    (Flux qkv / linear1), else None."""

    module: str
    out_slice: Optional[tuple[int, int]]
    adapter: LowRankAdapter
