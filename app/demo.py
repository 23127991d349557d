"""Gradio demo: text-to-image with and without diffaccel's encoder reuse (and optionally NVFP4 or
INT8 weights), and text-to-video with and without the temporal delta cache, side by side.

    pip install -e ".[app]"
    python app/demo.py [--model PATH] [--video-model PATH]
    # defaults: the bundled micro-SD and micro-video

The generation itself is :func:`compare` and :func:`compare_video`, usable without Gradio.
"""

from __future__ import annotations

import argparse
import copy
from typing import Any, Callable

import torch

import diffaccel
from diffaccel.cli import DEFAULT_MODEL, load_pipeline
from diffaccel.micro_models import models_dir
from diffaccel.video_cli import MICRO_VIDEO, RANDOM_VIDEO_MODEL, load_video_pipeline

SCHEDULES = ("faster-diffusion", "uniform:2", "uniform:3", "uniform:5")
#: Weight formats the accelerated side can use (``"none"``: the pipeline's own weights).
WEIGHTS = ("none", "nvfp4", "int8")
_QUANTIZED: dict[tuple[int, str], Any] = {}  # (id of the float denoiser, format) -> its quantized copy


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


def compare(
    pipe: Any, prompt: str, steps: int, seed: int, schedule: str, parallel: bool, weights: str = "none"
) -> tuple[Any, Any, str]:
    """Generate ``prompt`` untouched and with encoder reuse (on ``weights``: ``"none"``, ``"nvfp4"``
    or ``"int8"``); return both images and a summary. The pipeline's own UNet is never modified.

    Example:
        >>> from diffaccel.testing import tiny_pipeline
        >>> base, fast, text = compare(tiny_pipeline("sd"), "a red circle", 10, 0, "uniform:2", False)
        >>> "encoder evaluations: 5/10" in text
        True
    """
    if not prompt.strip():
        raise ValueError("the prompt is empty")
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    config = diffaccel.EncoderReuseConfig(schedule, parallel=parallel)
    config.schedule.key_steps(steps)

    def generate() -> Any:
        generator = torch.Generator("cpu").manual_seed(int(seed))
        return pipe(prompt, num_inference_steps=int(steps), generator=generator).images[0]

    base_image, fast_image, base_seconds, stats = _side_by_side(pipe, "unet", weights, config, generate)
    unet = pipe.unet
    reuse = stats.features["encoder_reuse"]
    summary = (
        f"baseline: {base_seconds:.2f} s; encoder reuse: {stats.seconds:.2f} s "
        f"({base_seconds / stats.seconds:.2f}x)\n"
        f"key steps {list(reuse.key_steps)}; encoder evaluations: {reuse.encoder_evaluations}/{reuse.num_steps}; "
        f"decoder evaluations {reuse.decoder_evaluations} in {reuse.batched_decoder_calls} calls"
    )
    if weights != "none":
        report = diffaccel.memory_report(_quantized_copy(unet, weights))
        summary += (f"\n{weights} weights: UNet {report.nbytes / 1e6:.2f} MB vs {report.bf16_nbytes / 1e6:.2f} MB "
                    f"in bf16 ({report.bits_per_weight:.2f} bits per weight)")
    return base_image, fast_image, summary


def compare_video(
    pipe: Any, prompt: str, steps: int, seed: int, threshold: float, weights: str = "none", **call: Any
) -> tuple[list[Any], list[Any], str]:
    """Generate a clip untouched and with the delta cache (on ``weights``: ``"none"``, ``"nvfp4"``,
    ``"int8"``); return both as lists of PIL frames and a summary. ``call`` goes to the pipeline
    (sizes, ``num_frames``). The pipeline's own transformer is never modified.

    Example:
        >>> from diffaccel.testing import tiny_call_inputs, tiny_pipeline
        >>> base, fast, text = compare_video(tiny_pipeline("wan"), "a red circle", 6, 0, 1e9, **tiny_call_inputs("wan"))
        >>> len(base), "blocks skipped" in text
        (9, True)
    """
    from PIL import Image

    if not prompt.strip():
        raise ValueError("the prompt is empty")
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    config = diffaccel.DeltaCacheConfig(threshold=threshold)

    def generate() -> list[Any]:
        frames = pipe(prompt, num_inference_steps=int(steps), generator=torch.Generator("cpu").manual_seed(int(seed)),
                      output_type="np", **call).frames[0]
        return [Image.fromarray((frame.clip(0, 1) * 255).round().astype("uint8")) for frame in frames]

    base_frames, fast_frames, base_seconds, stats = _side_by_side(pipe, "transformer", weights, config, generate)
    transformer = pipe.transformer
    cache = stats.features["delta_cache"]
    summary = (f"baseline: {base_seconds:.2f} s; delta cache: {stats.seconds:.2f} s "
               f"({base_seconds / stats.seconds:.2f}x)\n"
               f"{cache.blocks_skipped}/{cache.blocks_skipped + cache.blocks_computed} blocks skipped")
    if weights != "none":
        report = diffaccel.memory_report(_quantized_copy(transformer, weights))
        summary += (f"\n{weights} weights: transformer {report.nbytes / 1e6:.2f} MB vs {report.bf16_nbytes / 1e6:.2f} MB "
                    f"in bf16")
    return base_frames, fast_frames, summary


