"""``diffaccel.evaluate``: every variant of a pipeline on the same prompts and seeds, side by side.

The run, in order:

1. Everything is checked before any model work: the prompts (:func:`load_prompts`), the variants
   (:func:`parse_variants`; one that does not apply to the model's denoiser, or a peer whose package
   is missing, is refused), the metrics, the seeds, the call settings and the output folder.
2. The model loads; each variant is bound to it (:func:`build_attachment`).
3. Samples are made batch by batch; in each batch every variant runs in turn on the same prompts
   and seeds (the untouched one first), so variants are timed interleaved, round by round, under
   the same machine load. Each process warms every variant up once (one untimed call) first. Each
   sample is written as it is made (``<run>/<variant>/``), then its record (metrics, seconds, NFE,
   peak memory) is appended to ``samples.jsonl``; what is recorded is skipped on a rerun.
4. Rank 0 computes the set metrics (FID), writes ``summary.json``, ``report.md`` and the plots.

Under ``torchrun`` / ``accelerate launch`` (``WORLD_SIZE`` > 1) the batches are dealt out to the
processes (gloo on the CPU, one GPU each with ``LOCAL_RANK``), each writing its own shard; rank 0
merges them after a barrier, then times the variants alone on one process (``timing.json``:
a warm-up and ``timing_rounds`` interleaved rounds of the first batch), since timings taken while
other processes compete for the machine would distort the ratios.

Example:
    >>> import tempfile
    >>> summary = evaluate("diffaccel/tiny-random-sd", ["a red circle", "a blue square"],
    ...                    {"reuse": "encoder-reuse:uniform:2"}, out_dir=tempfile.mkdtemp(),
    ...                    metrics=["psnr"], num_inference_steps=4, height=64, width=64, progress=False)
    >>> list(summary["variants"]), summary["variants"]["reuse"]["n"], summary["variants"]["reuse"]["nfe_mean"]
    (['untouched', 'reuse'], 2, 8.0)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Union

import numpy as np
import torch
from PIL import Image

from ..errors import DiffaccelError
from .attachments import Attachment, build_attachment, module_bytes
from .measure import measured_call
from .metrics import FeatureFID, summarize
from .prompts import PromptRecord, PromptSource, load_prompts
from .runs import RunFolder, _atomic_write, _json_bytes, dist_env
from .scoring import (
    DEFAULT_CLIP_MODEL,
    SET_METRICS,
    SampleScorer,
    check_metrics,
    frechet_distances,
    shapeworld_prompts,
    to_uint8,
)
from .variants import (
    UNTOUCHED,
    Variant,
    VariantSpecError,
    check_variant_applies,
    missing_peer_packages,
    parse_spec,
    parse_variants,
)

__all__ = ["EvaluationError", "evaluate"]

VariantsLike = Union[Mapping[str, Any], Sequence[str], None]

#: What the report says of the timing.
TIMING_ONE_PROCESS = ("one process; a warm-up call per variant, then the variants interleaved batch by batch on the "
                      "same inputs; speedup = median over batches of untouched seconds / variant seconds")
TIMING_RANK0 = ("the samples were made by {n} processes; speed was measured afterwards by rank 0 alone: a warm-up "
                "call per variant, then {rounds} interleaved rounds on the first batch; speedup = median over rounds "
                "of untouched seconds / variant seconds")


#: Candidate ``j`` of a steering variant's sample with seed ``s`` starts from seed ``s + PARTICLE_SEED_STRIDE * j``.
PARTICLE_SEED_STRIDE = 1_000_003

#: Call settings of the bundled and tiny models when not given (as ``diffaccel generate`` uses them).
BUILTIN_CALL_DEFAULTS: dict[str, dict[str, Any]] = {
    "micro-sd": {"guidance_scale": 5.0},
    "micro-video": {"num_frames": 9},
    "diffaccel/tiny-random-wan": {"num_frames": 9},
}


class EvaluationError(DiffaccelError, ValueError):
    """An evaluation's inputs are wrong (refused before any model work)."""


