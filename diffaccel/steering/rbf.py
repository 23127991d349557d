"""Rollover Budget Forcing (Kim et al., "Inference-Time Scaling for Flow Models via Stochastic
Generation and Rollover Budget Forcing", 2025) for flow pipelines sampled with
:class:`~diffaccel.steering.FlowMatchSDEScheduler`.

One trajectory runs through the pipeline's own loop. After each scheduler step (but the last) the
wrapper draws candidate next states from the SDE, evaluates each with one *look-ahead* denoiser
call at the next timestep (the pipeline's last denoiser call replayed with the candidate; CFG rows
combined with the pipeline's guidance scale), scores the look-ahead x0, and takes the best
candidate as soon as one beats the current x0's reward. Every step gets an equal share of the
look-ahead budget; what a step does not spend rolls over to the next.

The budget counts the loop's own steps plus the look-ahead calls (a CFG pair counts once).
Supported: Flux (without true CFG), SD3, LTX and Wan 2.1; other loops are refused by name.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from diffusers.hooks import ModelHook

from ..errors import UnsupportedCombinationError, UnsupportedPipelineError
from ..seams import add_hook, remove_hook, wrapped_scheduler_step
from .latents import decode_latents
from .sde import FlowMatchSDEScheduler, is_flow_matching
from .searcher import SearchCandidate, Searcher

CAPTURE_HOOK = "diffaccel.steering.rbf"


class _CaptureHook(ModelHook):
    """Remembers the denoiser calls of the current step, and replays one with new samples."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        self.calls.append((args, kwargs))
        return self.fn_ref.original_forward(*args, **kwargs)

    def replay(self, samples: torch.Tensor, time_ratio: float) -> list[torch.Tensor]:
        """Run the step's denoiser calls on ``samples`` (M, ...) at ``time_ratio`` x their timestep;
        one (rows, M, ...) prediction per call."""
        if not self.calls or any(args for args, _ in self.calls):
            raise UnsupportedPipelineError("Rollover Budget Forcing needs the denoiser called with keyword arguments")
        return [self._replay_one(kwargs, samples, time_ratio) for _, kwargs in self.calls]

    def _replay_one(self, kwargs: dict[str, Any], samples: torch.Tensor, time_ratio: float) -> torch.Tensor:
        rows = kwargs["hidden_states"].shape[0]
        count = samples.shape[0]

        def expand(value: Any) -> Any:
            if not isinstance(value, torch.Tensor) or value.ndim == 0 or value.shape[0] != rows:
                return value
            return value.unsqueeze(1).expand(rows, count, *value.shape[1:]).reshape(rows * count, *value.shape[1:])

        call = {name: expand(value) for name, value in kwargs.items()}
        call["hidden_states"] = samples.to(kwargs["hidden_states"].dtype).repeat(rows, *[1] * (samples.ndim - 1))
        call["timestep"] = call["timestep"] * time_ratio
        output = self.fn_ref.original_forward(**call)
        prediction = output[0] if isinstance(output, (tuple, list)) else output.sample
        return prediction.view(rows, count, *prediction.shape[1:])


def _guided(pipe: Any, predictions: list[torch.Tensor]) -> torch.Tensor:
    """Combine replayed predictions the way the pipeline's loop does (with the running call's scale)."""
    if len(predictions) == 1 and predictions[0].shape[0] == 1:
        return predictions[0][0].float()
    if len(predictions) == 1 and predictions[0].shape[0] == 2:  # one CFG batch [uncond, cond] (SD3, LTX)
        uncond, cond = predictions[0].float()
        return uncond + pipe.guidance_scale * (cond - uncond)
    if len(predictions) == 2 and type(pipe).__name__.endswith("WanPipeline") and getattr(pipe, "transformer_2", None) is None:
        cond, uncond = predictions[0][0].float(), predictions[1][0].float()  # Wan 2.1: cond pass, then uncond
        return uncond + pipe.guidance_scale * (cond - uncond)
    raise UnsupportedPipelineError(
        f"Rollover Budget Forcing cannot replay {type(pipe).__name__}'s {len(predictions)} denoiser calls per step; "
        "supported: one call per step (Flux without true CFG, SD3, LTX, Wan without CFG) and Wan 2.1's CFG pair"
    )


