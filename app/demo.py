"""Gradio demo: text-to-image with and without diffaccel's UNet acceleration (a preset, or encoder
reuse on a key-step schedule; optionally NVFP4 or INT8 weights), and text-to-video with and without
the temporal delta cache, side by side, each side judged by the ShapeWorld verifier; and steering
(FK, best-of-N, noise search) toward a reward, showing every candidate with its reward.

    pip install -e ".[app]"
    python app/demo.py [--model PATH] [--video-model PATH] [--preset fast] [--port PORT]
    # defaults: the bundled micro-SD and micro-video, the "fast" preset, on http://127.0.0.1:7860

The generation itself is :func:`compare` and :func:`compare_video`, usable without Gradio.
Small images (the micro models draw 64x64) are shown enlarged, nearest-neighbour, to
:data:`DISPLAY_SIZE`; the summary states their native size.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import pathlib
import tempfile
from typing import Any, Callable

import torch

import diffaccel
from diffaccel.loading import (
    DEFAULT_MODEL,
    MICRO_VIDEO,
    RANDOM_VIDEO_MODEL,
    ModelLoadError,
    load_pipeline,
    load_video_pipeline,
)
from diffaccel.micro_models import models_dir
from diffaccel.presets import unet_preset
from diffaccel.rewards import Reward
from diffaccel.shapeworld import Verifier, parse_prompt

SCHEDULES = ("faster-diffusion", "uniform:2", "uniform:3", "uniform:5")
#: The image tab's choices: a preset (diffaccel.PRESETS) or an encoder-reuse key-step schedule.
ACCELERATIONS = (*diffaccel.PRESETS, *SCHEDULES)
#: Weight formats the accelerated side can use (``"none"``: the pipeline's own weights).
WEIGHTS = ("none", "nvfp4", "int8")
#: Frames per clip unless the call says otherwise: the bundled micro-video's (9-frame 64x64 clips),
#: as ``diffaccel generate-video --frames``.
VIDEO_FRAMES = 9
#: GIF frame duration, milliseconds (8 frames per second, as ``diffaccel generate-video --fps``).
FRAME_MS = 125
#: Images and clips smaller than this (pixels, longer side) are shown enlarged by a whole factor.
DISPLAY_SIZE = 256
#: Requests that may wait in the queue; more are turned away until it drains.
QUEUE_SIZE = 8
#: The seeds the seed field accepts (those of ``torch.Generator.manual_seed``'s unsigned range).
SEED_RANGE = (0, 2**32 - 1)
#: Gradio's cached copies of outputs: checked every hour, deleted when older than an hour.
DELETE_CACHE = (3600, 3600)
_QUANTIZED: dict[tuple[int, str], Any] = {}  # (id of the float denoiser, format) -> its quantized copy
#: The steering tab's methods: FK particles, best-of-N (independent samples, the best kept) and the
#: noise searches (RBF: flow-matching models only).
STEERING_METHODS = ("fk", "best-of-n", "zero-order", "paths", "rbf")
#: Caps of one steering request, so that one user cannot hold the server: candidates (FK particles,
#: best-of-N samples, the search budget in samples) and steps.
MAX_CANDIDATES = 8
MAX_STEERING_STEPS = 50
_STEERING_PIPES: dict[int, tuple[Any, dict[str, Any]]] = {}  # id of a pipeline -> (stochastic copy, call)


def _quantized_copy(denoiser: Any, weights: str) -> Any:
    """A quantized copy of a UNet or transformer (every eligible Linear), made once per format."""
    key = (id(denoiser), weights)
    if key not in _QUANTIZED:
        config = diffaccel.QuantizationConfig(weights, min_weight_numel=0)
        _QUANTIZED[key] = diffaccel.quantize_(copy.deepcopy(denoiser), config)
    return _QUANTIZED[key]


def _side_by_side(pipe: Any, denoiser: str, weights: str, config: Any, generate: Callable[[], Any]) -> tuple:
    """Run ``generate`` untouched, then with ``config`` on a ``weights`` copy of ``pipe.<denoiser>``;
    returns (untouched output, accelerated output, untouched seconds, accelerated stats). The
    pipeline gets its own denoiser back and no features."""
    diffaccel.restore(pipe)
    diffaccel.accelerate(pipe)
    base = generate()
    base_seconds = pipe.acceleration_stats.seconds
    original = getattr(pipe, denoiser)
    try:
        if weights != "none":
            setattr(pipe, denoiser, _quantized_copy(original, weights))
        diffaccel.accelerate(pipe, config)
        fast = generate()
        stats = pipe.acceleration_stats
    finally:
        diffaccel.restore(pipe)
        setattr(pipe, denoiser, original)
    return base, fast, base_seconds, stats


def _check_common(prompt: str, weights: str) -> None:
    """The inputs both tabs share; raises ``ValueError`` with a one-line message."""
    if not prompt.strip():
        raise ValueError("the prompt is empty")
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")


def image_config(prompt: str, steps: int, acceleration: str, parallel: bool, weights: str = "none") -> Any:
    """The encoder-reuse config of :func:`compare`'s inputs, checked before any model work:
    ``acceleration`` is a preset (``"fast"``, ``"balanced"``, ``"quality"``: deep reuse, which decodes
    step by step, so ``parallel`` does not apply) or a key-step schedule (encoder reuse, decoded in
    parallel when ``parallel``).

    Example:
        >>> image_config("a red circle", 50, "faster-diffusion", False).schedule.key_steps(50)[:4]
        (0, 1, 2, 3)
        >>> image_config("a red circle", 50, "fast", False).shallow_layers
        1
        >>> image_config("a red circle", 50, "uniform:2", False, "fp8")
        Traceback (most recent call last):
        ...
        ValueError: weights must be one of ('none', 'nvfp4', 'int8'), got 'fp8'
    """
    _check_common(prompt, weights)
    if acceleration in diffaccel.PRESETS:
        return unet_preset(acceleration)
    config = diffaccel.EncoderReuseConfig(acceleration, parallel=parallel)
    config.schedule.key_steps(int(steps))
    return config


def video_config(prompt: str, threshold: float, weights: str = "none") -> Any:
    """The delta-cache config of :func:`compare_video`'s inputs, checked before any model work.

    Example:
        >>> video_config("a red circle moving left", 0.05).threshold
        0.05
    """
    _check_common(prompt, weights)
    return diffaccel.DeltaCacheConfig(threshold=float(threshold))


def verdicts(base: Any, fast: Any, prompt: str, *, clip: bool = False) -> str:
    """The ShapeWorld verifier's verdict on both sides (PIL images, or lists of PIL frames with
    ``clip=True``), on one line; it says so when the accelerated side's verdict differs.

    Example:
        >>> from diffaccel.shapeworld import Scene, ShapeObject, render
        >>> scene = Scene((ShapeObject("circle", "red", 0.3, 0.5, 0.25),
        ...                ShapeObject("square", "blue", 0.7, 0.5, 0.25)), relation="left of")
        >>> verdicts(render(scene), render(scene), scene.caption)
        'ShapeWorld verifier: untouched score 1.00 (all criteria met); diffaccel score 1.00 (all criteria met)'
        >>> verdicts(render(scene), render(scene), "hello")
        'ShapeWorld verifier: skipped (not a ShapeWorld caption)'
    """
    try:
        parse_prompt(prompt)
    except ValueError:
        return "ShapeWorld verifier: skipped (not a ShapeWorld caption)"
    verifier = Verifier()
    judge = verifier.verify_clips if clip else verifier.verify
    untouched, accelerated = judge([base, fast], [prompt, prompt])
    changed = "" if untouched.criteria == accelerated.criteria else " -- the verdict changed"
    return f"ShapeWorld verifier: untouched {untouched.summary()}; diffaccel {accelerated.summary()}{changed}"


def compare(
    pipe: Any, prompt: str, steps: int, seed: int, acceleration: str, parallel: bool, weights: str = "none"
) -> tuple[Any, Any, str]:
    """Generate ``prompt`` untouched and with ``acceleration`` (a preset or a key-step schedule, see
    :func:`image_config`; on ``weights``: ``"none"``, ``"nvfp4"`` or ``"int8"``); return both images
    (native size) and a summary with the verifier's verdicts. The pipeline's own UNet is never modified.

    Example:
        >>> from diffaccel.testing import tiny_pipeline
        >>> base, fast, text = compare(tiny_pipeline("sd"), "a red circle", 10, 0, "uniform:2", False)
        >>> "encoder evaluations: 5/10" in text, "ShapeWorld verifier: untouched" in text
        (True, True)
        >>> "preset fast" in compare(tiny_pipeline("sd"), "a red circle", 10, 0, "fast", True)[2]
        True
    """
    config = image_config(prompt, steps, acceleration, parallel, weights)

    def generate() -> Any:
        generator = torch.Generator("cpu").manual_seed(int(seed))
        return pipe(prompt, num_inference_steps=int(steps), generator=generator).images[0]

    base_image, fast_image, base_seconds, stats = _side_by_side(pipe, "unet", weights, config, generate)
    reuse = stats.features["encoder_reuse"]
    name = f"preset {acceleration}" if acceleration in diffaccel.PRESETS else "encoder reuse"
    summary = (
        f"baseline: {base_seconds:.2f} s; {name}: {stats.seconds:.2f} s "
        f"({base_seconds / stats.seconds:.2f}x)\n{reuse.summary()}"
    )
    if parallel and acceleration in diffaccel.PRESETS:
        summary += "\nparallel decoding: not used by a preset (deep reuse reads each step's latents)"
    if weights != "none":
        report = diffaccel.memory_report(_quantized_copy(pipe.unet, weights))
        summary += f"\n{weights} weights: UNet {report.summary()}"
    summary += "\n" + verdicts(base_image, fast_image, prompt)
    return base_image, fast_image, summary


def compare_video(
    pipe: Any, prompt: str, steps: int, seed: int, threshold: float, weights: str = "none", **call: Any
) -> tuple[list[Any], list[Any], str]:
    """Generate a clip untouched and with the delta cache (on ``weights``: ``"none"``, ``"nvfp4"``,
    ``"int8"``); return both as lists of PIL frames (native size) and a summary with the verifier's
    verdicts. ``call`` goes to the pipeline (sizes; ``num_frames`` defaults to :data:`VIDEO_FRAMES`).
    The pipeline's own transformer is never modified.

    Example:
        >>> from diffaccel.testing import tiny_call_inputs, tiny_pipeline
        >>> base, fast, text = compare_video(tiny_pipeline("wan"), "a red circle", 6, 0, 1e9, **tiny_call_inputs("wan"))
        >>> len(base), "blocks skipped" in text
        (9, True)
    """
    from PIL import Image

    config = video_config(prompt, threshold, weights)
    call = {"num_frames": VIDEO_FRAMES, **call}

    def generate() -> list[Any]:
        frames = pipe(prompt, num_inference_steps=int(steps), generator=torch.Generator("cpu").manual_seed(int(seed)),
                      output_type="np", **call).frames[0]
        return [Image.fromarray((frame.clip(0, 1) * 255).round().astype("uint8")) for frame in frames]

    base_frames, fast_frames, base_seconds, stats = _side_by_side(pipe, "transformer", weights, config, generate)
    cache = stats.features["delta_cache"]
    summary = (f"baseline: {base_seconds:.2f} s; delta cache: {stats.seconds:.2f} s "
               f"({base_seconds / stats.seconds:.2f}x)\n"
               f"{cache.blocks_skipped}/{cache.blocks_skipped + cache.blocks_computed} blocks skipped")
    if weights != "none":
        report = diffaccel.memory_report(_quantized_copy(pipe.transformer, weights))
        summary += f"\n{weights} weights: transformer {report.summary()}"
    summary += "\n" + verdicts(base_frames, fast_frames, prompt, clip=True)
    return base_frames, fast_frames, summary


def steering_config(prompt: str, method: str, candidates: int, steps: int) -> Any:
    """The FK or noise-search config of the steering tab's inputs, checked (caps included) before
    any model work. FK uses :meth:`diffaccel.FKSteeringConfig.measured`, the settings measured best.

    Example:
        >>> steering_config("a red circle", "fk", 4, 20).resample_start
        12
        >>> steering_config("a red circle", "zero-order", 4, 20).budget_nfe
        80
        >>> steering_config("a red circle", "fk", 64, 20)
        Traceback (most recent call last):
        ...
        ValueError: candidates must be between 1 and 8 (a cap of this demo), got 64
    """
    from diffaccel.steering import FKSteeringConfig, NoiseSearchConfig

    _check_common(prompt, "none")
    if method not in STEERING_METHODS:
        raise ValueError(f"method must be one of {STEERING_METHODS}, got {method!r}")
    if not 1 <= candidates <= MAX_CANDIDATES:
        raise ValueError(f"candidates must be between 1 and {MAX_CANDIDATES} (a cap of this demo), got {candidates}")
    if not 1 <= steps <= MAX_STEERING_STEPS:
        raise ValueError(f"steps must be between 1 and {MAX_STEERING_STEPS} for steering (a cap of this demo), got {steps}")
    if method == "fk":
        return FKSteeringConfig.measured(candidates, steps)
    if method == "best-of-n":
        return FKSteeringConfig(num_particles=candidates, resample_every=0, final_correction=False)
    if method == "paths" and candidates < 2:
        raise ValueError("paths search needs at least 2 candidates")
    return NoiseSearchConfig(method, budget_nfe=candidates * steps, batch_size=min(4, candidates))


class _Recording(Reward):
    """A reward that keeps every batch it scores (the search's candidates, as they are scored)."""

    def __init__(self, reward: Any) -> None:
        self.reward, self.name, self.worst = reward, reward.name, reward.worst
        self.batches: list[tuple[Any, Any]] = []

    def __call__(self, media: Any, prompts: Any) -> Any:
        scores = self.reward(media, prompts)
        self.batches.append((media, scores))
        return scores


def _steering_pipe(pipe: Any) -> tuple[Any, dict[str, Any]]:
    """A copy of ``pipe`` sharing its modules, with a stochastic sampler (made once per pipeline)."""
    from diffaccel.steering.stochastic import stochastic_call

    if id(pipe) not in _STEERING_PIPES:
        steered = type(pipe).from_pipe(pipe, dtype=pipe.dtype, scheduler=copy.deepcopy(pipe.scheduler))
        steered.set_progress_bar_config(disable=True)
        _STEERING_PIPES[id(pipe)] = (steered, stochastic_call(steered))
    return _STEERING_PIPES[id(pipe)]


def steer_candidates(pipe: Any, prompt: str, steps: int, seed: int, method: str, candidates: int, reward: Any
                     ) -> tuple[list[tuple[Any, str]], Any, str]:
    """Steer ``prompt`` with ``method`` over ``candidates`` samples' worth of compute by ``reward``;
    returns the candidates (PIL image, caption with its reward), the winner and a summary (NFE, seconds).
    The pipeline itself is not modified (a stochastic copy sharing its modules samples).

    Example:
        >>> from diffaccel.rewards import ShapeWorldReward
        >>> from diffaccel.testing import tiny_pipeline
        >>> shown, best, text = steer_candidates(tiny_pipeline("sd"), "a red circle", 4, 0, "best-of-n", 2,
        ...                                      ShapeWorldReward())
        >>> len(shown), text.splitlines()[0]
        (2, 'best-of-n: 2 candidates, NFE 8')
    """
    import time

    from diffaccel.steering import FKSteeringConfig, search, steer
    from diffaccel.steering.media import convert_media

    config = steering_config(prompt, method, int(candidates), int(steps))
    steered, call = _steering_pipe(pipe)
    call = dict(call, num_inference_steps=int(steps), generator=torch.Generator("cpu").manual_seed(int(seed)))
    begin = time.perf_counter()
    if isinstance(config, FKSteeringConfig):
        out = steer(steered, config, reward)(prompt, output_type="pt", **call)
        images, scores, nfe, best = out.samples, out.rewards, out.stats.nfe, out.best_indices[0]
        detail = f"resampled at steps {out.stats.resampled_steps}" if config.resample_every else "no resampling"
    else:
        recording = _Recording(reward)
        out = search(steered, prompt, config, recording, output_type="pt", **call)
        finals = recording.batches[1:] if method in ("random", "zero-order") else recording.batches[-1:]
        images = torch.cat([media for media, _ in finals])
        scores = torch.cat([torch.as_tensor(s).float() for _, s in finals])
        nfe, best = out.nfe, int(torch.argmax(scores))
        detail = f"{len(out.trace)} candidates scored"
    seconds = time.perf_counter() - begin
    pictures = convert_media(images, "pil")
    shown = [(enlarge(image), f"{reward.name} {float(score):.2f}" + (" (winner)" if i == best else ""))
             for i, (image, score) in enumerate(zip(pictures, scores))]
    summary = (f"{method}: {len(shown)} candidates, NFE {nfe}\n{detail}; {seconds:.2f} s\n"
               f"winner: candidate {best}, {reward.name} {float(scores[best]):.3f}")
    return shown, enlarge(pictures[best]), summary


def enlarge(image: Any, size: int = DISPLAY_SIZE) -> Any:
    """``image`` enlarged by the largest whole factor that keeps its longer side within ``size``
    (nearest-neighbour: every pixel stays a sharp square); images already that large are kept.

    Example:
        >>> from PIL import Image
        >>> enlarge(Image.new("RGB", (64, 32))).size
        (256, 128)
        >>> enlarge(Image.new("RGB", (512, 512))).size
        (512, 512)
    """
    from PIL import Image

    factor = max(1, size // max(image.size))
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def shown_as(native: Any, shown: Any) -> str:
    """What the page shows of a ``native`` image as ``shown`` (both PIL), in words.

    Example:
        >>> from PIL import Image
        >>> shown_as(Image.new("RGB", (64, 64)), Image.new("RGB", (256, 256)))
        'native size 64x64, shown enlarged 4x (nearest-neighbour) at 256x256'
    """
    size = f"native size {native.width}x{native.height}"
    if shown.size == native.size:
        return size
    return f"{size}, shown enlarged {shown.width // native.width}x (nearest-neighbour) at {shown.width}x{shown.height}"


class GifStore:
    """Writes clips as GIFs into one temporary folder the app owns (deleted with it), keeping only
    the newest ``keep`` files: older clips are deleted as new ones are written.

    Example:
        >>> from PIL import Image
        >>> store = GifStore(keep=2)
        >>> paths = [store.write([Image.new("RGB", (8, 8))] * 2) for _ in range(3)]
        >>> sorted(p.name for p in store.folder.iterdir()) == sorted(pathlib.Path(p).name for p in paths[1:])
        True
    """

    def __init__(self, keep: int = 4) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.keep = keep
        self._folder = tempfile.TemporaryDirectory(prefix="diffaccel-demo-")
        self._count = itertools.count()
        self._written: list[pathlib.Path] = []

    @property
    def folder(self) -> pathlib.Path:
        """The folder the GIFs are written to."""
        return pathlib.Path(self._folder.name)

    def write(self, frames: list[Any]) -> str:
        """Write ``frames`` (PIL) as a looping GIF; returns its path."""
        path = self.folder / f"clip-{next(self._count)}.gif"
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=FRAME_MS, loop=0)
        self._written.append(path)
        while len(self._written) > self.keep:
            self._written.pop(0).unlink(missing_ok=True)
        return str(path)


def steering_rewards(aesthetic: str | None = None) -> dict[str, str]:
    """The steering tab's rewards: label -> reward spec (``diffaccel.rewards.reward_from_spec``);
    the aesthetic predictor only when its head's weights are given.

    Example:
        >>> list(steering_rewards()), steering_rewards("head.safetensors")["aesthetic"]
        (['verifier', 'micro-CLIP'], 'aesthetic:head.safetensors')
    """
    rewards = {"verifier": "shapeworld", "micro-CLIP": "transformers-clip:micro-clip"}
    if aesthetic is not None:
        rewards["aesthetic"] = f"aesthetic:{aesthetic}"
    return rewards


_REWARDS: dict[str, Any] = {}  # reward spec -> the loaded reward


def _reward(spec: str) -> Any:
    from diffaccel.rewards import reward_from_spec

    if spec not in _REWARDS:
        _REWARDS[spec] = reward_from_spec(spec, "cuda" if torch.cuda.is_available() else "cpu")
    return _REWARDS[spec]


def build_demo(pipe: Any, model_label: str, video: tuple[Any, str, dict[str, Any]] | None = None,
               gifs: GifStore | None = None, preset: str = "fast", aesthetic: str | None = None) -> Any:
    """The Gradio Blocks app around :func:`compare` (and :func:`compare_video` when ``video`` is
    ``(pipeline, label, call arguments)``) and :func:`steer_candidates`, queued (at most
    :data:`QUEUE_SIZE` waiting). The image tab starts on ``preset`` (one of :data:`ACCELERATIONS`).
    Clips are written to ``gifs`` (default: a new :class:`GifStore`). ``aesthetic``: the aesthetic
    predictor head's weights, which add it to the steering rewards."""
    if preset not in ACCELERATIONS:
        raise ValueError(f"preset must be one of {ACCELERATIONS}, got {preset!r}")
    import gradio as gr

    gifs = gifs if gifs is not None else GifStore()
    rewards = steering_rewards(aesthetic)

    def run_steering(prompt: str, steps: float, seed: float, method: str, reward: str, candidates: float,
                     progress: Any = gr.Progress(track_tqdm=True)):
        try:
            steering_config(prompt, method, int(candidates), int(steps))
            if reward not in rewards:
                raise ValueError(f"reward must be one of {tuple(rewards)}, got {reward!r}")
            shown, best, text = steer_candidates(pipe, prompt, int(steps), int(seed), method, int(candidates),
                                                 _reward(rewards[reward]))
        except ValueError as err:
            raise gr.Error(str(err)) from None
        return shown, best, text

    def run(prompt: str, steps: float, seed: float, acceleration: str, parallel: bool, weights: str,
            progress: Any = gr.Progress(track_tqdm=True)):
        try:
            base, fast, text = compare(pipe, prompt, int(steps), int(seed), acceleration, parallel, weights)
        except ValueError as err:
            raise gr.Error(str(err)) from None
        shown = enlarge(base)
        return shown, enlarge(fast), f"{text}\nimages: {shown_as(base, shown)}"

    def run_video(prompt: str, steps: float, seed: float, threshold: float, weights: str,
                  progress: Any = gr.Progress(track_tqdm=True)):
        try:
            base, fast, text = compare_video(video[0], prompt, int(steps), int(seed), float(threshold), weights,
                                             **video[2])
        except ValueError as err:
            raise gr.Error(str(err)) from None
        shown = [enlarge(frame) for frame in base]
        clips = f"clips: {len(base)} frames, {shown_as(base[0], shown[0])}"
        return gifs.write(shown), gifs.write([enlarge(frame) for frame in fast]), f"{text}\n{clips}"

    with gr.Blocks(title="diffaccel", delete_cache=DELETE_CACHE) as demo:
        gr.Markdown(f"# diffaccel: UNet acceleration\nmodel: `{model_label}`")
        prompt, steps, seed = _prompt_row(gr, "a red circle to the left of a blue square", 25)
        with gr.Row():
            acceleration = gr.Dropdown(list(ACCELERATIONS), value=preset, allow_custom_value=True,
                                       label="preset or key-step schedule")
            parallel = gr.Checkbox(value=torch.cuda.is_available(), label="parallel decoding (schedules)")
            weights = gr.Dropdown(list(WEIGHTS), value="none", label="quantized weights")
            button = gr.Button("generate", variant="primary")
        with gr.Row():
            base = gr.Image(label="untouched pipeline", format="png", elem_id="image-untouched")
            fast = gr.Image(label="diffaccel", format="png", elem_id="image-diffaccel")
        summary = gr.Textbox(label="what it did", lines=5, elem_id="image-summary")
        button.click(run, [prompt, steps, seed, acceleration, parallel, weights], [base, fast, summary])
        if video is not None:
            gr.Markdown(f"# text-to-video: temporal delta cache\nmodel: `{video[1]}`")
            v_prompt, v_steps, v_seed = _prompt_row(gr, "a red circle moving to the left", 30)
            with gr.Row():
                v_threshold = gr.Slider(0.0, 0.5, value=0.05, step=0.01, label="delta cache threshold")
                v_weights = gr.Dropdown(list(WEIGHTS), value="none", label="quantized weights")
                v_button = gr.Button("generate clip", variant="primary")
            with gr.Row():
                v_base = gr.Image(label="untouched pipeline", type="filepath", elem_id="clip-untouched")
                v_fast = gr.Image(label="diffaccel", type="filepath", elem_id="clip-diffaccel")
            v_summary = gr.Textbox(label="what it did", lines=5, elem_id="clip-summary")
            v_button.click(run_video, [v_prompt, v_steps, v_seed, v_threshold, v_weights], [v_base, v_fast, v_summary])
        gr.Markdown("# steering: FK particles and noise search toward a reward\n"
                    f"at most {MAX_CANDIDATES} candidates and {MAX_STEERING_STEPS} steps per request")
        s_prompt, s_steps, s_seed = _prompt_row(gr, "a red circle to the left of a blue square", 20)
        with gr.Row():
            s_method = gr.Dropdown(list(STEERING_METHODS), value="fk", label="method")
            s_reward = gr.Dropdown(list(rewards), value="verifier", label="reward")
            s_candidates = gr.Slider(1, MAX_CANDIDATES, value=4, step=1, label="candidates (particles or samples)")
            s_button = gr.Button("steer", variant="primary")
        with gr.Row():
            s_gallery = gr.Gallery(label="candidates", elem_id="steering-candidates", columns=4)
            s_best = gr.Image(label="winner", format="png", elem_id="steering-winner")
        s_summary = gr.Textbox(label="what it did", lines=3, elem_id="steering-summary")
        s_button.click(run_steering, [s_prompt, s_steps, s_seed, s_method, s_reward, s_candidates],
                       [s_gallery, s_best, s_summary])
    return demo.queue(max_size=QUEUE_SIZE)


def _prompt_row(gr: Any, prompt: str, steps: int) -> tuple[Any, Any, Any]:
    """A row of prompt, step-count and seed inputs (inside a ``gr.Blocks``)."""
    with gr.Row():
        return (gr.Textbox(label="prompt", value=prompt),
                gr.Slider(4, 100, value=steps, step=1, label="steps"),
                gr.Number(value=0, precision=0, minimum=SEED_RANGE[0], maximum=SEED_RANGE[1], label="seed"))


def load_models(model: str = DEFAULT_MODEL, video_model: str | None = None, device: str | None = None
                ) -> tuple[Any, str, tuple[Any, str, dict[str, Any]]]:
    """The arguments of :func:`build_demo` for ``model`` and ``video_model`` (None: the bundled
    micro-video when exported, else :data:`~diffaccel.loading.RANDOM_VIDEO_MODEL`), as ``main`` loads them."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_pipeline(model, device, torch.float16 if device == "cuda" else torch.float32)
    if video_model is None:
        video_model = MICRO_VIDEO if (models_dir() / MICRO_VIDEO / "model_index.json").is_file() else RANDOM_VIDEO_MODEL
    video_pipe, call = load_video_pipeline(video_model, device, torch.bfloat16 if device == "cuda" else torch.float32)
    video_pipe.set_progress_bar_config(disable=True)
    return pipe, model, (video_pipe, video_model, call)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--video-model", default=None,
                        help=f"text-to-video model (default: {MICRO_VIDEO} when trained, else {RANDOM_VIDEO_MODEL})")
    parser.add_argument("--preset", choices=ACCELERATIONS, default="fast",
                        help="the image tab's starting choice: a preset or a key-step schedule (default: fast)")
    parser.add_argument("--aesthetic", default=None, metavar="HEAD",
                        help="aesthetic predictor head weights (.safetensors): adds it to the steering rewards")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args()
    try:
        models = load_models(args.model, args.video_model)
    except ModelLoadError as err:
        parser.error(str(err))
    build_demo(*models, preset=args.preset, aesthetic=args.aesthetic).launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