def _variant_from_value(name: str, value: Any) -> Variant:
    """A ``variants`` mapping value: a spec string, None, a :class:`Variant`, a config or a list of configs."""
    from ..features.base import FeatureConfig
    from ..steering.fk import FKSteeringConfig
    from ..steering.searcher import NoiseSearchConfig

    if isinstance(value, Variant):
        return Variant(name, value.spec, value.configs, value.peer, value.peer_options, value.steering)
    if value is None:
        return Variant(name, "none")
    if isinstance(value, str):
        return parse_spec(name, value)
    steering_types = (FKSteeringConfig, NoiseSearchConfig)
    items = [value] if isinstance(value, (FeatureConfig, *steering_types)) else list(value)
    configs = [item for item in items if isinstance(item, FeatureConfig)]
    steering = [item for item in items if isinstance(item, steering_types)]
    if len(configs) + len(steering) != len(items) or len(steering) > 1:
        raise VariantSpecError(f"variant {name!r}: expected a spec string, None, a diffaccel config or a list of "
                               f"configs with at most one FKSteeringConfig or NoiseSearchConfig, got {value!r}")
    named = [(getattr(item, "name", type(item).__name__), item) for item in items]
    spec = "+".join(f"{label}({json.dumps(item.to_dict(), sort_keys=True)})" for label, item in named) or "none"
    return Variant(name, spec, tuple(configs), steering=steering[0] if steering else None)


def _variants(variants: VariantsLike, grid: str | os.PathLike | None) -> list[Variant]:
    if variants is None or isinstance(variants, (str, Sequence)):
        return parse_variants([variants] if isinstance(variants, str) else list(variants or ()), grid)
    if not isinstance(variants, Mapping):
        raise VariantSpecError(f"variants must map names to specs or be NAME=SPEC strings, got {type(variants).__name__}")
    listed = [_variant_from_value(str(name), value) for name, value in variants.items()]
    chosen = [Variant(UNTOUCHED, "none")]
    taken = {UNTOUCHED}
    for variant in listed + parse_variants([], grid)[1:]:
        if variant.name == UNTOUCHED and variant.untouched:
            continue
        if variant.name.lower() in taken:
            raise VariantSpecError(f"variant {variant.name!r} ({variant.spec!r}): the name is taken by another "
                                   "variant (names are folder names)")
        taken.add(variant.name.lower())
        chosen.append(variant)
    return chosen


def _steering_reward(variants: Sequence[Variant], info: Any, records: Sequence[PromptRecord], given: str | None,
                     clip_model: str) -> str | None:
    """The reward spec steering variants use (checked; None without them): ``given``, else the
    ShapeWorld verifier for ShapeWorld prompts, else the CLIP score's model."""
    from ..rewards.spec import RewardSpecError, check_reward_spec

    steering = [v for v in variants if v.steering is not None]
    if not steering:
        if given is not None:
            warnings.warn("evaluate: steering_reward is unused: no variant steers (fk:, best-of:, search:)", stacklevel=3)
        return None
    for variant in steering:
        if getattr(variant.steering, "method", None) == "rbf" and info is not None and not info.flow:
            raise VariantSpecError(f"variant {variant.name!r} ({variant.spec!r}): RBF search is for flow-matching "
                                   f"models only; this model's scheduler is {info.scheduler}")
    spec = given or ("shapeworld" if shapeworld_prompts(r.prompt for r in records) else clip_model)
    try:
        return check_reward_spec(spec)
    except RewardSpecError as err:
        raise EvaluationError(f"steering_reward: {err}") from None


def _seeds(seeds: Sequence[int]) -> list[int]:
    values = [seeds] if isinstance(seeds, int) else list(seeds)
    if not values or any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in values):
        raise EvaluationError(f"seeds must be a non-empty list of integers >= 0, got {seeds!r}")
    if len(set(values)) != len(values):
        raise EvaluationError(f"seeds must not repeat, got {values}")
    return values


