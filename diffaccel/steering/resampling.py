"""Feynman-Kac potentials and particle resampling, as small functions over a particle batch.

Particles are laid out as ``groups x k`` (one group of ``k`` particles per prompt, as diffusers
orders ``num_images_per_prompt``); resampling never mixes groups. Everything is in log space.

Example:
    >>> import torch
    >>> state = PotentialState.start(4)
    >>> state.update("max", 2.0, torch.tensor([0.0, 1.0, 0.5, 0.25])).tolist()
    [0.0, 2.0, 1.0, 0.5]
    >>> resample_indices(torch.tensor([[0.0, 50.0, 0.0, 0.0]]), "systematic", torch.Generator().manual_seed(0))
    tensor([1, 1, 1, 1])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

POTENTIALS = ("max", "difference", "sum", "immediate")
RESAMPLING_METHODS = ("multinomial", "systematic")


@dataclass
class PotentialState:
    """Per-particle reward history and weights (all shape (N,), reindexed with the particles).

    ``last``/``maximum``/``total``: the previous, largest and summed intermediate rewards;
    ``log_potentials``: the sum of the log potentials along each particle's ancestry (for the
    final-step correction); ``log_weights``: the log weights accumulated since the last resampling.
    """

    last: torch.Tensor
    maximum: torch.Tensor
    total: torch.Tensor
    log_potentials: torch.Tensor
    log_weights: torch.Tensor

    @classmethod
    def start(cls, count: int) -> PotentialState:
        zeros = torch.zeros(count, dtype=torch.float64)
        return cls(zeros.clone(), torch.full_like(zeros, -torch.inf), zeros.clone(), zeros.clone(), zeros.clone())

    def update(self, potential: str, lmbda: float, rewards: torch.Tensor) -> torch.Tensor:
        """Add the potential of the intermediate ``rewards``; return the step's log potentials."""
        rewards = rewards.to(torch.float64)
        if potential == "immediate":
            log_g = lmbda * rewards
        elif potential == "difference":
            log_g = lmbda * (rewards - self.last)
        elif potential == "max":
            log_g = lmbda * torch.maximum(rewards, self.maximum)
        elif potential == "sum":
            log_g = lmbda * (rewards + self.total)
        else:
            raise ValueError(f"potential must be one of {POTENTIALS}, got {potential!r}")
        self.last, self.maximum, self.total = rewards, torch.maximum(self.maximum, rewards), self.total + rewards
        self.log_potentials = self.log_potentials + log_g
        self.log_weights = self.log_weights + log_g
        return log_g

    def final_log_weights(self, lmbda: float, rewards: torch.Tensor) -> torch.Tensor:
        """The final-step correction: ``lambda * r(x0) - sum of log potentials`` so the product of all
        potentials along a path is ``exp(lambda * r(x0))``; added to the pending weights."""
        return self.log_weights + lmbda * rewards.to(torch.float64) - self.log_potentials

    def reindex(self, indices: torch.Tensor) -> None:
        for name in ("last", "maximum", "total", "log_potentials", "log_weights"):
            setattr(self, name, getattr(self, name)[indices])


def effective_sample_size(log_weights: torch.Tensor) -> torch.Tensor:
    """ESS ``(sum w)^2 / sum w^2`` of each row of (groups, k) log weights."""
    weights = torch.softmax(log_weights, dim=-1)
    return 1.0 / (weights * weights).sum(dim=-1)


def resample_indices(log_weights: torch.Tensor, method: str, generator: torch.Generator) -> torch.Tensor:
    """Global particle indices (groups * k,) drawn within each row of (groups, k) log weights."""
    groups, k = log_weights.shape
    weights = torch.softmax(log_weights.to(torch.float64), dim=-1)
    if method == "multinomial":
        local = torch.multinomial(weights, k, replacement=True, generator=generator)
    elif method == "systematic":
        offsets = torch.rand(groups, 1, generator=generator, dtype=torch.float64)
        positions = (offsets + torch.arange(k, dtype=torch.float64)) / k
        cumulative = torch.cumsum(weights, dim=-1)
        cumulative[:, -1] = 1.0
        local = torch.searchsorted(cumulative, positions, right=True).clamp_(max=k - 1)
    else:
        raise ValueError(f"resampling must be one of {RESAMPLING_METHODS}, got {method!r}")
    return (local + torch.arange(groups).unsqueeze(1) * k).flatten()
