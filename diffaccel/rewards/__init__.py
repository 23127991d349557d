"""Rewards for steering and search: a batch of images (or clips) and prompts in, one score each out.

Example:
    >>> import torch
    >>> from diffaccel.rewards import FunctionReward
    >>> reward = FunctionReward(lambda images, prompts: images.mean(dim=(1, 2, 3)), name="brightness")
    >>> reward(torch.zeros(3, 2, 3, 8, 8), "a clip").shape   # clips: mean over sampled frames
    torch.Size([3])

The reward classes load on first use (PEP 562), so reading a reward string
(:mod:`~diffaccel.rewards.spec`, what ``diffaccel generate --reward`` parses) imports no torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from .spec import REWARD_HELP, RewardSpecError, check_reward_spec, reward_from_spec

#: Where each reward class and helper lives (relative to this package).
_LAZY_NAMES: dict[str, str] = {
    **dict.fromkeys(("AestheticHead", "AestheticReward"), ".aesthetic"),
    **dict.fromkeys(
        ("FunctionReward", "Reward", "as_media_tensor", "check_scores", "nan_to_worst", "sample_frame_indices"), ".base"
    ),
    "CLIPScoreReward": ".clip",
    "WeightedReward": ".ensemble",
    **dict.fromkeys(("HPSv2Reward", "ImageRewardReward", "PickScoreReward"), ".external"),
    "ShapeWorldReward": ".shapeworld",
}

__all__ = [
    "REWARD_HELP",
    "AestheticHead",
    "AestheticReward",
    "CLIPScoreReward",
    "FunctionReward",
    "HPSv2Reward",
    "ImageRewardReward",
    "PickScoreReward",
    "Reward",
    "RewardSpecError",
    "ShapeWorldReward",
    "WeightedReward",
    "as_media_tensor",
    "check_reward_spec",
    "check_scores",
    "nan_to_worst",
    "reward_from_spec",
    "sample_frame_indices",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY_NAMES[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY_NAMES})
