"""Gradio demo: text-to-image with and without diffaccel's encoder reuse (and optionally NVFP4 or
INT8 weights), side by side.

    pip install -e ".[app]"
    python app/demo.py [--model PATH]     # default: the bundled micro-SD (offline)

The generation itself is :func:`compare`, usable without Gradio.
"""

from __future__ import annotations

import argparse
import copy
from typing import Any

import torch

import diffaccel
from diffaccel.cli import DEFAULT_MODEL, load_pipeline

SCHEDULES = ("faster-diffusion", "uniform:2", "uniform:3", "uniform:5")
#: Weight formats the accelerated side can use (``"none"``: the pipeline's own weights).
WEIGHTS = ("none", "nvfp4", "int8")
_QUANTIZED: dict[tuple[int, str], Any] = {}  # (id of the float UNet, format) -> its quantized copy


def _quantized_unet(unet: Any, weights: str) -> Any:
    """A quantized copy of ``unet`` (every Linear of its transformer blocks), made once per format."""
    key = (id(unet), weights)
    if key not in _QUANTIZED:
        config = diffaccel.QuantizationConfig(weights, min_weight_numel=0)
        _QUANTIZED[key] = diffaccel.quantize_(copy.deepcopy(unet), config)
    return _QUANTIZED[key]


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

    diffaccel.restore(pipe)
    baseline = diffaccel.accelerate(pipe)
    base_image = generate()
    base_seconds = baseline.acceleration_stats.seconds
    diffaccel.restore(pipe)
    unet = pipe.unet
    try:
        if weights != "none":
            pipe.unet = _quantized_unet(unet, weights)
        diffaccel.accelerate(pipe, config)
        fast_image = generate()
        stats = pipe.acceleration_stats
    finally:
        diffaccel.restore(pipe)
        pipe.unet = unet
    reuse = stats.features["encoder_reuse"]
    summary = (
        f"baseline: {base_seconds:.2f} s; encoder reuse: {stats.seconds:.2f} s "
        f"({base_seconds / stats.seconds:.2f}x)\n"
        f"key steps {list(reuse.key_steps)}; encoder evaluations: {reuse.encoder_evaluations}/{reuse.num_steps}; "
        f"decoder evaluations {reuse.decoder_evaluations} in {reuse.batched_decoder_calls} calls"
    )
    if weights != "none":
        report = diffaccel.memory_report(_quantized_unet(unet, weights))
        summary += (f"\n{weights} weights: UNet {report.nbytes / 1e6:.2f} MB vs {report.bf16_nbytes / 1e6:.2f} MB "
                    f"in bf16 ({report.bits_per_weight:.2f} bits per weight)")
    return base_image, fast_image, summary


def build_demo(pipe: Any, model_label: str) -> Any:
    """The Gradio Blocks app around :func:`compare`."""
    import gradio as gr

    def run(prompt: str, steps: float, seed: float, schedule: str, parallel: bool, weights: str,
            progress: Any = gr.Progress(track_tqdm=True)):
        try:
            return compare(pipe, prompt, int(steps), int(seed), schedule, parallel, weights)
        except ValueError as err:
            raise gr.Error(str(err)) from None

    with gr.Blocks(title="diffaccel") as demo:
        gr.Markdown(f"# diffaccel: encoder reuse\nmodel: `{model_label}`")
        with gr.Row():
            prompt = gr.Textbox(label="prompt", value="a red circle to the left of a blue square")
            steps = gr.Slider(4, 100, value=50, step=1, label="steps")
            seed = gr.Number(value=0, precision=0, label="seed")
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
    return demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = load_pipeline(args.model, device, torch.float16 if device == "cuda" else torch.float32)
    build_demo(pipe, args.model).launch(server_port=args.port)


if __name__ == "__main__":
    main()
