"""Rewards for steering and search: a batch of images (or clips) and prompts in, one score each out.

Example:
    >>> import torch
    >>> from diffaccel.rewards import FunctionReward
    >>> reward = FunctionReward(lambda images, prompts: images.mean(dim=(1, 2, 3)), name="brightness")
    >>> reward(torch.zeros(3, 2, 3, 8, 8), "a clip").shape   # clips: mean over sampled frames
    torch.Size([3])
"""

from .aesthetic import AestheticHead, AestheticReward
from .base import (
    FunctionReward,
    Reward,
    as_media_tensor,
    check_scores,
    nan_to_worst,
    sample_frame_indices,
)
from .clip import CLIPScoreReward
from .ensemble import WeightedReward
from .external import HPSv2Reward, ImageRewardReward, PickScoreReward
from .shapeworld import ShapeWorldReward

__all__ = [
    "AestheticHead",
    "AestheticReward",
    "CLIPScoreReward",
    "FunctionReward",
    "HPSv2Reward",
    "ImageRewardReward",
    "PickScoreReward",
    "Reward",
    "ShapeWorldReward",
    "WeightedReward",
    "as_media_tensor",
    "check_scores",
    "nan_to_worst",
    "sample_frame_indices",
]
