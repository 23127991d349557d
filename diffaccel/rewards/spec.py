"""Rewards named by a short string (``shapeworld``, ``clip:MODEL[:PRETRAINED]``, ...), as
``diffaccel generate --reward`` takes them: checked without loading anything, then built.

Importing this module imports no torch; :func:`reward_from_spec` loads the reward's model.

Example:
    >>> check_reward_spec("shapeworld-layout")
    'shapeworld-layout'
    >>> reward_from_spec("shapeworld-layout").name
    'shapeworld-layout'
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ..errors import DiffaccelError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from .base import Reward

#: The reward strings; the default needs no weights (it parses ShapeWorld captions).
REWARD_HELP = (
    "shapeworld (default; ShapeWorld captions), shapeworld-layout (colors and positions only), "
    "clip:MODEL[:PRETRAINED] (open_clip), "
    "transformers-clip:FOLDER (a CLIPModel folder, or micro-clip: the bundled one), aesthetic:HEAD.safetensors, "
    "imagereward[:MODEL] (pip install image-reward), hpsv2[:VERSION] (pip install hpsv2), "
    "pickscore[:MODEL[:PROCESSOR]] (local folders or cached hub ids)"
)

#: Reward kinds backed by an optional package: kind -> (module, pip name).
_PACKAGES = {"imagereward": ("ImageReward", "image-reward"), "hpsv2": ("hpsv2", "hpsv2")}


class RewardSpecError(DiffaccelError, ValueError):
    """A reward string of no known kind, or one naming a folder or file that is not there."""


def check_reward_spec(spec: str) -> str:
    """``spec`` (see :data:`REWARD_HELP`), checked without loading anything: the kind is known, and
    the folder or file it names exists. Raises :class:`RewardSpecError` otherwise.

    Example:
        >>> check_reward_spec("transformers-clip:micro-clip")
        'transformers-clip:micro-clip'
        >>> check_reward_spec("aesthetic:missing.safetensors")
        Traceback (most recent call last):
        ...
        diffaccel.rewards.spec.RewardSpecError: no such aesthetic head file: missing.safetensors
        >>> check_reward_spec("hpsv2")
        Traceback (most recent call last):
        ...
        diffaccel.rewards.spec.RewardSpecError: reward 'hpsv2' needs the hpsv2 package: pip install hpsv2
        >>> check_reward_spec("nosuch")
        Traceback (most recent call last):
        ...
        diffaccel.rewards.spec.RewardSpecError: unknown reward 'nosuch'; use shapeworld (default; ...
    """
    kind, _, rest = spec.partition(":")
    if kind in ("shapeworld", "shapeworld-layout") and not rest:
        return spec
    if kind == "clip" and rest.partition(":")[0]:
        pretrained = rest.partition(":")[2]
        if (os.sep in pretrained or pretrained.endswith((".pt", ".bin", ".safetensors"))) and not os.path.isfile(pretrained):
            raise RewardSpecError(f"no such weights file: {pretrained}")
        return spec
    if kind == "transformers-clip" and rest:
        from ..micro_models import resolve_folder

        try:
            folder = resolve_folder(rest)
        except FileNotFoundError as err:
            raise RewardSpecError(str(err)) from None
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise RewardSpecError(f"not a transformers CLIPModel folder (no config.json): {rest}")
        return spec
    if kind == "aesthetic" and rest:
        if not os.path.isfile(rest):
            raise RewardSpecError(f"no such aesthetic head file: {rest}")
        return spec
    if kind in _PACKAGES:
        import importlib.util

        module, pip_name = _PACKAGES[kind]
        if importlib.util.find_spec(module) is None:
            raise RewardSpecError(f"reward {spec!r} needs the {module} package: pip install {pip_name}")
        return spec
    if kind == "pickscore" and rest.count(":") <= 1:
        return spec
    raise RewardSpecError(f"unknown reward {spec!r}; use {REWARD_HELP}")


def reward_from_spec(spec: str, device: str = "cpu") -> Reward:
    """Build the reward ``spec`` names (see :data:`REWARD_HELP`) on ``device``. An unknown kind
    raises :class:`RewardSpecError`; a reward model that cannot load raises what its loader raises
    (``OSError``, ``RuntimeError``, ``ValueError``).

    Example:
        >>> reward_from_spec("shapeworld").name, reward_from_spec("transformers-clip:micro-clip").name
        ('shapeworld', 'clip_score')
        >>> reward_from_spec("shapeworld:extra")
        Traceback (most recent call last):
        ...
        diffaccel.rewards.spec.RewardSpecError: unknown reward 'shapeworld:extra'; use shapeworld (default; ...
    """
    from .aesthetic import AestheticReward
    from .clip import CLIPScoreReward
    from .shapeworld import ShapeWorldReward

    kind, _, rest = spec.partition(":")
    if kind == "shapeworld" and not rest:
        return ShapeWorldReward()
    if kind == "shapeworld-layout" and not rest:
        return ShapeWorldReward(shapes=False)
    if kind == "clip" and rest:
        model, _, pretrained = rest.partition(":")
        return CLIPScoreReward.from_open_clip(model, pretrained=pretrained or "openai", device=device)
    if kind == "transformers-clip" and rest:
        return CLIPScoreReward.from_transformers(rest, device=device)
    if kind == "aesthetic" and rest:
        return AestheticReward.from_open_clip(rest, device=device)
    if kind == "imagereward":
        from .external import ImageRewardReward

        return ImageRewardReward(rest or "ImageReward-v1.0", device=device)
    if kind == "hpsv2":
        from .external import HPSv2Reward

        return HPSv2Reward(rest or "v2.1")
    if kind == "pickscore" and rest.count(":") <= 1:
        from .external import PickScoreReward

        model, _, processor = rest.partition(":")
        return PickScoreReward(model or "yuvalkirstain/PickScore_v1",
                               processor or "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", device=device)
    raise RewardSpecError(f"unknown reward {spec!r}; use {REWARD_HELP}")