def _check_out_dir(out_dir: str | os.PathLike) -> Path:
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise EvaluationError(f"out_dir {path}: exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        raise EvaluationError(f"out_dir {path}: cannot write there ({err.strerror or err})") from None
    return path


def _check_call(info: Any, model: str, call: Mapping[str, Any], batch_size: int) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise EvaluationError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    steps = call.get("num_inference_steps")
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
        raise EvaluationError(f"num_inference_steps must be an integer >= 1, got {steps!r}")
    reserved = {"prompt", "generator", "output_type", "return_dict"} & set(call)
    if reserved:
        raise EvaluationError(f"{sorted(reserved)} are set by the evaluation (prompts, seeds, samples); do not pass them")
    if info is None:
        return
    limit = info.num_train_timesteps
    if steps is not None and not info.flow and limit and steps > limit:
        raise EvaluationError(f"num_inference_steps={steps}: {model}'s {info.scheduler} has {limit} training "
                              f"timesteps, so at most {limit} steps")
    multiple = info.size_multiple
    for name in ("height", "width"):
        value = call.get(name)
        if value is not None and (not isinstance(value, int) or value < 1 or (multiple and value % multiple)):
            raise EvaluationError(f"{name}={value!r}: {model} needs a positive multiple of {multiple or 1}")
    frames, step = call.get("num_frames"), info.frame_step
    if frames is not None and (not isinstance(frames, int) or frames < 1 or (step and (frames - 1) % step)):
        raise EvaluationError(f"num_frames={frames!r}: {model} needs {step or 1}k + 1 frames")


def _scheduler_class(name: str | None) -> Any:
    if name is None:
        return None
    import diffusers

    scheduler = getattr(diffusers, name, None)
    if not (isinstance(scheduler, type) and issubclass(scheduler, diffusers.SchedulerMixin)):
        raise EvaluationError(f"scheduler {name!r} is not a diffusers scheduler class (e.g. DDIMScheduler, "
                              "DPMSolverMultistepScheduler, EulerDiscreteScheduler)")
    return scheduler


def _fingerprint(records: Sequence[PromptRecord]) -> str:
    text = json.dumps([[r.prompt, r.seed, json.loads(json.dumps(r.metadata, default=list))] for r in records])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _pipeline_fingerprint(pipe: Any) -> str:
    """A short hash of a pipeline object's component classes, configs and denoiser weights, so a run
    folder is never resumed with another in-memory pipeline."""
    digest = hashlib.sha256(type(pipe).__name__.encode())
    for name, component in sorted(pipe.components.items()):
        config = getattr(component, "config", None)
        config = config.to_dict() if hasattr(config, "to_dict") else dict(config) if isinstance(config, Mapping) else {}
        digest.update(f"{name}:{type(component).__name__}:{json.dumps(config, sort_keys=True, default=str)}".encode())
    from ..seams import denoiser

    with torch.no_grad():
        for tensor in denoiser(pipe).state_dict().values():
            digest.update(np.float64(tensor.double().sum().item()).tobytes())
    return digest.hexdigest()[:12]


def _keys(records: Sequence[PromptRecord], seeds: Sequence[int]) -> list[tuple[int, int]]:
    """(prompt index, seed) of every sample: each run seed for every prompt without its own seed."""
    keys = [(i, seed) for seed in seeds for i, r in enumerate(records) if r.seed is None]
    return keys + [(i, r.seed) for i, r in enumerate(records) if r.seed is not None]


def _json_call(call: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in call.items():
        try:
            json.dumps(value)
        except TypeError:
            raise EvaluationError(f"call setting {key}={value!r} is not a plain value (numbers, strings, lists); "
                                  "the run folder records every setting") from None
        out[key] = value
    return out


class _Generated(NamedTuple):
    samples: np.ndarray
    cost: Any
    features: Any
    extras: list[dict[str, Any]]


class _Run:
    """The state of one evaluation while it runs (built by :func:`evaluate`)."""

    def __init__(self, pipe: Any, info: Any, folder: RunFolder, records: Sequence[PromptRecord],
                 variants: Sequence[Variant], attachments: Mapping[str, Attachment], call: Mapping[str, Any],
                 scorer: SampleScorer, device: str, warmup: bool, steering_reward: Any = None) -> None:
        self.pipe, self.info, self.folder, self.records = pipe, info, folder, records
        self.variants, self.attachments, self.call = variants, attachments, call
        self.scorer, self.device, self.steering_reward = scorer, device, steering_reward
        self.video = bool(info is not None and info.video)
        self.warm: set[str] = set() if warmup else {v.name for v in variants}

    def generate(self, variant: Variant, batch: Sequence[tuple[int, int]]) -> _Generated:
        """The 8-bit samples of ``batch`` with ``variant`` attached, the call's cost, what the diffaccel
        features report of it (``pipe.acceleration_stats``; None for other variants) and, for a
        steering variant, the steering reward of each chosen sample."""
        prompts = [self.records[i].prompt for i, _ in batch]
        attachment = self.attachments[variant.name]
        attachment.attach()
        try:
            call = {**self.call, **getattr(attachment, "call_kwargs", {})}
            if variant.steering is None:
                generators = [torch.Generator("cpu").manual_seed(seed) for _, seed in batch]
                out, cost = measured_call(self.pipe, lambda: self.pipe(
                    prompts, generator=generators, output_type="np", **call), samples=len(batch))
                samples, extras = np.asarray(out.frames if self.video else out.images), [{} for _ in batch]
            else:
                (samples, extras), cost = measured_call(
                    self.pipe, lambda: self._steer(variant.steering, prompts, [seed for _, seed in batch], call),
                    samples=len(batch))
            stats = getattr(self.pipe, "acceleration_stats", None) if variant.configs else None
            features = stats.to_dict()["features"] if stats is not None else None
        finally:
            attachment.detach()
        return _Generated(to_uint8(samples), cost, features, extras)

    def _steer(self, config: Any, prompts: list[str], seeds: list[int], call: Mapping[str, Any]
               ) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """FK (or best-of-N) over the batch in one call, or a search per prompt: the chosen samples
        (float) and their steering rewards. Candidate ``j`` of seed ``s`` starts from the noise of
        seed ``s + PARTICLE_SEED_STRIDE * j`` (candidate 0: the untouched sample's noise)."""
        from ..steering.fk import FKSteeringConfig, steer
        from ..steering.noise_search import search

        if isinstance(config, FKSteeringConfig):
            k = config.num_particles
            generators = [torch.Generator("cpu").manual_seed(seed + PARTICLE_SEED_STRIDE * j)
                          for seed in seeds for j in range(k)]
            out = steer(self.pipe, config, self.steering_reward)(prompts, generator=generators, output_type="np",
                                                                 **call)
            best = out.best_indices
            return np.stack([np.asarray(out.samples[i]) for i in best]), \
                [{"steering_reward": float(out.rewards[i])} for i in best]
        chosen, extras = [], []
        for prompt, seed in zip(prompts, seeds):
            found = search(self.pipe, prompt, config, self.steering_reward,
                           generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **call)
            chosen.append(np.asarray(found.sample))
            extras.append({"steering_reward": float(found.reward)})
        return np.stack(chosen), extras

    def warm_up(self, variant: Variant, batch: Sequence[tuple[int, int]]) -> None:
        if variant.name not in self.warm:
            self.generate(variant, batch)
            self.warm.add(variant.name)

    def save(self, variant: str, prompt_index: int, seed: int, sample: np.ndarray) -> str:
        """Write one sample (PNG; a clip as a GIF plus its frames stacked in a PNG); its relative path."""
        if sample.ndim == 4:
            self.folder.save_clip(variant, prompt_index, seed, [Image.fromarray(frame) for frame in sample])
            self.folder.save_image(variant, prompt_index, seed, Image.fromarray(np.concatenate(list(sample), axis=0)))
            suffix = ".gif"
        else:
            self.folder.save_image(variant, prompt_index, seed, Image.fromarray(sample))
            suffix = ".png"
        return self.folder.sample_path(variant, prompt_index, seed, suffix).relative_to(self.folder.path).as_posix()

    def load(self, variant: str, prompt_index: int, seed: int, frames: int | None) -> np.ndarray:
        """A recorded sample back as uint8 (``frames``: how many a clip has)."""
        array = np.asarray(Image.open(self.folder.sample_path(variant, prompt_index, seed, ".png")).convert("RGB"))
        return array.reshape(frames, -1, *array.shape[1:]) if frames else array

    def run_batch(self, index: int, batch: Sequence[tuple[int, int]], bar: Any) -> None:
        done = self.folder.done()
        reference: np.ndarray | None = None
        for variant in self.variants:
            missing = [key for key in batch if (variant.name, *key) not in done]
            untouched = variant.name == UNTOUCHED
            if not missing:
                if untouched:  # the reference of the others, read back from the run folder
                    frames = self._frames(batch[0])
                    reference = np.stack([self.load(UNTOUCHED, i, s, frames) for i, s in batch])
                bar.update(1)
                continue
            self.warm_up(variant, batch)
            samples, cost, features, extras = self.generate(variant, batch)
            if untouched:
                reference = samples
            scores = self.scorer.score(samples, [self.records[i].prompt for i, _ in batch],
                                       None if untouched else reference)
            for position, (prompt_index, seed) in enumerate(batch):
                if (prompt_index, seed) not in missing:
                    continue
                sample = samples[position]
                path = self.save(variant.name, prompt_index, seed, sample)
                self.folder.record(variant.name, prompt_index, seed, {
                    "prompt": self.records[prompt_index].prompt, "file": path,
                    "frames": int(sample.shape[0]) if sample.ndim == 4 else None,
                    **scores[position], **extras[position], "batch": index, "batch_size": len(batch),
                    "seconds": cost.seconds / len(batch), "batch_seconds": cost.seconds,
                    "nfe": cost.nfe, "peak_memory_mb": cost.peak_memory_mb,
                    "processes": self.folder.world_size, "features": features,
                })
            bar.update(1)

    def _frames(self, key: tuple[int, int]) -> int | None:
        record = next(r for r in self.folder.records() if (r["variant"], r["prompt_index"], r["seed"]) == (UNTOUCHED, *key))
        return record.get("frames")


def _batches(keys: Sequence[tuple[int, int]], batch_size: int) -> list[list[tuple[int, int]]]:
    return [list(keys[start:start + batch_size]) for start in range(0, len(keys), batch_size)]


def _paired_speedups(records: Sequence[Mapping[str, Any]], key: str = "batch") -> dict[str, float | None]:
    """Per variant: the median over batches (or rounds) of untouched seconds / variant seconds."""
    seconds: dict[str, dict[int, float]] = {}
    for record in records:
        if record.get("batch_seconds") is not None:
            seconds.setdefault(record["variant"], {})[record[key]] = record["batch_seconds"]
    base = seconds.get(UNTOUCHED, {})
    speedups: dict[str, float | None] = {}
    for variant, by_batch in seconds.items():
        ratios = [base[b] / s for b, s in by_batch.items() if b in base and s > 0]
        speedups[variant] = statistics.median(ratios) if ratios else None
    return speedups


def _time_alone(run: _Run, batch: Sequence[tuple[int, int]], rounds: int) -> list[dict[str, Any]]:
    """Rank 0's timing of a multi-process run: warm-up, then ``rounds`` interleaved rounds on ``batch``."""
    rows = []
    for variant in run.variants:
        run.warm_up(variant, batch)
    for round_index in range(rounds):
        for variant in run.variants:
            cost = run.generate(variant, batch).cost
            rows.append({"variant": variant.name, "round": round_index, "batch_seconds": cost.seconds,
                         "seconds": cost.seconds / len(batch), "peak_memory_mb": cost.peak_memory_mb})
    return rows


def _device_line(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(torch.device(device))} (CUDA)"
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} torch threads)"