def _gif(frames: list[Any]) -> str:
    """Write frames to a temporary GIF for Gradio; returns its path."""
    import tempfile

    path = tempfile.NamedTemporaryFile(suffix=".gif", delete=False).name
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=125, loop=0)
    return path


def build_demo(pipe: Any, model_label: str, video: tuple[Any, str, dict[str, Any]] | None = None) -> Any:
    """The Gradio Blocks app around :func:`compare` (and :func:`compare_video` when ``video`` is
    ``(pipeline, label, call arguments)``)."""
    import gradio as gr

    def run(prompt: str, steps: float, seed: float, schedule: str, parallel: bool, weights: str,
            progress: Any = gr.Progress(track_tqdm=True)):
        try:
            return compare(pipe, prompt, int(steps), int(seed), schedule, parallel, weights)
        except ValueError as err:
            raise gr.Error(str(err)) from None

    def run_video(prompt: str, steps: float, seed: float, threshold: float, weights: str,
                  progress: Any = gr.Progress(track_tqdm=True)):
        try:
            base, fast, text = compare_video(video[0], prompt, int(steps), int(seed), float(threshold), weights,
                                             **video[2])
        except ValueError as err:
            raise gr.Error(str(err)) from None
        return _gif(base), _gif(fast), text

    with gr.Blocks(title="diffaccel") as demo:
        gr.Markdown(f"# diffaccel: encoder reuse\nmodel: `{model_label}`")
        prompt, steps, seed = _prompt_row(gr, "a red circle to the left of a blue square", 50)
        with gr.Row():
            schedule = gr.Dropdown(list(SCHEDULES), value=SCHEDULES[0], allow_custom_value=True, label="key-step schedule")
            parallel = gr.Checkbox(value=torch.cuda.is_available(), label="parallel decoding")
            weights = gr.Dropdown(list(WEIGHTS), value="none", label="quantized weights")
            button = gr.Button("generate", variant="primary")
        with gr.Row():
            base = gr.Image(label="untouched pipeline")
            fast = gr.Image(label="diffaccel")
        summary = gr.Textbox(label="what it did", lines=3)
        button.click(run, [prompt, steps, seed, schedule, parallel, weights], [base, fast, summary])
        if video is not None:
            gr.Markdown(f"# text-to-video: temporal delta cache\nmodel: `{video[1]}`")
            v_prompt, v_steps, v_seed = _prompt_row(gr, "a red circle moving to the left", 30)
            with gr.Row():
                v_threshold = gr.Slider(0.0, 0.5, value=0.05, step=0.01, label="delta cache threshold")
                v_weights = gr.Dropdown(list(WEIGHTS), value="none", label="quantized weights")
                v_button = gr.Button("generate clip", variant="primary")
            with gr.Row():
                v_base = gr.Image(label="untouched pipeline", type="filepath")
                v_fast = gr.Image(label="diffaccel", type="filepath")
            v_summary = gr.Textbox(label="what it did", lines=3)
            v_button.click(run_video, [v_prompt, v_steps, v_seed, v_threshold, v_weights], [v_base, v_fast, v_summary])
    return demo


def _prompt_row(gr: Any, prompt: str, steps: int) -> tuple[Any, Any, Any]:
    """A row of prompt, step-count and seed inputs (inside a ``gr.Blocks``)."""
    with gr.Row():
        return (gr.Textbox(label="prompt", value=prompt),
                gr.Slider(4, 100, value=steps, step=1, label="steps"),
                gr.Number(value=0, precision=0, label="seed"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--video-model", default=None,
                        help=f"text-to-video model (default: {MICRO_VIDEO} when trained, else {RANDOM_VIDEO_MODEL})")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = load_pipeline(args.model, device, torch.float16 if device == "cuda" else torch.float32)
    video_model = args.video_model
    if video_model is None:
        video_model = MICRO_VIDEO if (models_dir() / MICRO_VIDEO / "model_index.json").is_file() else RANDOM_VIDEO_MODEL
    video_pipe, call = load_video_pipeline(video_model, device, torch.bfloat16 if device == "cuda" else torch.float32)
    video_pipe.set_progress_bar_config(disable=True)
    build_demo(pipe, args.model, (video_pipe, video_model, call)).launch(server_port=args.port)


if __name__ == "__main__":
    main()