def check_rbf_pipeline(pipe: Any) -> None:
    """Refuse, before any model work, a pipeline that Rollover Budget Forcing cannot run on.

    Example:
        >>> from diffaccel.testing import tiny_pipeline
        >>> check_rbf_pipeline(tiny_pipeline("sd"))
        Traceback (most recent call last):
        ...
        diffaccel.errors.UnsupportedPipelineError: Rollover Budget Forcing is for flow-matching models only (...
    """
    scheduler = pipe.scheduler
    if not is_flow_matching(scheduler):
        prediction = scheduler.config.get("prediction_type", "epsilon")
        raise UnsupportedPipelineError(
            f"Rollover Budget Forcing is for flow-matching models only (Flux, SD3, LTX, Wan); {type(pipe).__name__} "
            f"samples with {type(scheduler).__name__} ({prediction} prediction): search it with 'random', "
            "'zero-order' or 'paths'"
        )
    if not isinstance(scheduler, FlowMatchSDEScheduler) or scheduler.config.noise_level <= 0:
        raise UnsupportedPipelineError(
            "Rollover Budget Forcing needs a FlowMatchSDEScheduler with noise_level > 0: "
            "pipe.scheduler = FlowMatchSDEScheduler.from_config(pipe.scheduler.config)"
        )
    if getattr(pipe, "_diffaccel_features", ()):
        raise UnsupportedCombinationError("Rollover Budget Forcing's look-ahead calls cannot run on an accelerated pipeline")


def rollover_budget_forcing(searcher: Searcher) -> tuple[torch.Tensor, float, None]:
    """Run RBF within ``searcher``'s budget (see the module docs; :func:`check_rbf_pipeline` has
    accepted the pipeline); returns (media, reward, None)."""
    pipe, config = searcher.pipe, searcher.config
    scheduler = pipe.scheduler
    denoiser = pipe.transformer
    steps = searcher.steps
    extra, lookahead_steps = config.budget_nfe - steps, max(steps - 1, 1)

    def share(i: int) -> int:  # equal shares of the look-ahead budget that add up to all of it
        return extra * (i + 1) // lookahead_steps - extra * i // lookahead_steps

    generator = torch.Generator().manual_seed(config.seed)
    capture = _CaptureHook()
    state = {"carry": 0, "spent": 0, "step": 0}
    prompt = searcher.prompt

    def score(latents: torch.Tensor) -> torch.Tensor:
        media = decode_latents(pipe, latents, searcher.sizes)
        rewards = searcher.reward(media, [prompt] * latents.shape[0])
        searcher.evaluations += latents.shape[0]
        return torch.nan_to_num(rewards, nan=float("-inf"))

    def step(
        original_step: Callable[..., Any], model_output: torch.Tensor, timestep: Any, sample: torch.Tensor,
        *args: Any, **kwargs: Any,
    ) -> Any:
        index = scheduler.step_index if scheduler.step_index is not None else scheduler.index_for_timestep(timestep)
        sigma, sigma_next = float(scheduler.sigmas[index]), float(scheduler.sigmas[index + 1])
        output = original_step(model_output, timestep, sample, *args, **kwargs)
        i = state["step"]
        state["step"] += 1
        allowance = share(i) + state["carry"]
        if i == steps - 1 or allowance <= 0 or sigma_next <= 0:
            capture.calls = []
            return output
        x, v = sample.float(), model_output.float()
        current = float(score(x - sigma * v)[0])
        euler = x + (sigma_next - sigma) * v
        eps = x + (1.0 - sigma) * v
        c_eps, c_z = scheduler._noise_terms(sigma, sigma_next)
        best, best_reward = None, -float("inf")
        while allowance > 0:
            count = min(config.batch_size, allowance)
            noise = torch.randn((count, *x.shape[1:]), generator=generator).to(x)
            candidates = euler + c_eps * eps + c_z * noise
            prediction = _guided(pipe, capture.replay(candidates, sigma_next / sigma))
            rewards = score(candidates - sigma_next * prediction)
            allowance -= count
            state["spent"] += count
            for j in range(count):
                searcher.trace.append(SearchCandidate(i, float(rewards[j]), state["spent"] + (i + 1)))
            top = int(torch.argmax(rewards))
            if float(rewards[top]) > best_reward:
                best, best_reward = candidates[top : top + 1], float(rewards[top])
            if best_reward > current:
                break
        state["carry"] = allowance
        if best is not None:
            chosen = best.to(sample.dtype)
            if isinstance(output, tuple):
                output = (chosen, *output[1:])
            else:
                output.prev_sample = chosen
        capture.calls = []
        return output

    add_hook(denoiser, capture, CAPTURE_HOOK)
    try:
        with wrapped_scheduler_step(scheduler, step):
            media, rewards, _ = searcher.run_batch(1)
    finally:
        remove_hook(denoiser, CAPTURE_HOOK)
    searcher.nfe += state["spent"]
    searcher.trace.append(SearchCandidate(steps - 1, float(rewards[0]), searcher.nfe, accepted=True))
    return media[0], float(rewards[0]), None