def _summary(run: _Run, spec: Mapping[str, Any], metrics: Sequence[str], weight_bytes: Mapping[str, int],
             descriptions: Mapping[str, Any], timing: Sequence[Mapping[str, Any]] | None) -> dict[str, Any]:
    records = run.folder.records()
    order = {v.name: n for n, v in enumerate(run.variants)}
    records.sort(key=lambda r: (order.get(r["variant"], len(order)), r["prompt_index"], r["seed"]))
    per_sample = [m for m in metrics if m not in SET_METRICS]
    criteria = sorted({k for r in records for k in r if k.startswith("verifier.")})
    steered = ["steering_reward"] if any(r.get("steering_reward") is not None for r in records) else []
    table = summarize(records, per_sample + steered + criteria)
    speedups = _paired_speedups(timing, "round") if timing else _paired_speedups(records)
    seconds_source = timing if timing else records
    fid: dict[str, float | None] = {}
    fid_name = None
    if "fid" in metrics:
        features = FeatureFID()
        fid_name = features.extractor_name
        sets = {v.name: np.stack([run.load(v.name, r["prompt_index"], r["seed"], r.get("frames"))
                                  for r in records if r["variant"] == v.name]) for v in run.variants}
        fid = frechet_distances(sets, UNTOUCHED, features)
    variants = {}
    for variant in run.variants:
        rows = table.get(variant.name, {"n": 0, "metrics": {}})
        group = [r for r in records if r["variant"] == variant.name]
        seconds = [r["seconds"] for r in seconds_source if r["variant"] == variant.name]
        peaks = [r["peak_memory_mb"] for r in seconds_source if r["variant"] == variant.name
                 and r.get("peak_memory_mb") is not None]
        kind = variant.kind
        variants[variant.name] = {
            "spec": variant.spec, "kind": kind, "n": rows["n"], "metrics": rows["metrics"],
            "speedup": speedups.get(variant.name), "seconds_median": statistics.median(seconds) if seconds else None,
            "nfe_mean": float(np.mean([r["nfe"] for r in group])) if group else None,
            "weight_bytes": weight_bytes.get(variant.name), "peak_memory_mb": max(peaks) if peaks else None,
            "fid": fid.get(variant.name), "settings": descriptions.get(variant.name, {}),
        }
    return {
        "model": spec["model"], "pipeline": type(run.pipe).__name__, "prompts": spec["prompts"],
        "seeds": spec["seeds"], "call": spec["call"], "batch_size": spec["batch_size"],
        "device": _device_line(run.device), "threads": torch.get_num_threads(),
        "processes": spec.get("processes_seen", 1),
        "timing": TIMING_ONE_PROCESS if timing is None else TIMING_RANK0.format(n=spec.get("processes_seen"),
                                                                               rounds=len(timing) // max(1, len(run.variants))),
        "fid_features": f"{fid_name} image features (FIDs of different feature extractors are not comparable; "
                        f"against the untouched variant's samples)" if fid_name else None,
        "metrics": [*per_sample, *steered, *criteria], "main_metrics": [*per_sample, *steered],
        "set_metrics": [m for m in metrics if m in SET_METRICS],
        "variants": variants,
    }


def _init_distributed(world_size: int, device: str) -> None:
    import torch.distributed as dist

    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")


def _barrier(world_size: int) -> None:
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def evaluate(model: Any, prompts: PromptSource, variants: VariantsLike = None, *, out_dir: str | os.PathLike,
             seeds: Sequence[int] = (0,), metrics: Sequence[str] | None = None, grid: str | os.PathLike | None = None,
             batch_size: int = 4, device: str | None = None, dtype: torch.dtype = torch.float32,
             scheduler: str | None = None, warmup: bool = True, timing_rounds: int = 3,
             clip_model: str = DEFAULT_CLIP_MODEL, steering_reward: str | None = None, progress: bool = True,
             **call_kwargs: Any) -> dict[str, Any] | None:
    """Evaluate ``variants`` of ``model`` on ``prompts`` x ``seeds`` into the run folder ``out_dir``
    (see the module docs for the run and the folder); returns the summary (None on ranks other than 0).

    Args:
        model: a diffusers folder or hub id (image or video pipeline), ``micro-sd``, ``micro-video``,
            a tiny random model (``diffaccel/tiny-random-sd``, ``diffaccel/tiny-random-wan``), or a
            pipeline object (evaluated on its own device and dtype; ``device``/``dtype`` are then unused).
        prompts: a list of strings, a prompt file or a built-in set (:func:`load_prompts`).
        variants: ``{name: spec}`` where a spec is a spec string (:mod:`.variants`), a diffaccel
            config, a list of configs or None (untouched), or ``NAME=SPEC`` strings. The untouched
            variant is always evaluated, first.
        seeds: the seeds of every prompt without its own seed.
        metrics: metric names (:mod:`.scoring`); None: every metric that applies.
        grid: a JSON or YAML file of more variants.
        batch_size: prompts per pipeline call.
        device, dtype: where and how the model runs (default: CUDA when available, float32).
        scheduler: a diffusers scheduler class name to use instead of the model's.
        warmup: run one untimed call per variant before timing it.
        timing_rounds: rounds of rank 0's timing in a multi-process run.
        clip_model: the reward spec of ``clip_score``'s CLIP model (micro-CLIP by default).
        steering_reward: the reward spec steering variants steer by (default: the ShapeWorld
            verifier for ShapeWorld prompts, else ``clip_model``); each record holds the chosen
            sample's ``steering_reward``.
        progress: show progress bars and the summary lines.
        **call_kwargs: the pipeline call's settings (``num_inference_steps``, ``guidance_scale``,
            ``height``, ``width``, ``num_frames``, ``negative_prompt``...).

    Raises:
        EvaluationError, VariantSpecError, PromptFileError: bad input, before any model work.
        RunSpecMismatch: ``out_dir`` holds a run with a different spec.
    """
    from ..loading import BUILTIN_INFO, ModelInfo, ModelLoadError, describe_model, load_any_pipeline, resolve_device

    records = load_prompts(prompts)
    chosen = _variants(variants, grid)
    seed_list = _seeds(seeds)
    try:
        metric_list = check_metrics(metrics, [r.prompt for r in records])
    except ValueError as err:
        raise EvaluationError(str(err)) from None
    missing = missing_peer_packages(chosen)
    if missing:
        listed = ", ".join(f"{name} needs {module}" for name, module in missing.items())
        raise VariantSpecError(f"peer packages are not installed ({listed}): pip install 'diffaccel[eval]'")
    scheduler_class = _scheduler_class(scheduler)
    loaded = None if isinstance(model, str) else model
    if loaded is not None:  # a pipeline object: evaluated where it is, as it is
        if not hasattr(loaded, "components"):
            raise EvaluationError(f"model must be a name, a folder, a hub id or a diffusers pipeline, got {model!r}")
        if device is not None or dtype != torch.float32:
            warnings.warn("evaluate: device and dtype are unused with a pipeline object (it runs where it is); "
                          "move it with pipe.to(...) first", stacklevel=2)
        info, device, dtype = ModelInfo.from_pipeline(loaded), str(loaded.device), loaded.dtype
        model = getattr(loaded, "name_or_path", None) or f"{type(loaded).__name__} (in memory)"
        model = f"{model} [{_pipeline_fingerprint(loaded)}]"
    else:
        try:
            info = describe_model(model, BUILTIN_INFO, flag="model")
            device = resolve_device(device)
        except ModelLoadError as err:
            raise EvaluationError(str(err)) from None
    if info is not None and info.denoiser is not None:
        for variant in chosen:
            check_variant_applies(variant, info.denoiser)
    reward_spec = _steering_reward(chosen, info, records, steering_reward, clip_model)
    call = _json_call({**BUILTIN_CALL_DEFAULTS.get(model, {}), **call_kwargs})
    _check_call(info, model, call, batch_size)
    out_path = _check_out_dir(out_dir)
    rank, world_size = dist_env()
    spec = {
        "model": model, "prompts": {"source": str(prompts) if isinstance(prompts, (str, os.PathLike)) else "list",
                                    "count": len(records), "fingerprint": _fingerprint(records)},
        "variants": {v.name: v.spec for v in chosen}, "seeds": seed_list, "call": call, "scheduler": scheduler,
        "batch_size": batch_size, "metrics": metric_list, "dtype": str(dtype).replace("torch.", ""),
        "clip_model": clip_model if "clip_score" in metric_list else None, "steering_reward": reward_spec,
    }
    folder = RunFolder(out_path, spec, rank=rank, world_size=world_size)
    scorer = SampleScorer(metric_list, clip_model=clip_model, device=device)
    reward = None
    if reward_spec is not None:
        from ..rewards.spec import reward_from_spec

        reward = reward_from_spec(reward_spec, device)

    _init_distributed(world_size, device)
    if world_size > 1 and device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
    if loaded is not None:
        pipe, extra_call = loaded, {}
    else:
        try:
            pipe, info, extra_call = load_any_pipeline(model, device, dtype)
        except ModelLoadError as err:
            raise EvaluationError(str(err)) from None
    for variant in chosen:
        check_variant_applies(variant, info.denoiser)
    pipe.set_progress_bar_config(disable=True)
    if scheduler_class is not None:
        pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    attachments = {v.name: build_attachment(pipe, v) for v in chosen}
    run = _Run(pipe, info, folder, records, chosen, attachments, {**extra_call, **call}, scorer, device, warmup,
               reward)

    keys = _keys(records, seed_list)
    batches = _batches(keys, batch_size)
    mine = [(n, batch) for n, batch in enumerate(batches) if n % world_size == rank]
    from tqdm.auto import tqdm

    with tqdm(total=len(mine) * len(chosen), desc=f"eval rank {rank}" if world_size > 1 else "eval",
              disable=not progress, file=sys.stderr) as bar:
        for index, batch in mine:
            run.run_batch(index, batch, bar)
    _barrier(world_size)
    if rank != 0:
        _barrier(world_size)
        return None
    if world_size > 1:
        folder.merge_shards()
    weight_bytes, descriptions = {}, {}
    for variant in chosen:
        attachments[variant.name].attach()
        try:
            weight_bytes[variant.name] = module_bytes(_denoiser(pipe))
        finally:
            attachments[variant.name].detach()
        descriptions[variant.name] = attachments[variant.name].describe()
    processes = max([r.get("processes", 1) for r in folder.records()] or [1])
    timing = None
    if processes > 1:
        timing_file = out_path / "timing.json"
        if timing_file.exists():
            timing = json.loads(timing_file.read_text())
        else:
            timing = _time_alone(run, batches[0], timing_rounds)
            _atomic_write(timing_file, _json_bytes(timing))
    summary = _summary(run, {**spec, "processes_seen": processes}, metric_list, weight_bytes, descriptions, timing)
    folder.write_summary(summary)
    _write_report(out_path, summary)
    if progress:
        for name, row in summary["variants"].items():
            print(_summary_line(name, row, summary["metrics"]), file=sys.stderr)
    _barrier(world_size)
    return summary


def _denoiser(pipe: Any) -> torch.nn.Module:
    from ..seams import denoiser

    return denoiser(pipe)


def _write_report(out_path: Path, summary: Mapping[str, Any]) -> None:
    from .report import write_report

    write_report(out_path, summary)


def _summary_line(name: str, row: Mapping[str, Any], metrics: Sequence[str]) -> str:
    speed = f"{row['speedup']:.2f}x" if row.get("speedup") else "-"
    parts = [f"{name}: {speed}", f"NFE {row['nfe_mean']:.1f}" if row.get("nfe_mean") is not None else ""]
    for metric in metrics:
        stats = row["metrics"].get(metric)
        if stats and not metric.startswith("verifier.") and math.isfinite(stats["mean"]):
            parts.append(f"{metric} {stats['mean']:.3f}")
    if row.get("fid") is not None:
        parts.append(f"fid {row['fid']:.2f}")
    return "  ".join(p for p in parts if p)
