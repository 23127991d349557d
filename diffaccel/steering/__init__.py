"""Inference-time scaling: FK particle steering, noise search, and stochastic flow sampling.

Example:
    >>> from diffaccel.steering import FKSteeringConfig
    >>> sorted(FKSteeringConfig(num_particles=4, resample_every=5).scoring_steps(20))
    [0, 5, 10, 15]
"""

from .fk import FKSteering, FKSteeringConfig, SteeringOutput, SteeringStats, steer
from .noise_search import NoiseSearchConfig, SearchCandidate, SearchOutput, search
from .sde import FlowMatchSDEScheduler
from .searcher import SEARCH_METHODS

__all__ = [
    "SEARCH_METHODS",
    "FKSteering",
    "FKSteeringConfig",
    "FlowMatchSDEScheduler",
    "NoiseSearchConfig",
    "SearchCandidate",
    "SearchOutput",
    "SteeringOutput",
    "SteeringStats",
    "search",
    "steer",
]
