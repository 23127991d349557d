"""Weighted sums of rewards.

Example:
    >>> import torch
    >>> from diffaccel.rewards import FunctionReward
    >>> red = FunctionReward(lambda x, p: x[:, 0].mean(dim=(1, 2)), name="red")
    >>> blue = FunctionReward(lambda x, p: x[:, 2].mean(dim=(1, 2)), name="blue")
    >>> images = torch.zeros(1, 3, 4, 4); images[:, 0] = 1
    >>> WeightedReward([red, blue], [1.0, -2.0])(images, "x")
    tensor([1.])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import Reward


class WeightedReward(Reward):
    """``sum_i weights[i] * rewards[i]``; each member scores images and clips its own way.

    A NaN from any member makes the sum NaN (it is then the worst score, see
    :func:`~diffaccel.rewards.nan_to_worst`).
    """

    name = "ensemble"

    def __init__(self, rewards: Sequence[Reward], weights: Sequence[float] | None = None) -> None:
        rewards = list(rewards)
        weights = [1.0] * len(rewards) if weights is None else [float(w) for w in weights]
        if not rewards:
            raise ValueError("WeightedReward needs at least one reward")
        if len(weights) != len(rewards):
            raise ValueError(f"WeightedReward got {len(rewards)} rewards and {len(weights)} weights")
        self.rewards, self.weights = rewards, weights
        self.name = "+".join(f"{w:g}*{r.name}" for r, w in zip(rewards, weights))

    @property
    def device(self) -> torch.device:
        return self.rewards[0].device

    def to(self, device: str | torch.device) -> WeightedReward:
        for reward in self.rewards:
            reward.to(device)
        return self

    def _combine(self, media: torch.Tensor, prompts: list[str], clips: bool) -> torch.Tensor:
        total = torch.zeros(media.shape[0])
        for reward, weight in zip(self.rewards, self.weights):
            part = media.to(reward.device)
            scores = reward.score_clips(part, prompts) if clips else reward.score_images(part, prompts)
            total = total + weight * torch.as_tensor(scores).float().cpu()
        return total

    def score_images(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self._combine(images, prompts, clips=False)

    def score_clips(self, clips: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self._combine(clips, prompts, clips=True)
