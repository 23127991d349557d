"""Budget allocations for ``diffaccel eval``: measured per-layer sensitivity, then one config per budget.

For a bundled micro model (micro-SD's whole UNet, micro-DiT's or micro-video's transformer), on
calibration prompts of the ShapeWorld *training* split (never the evaluated held-out ones):

1. ``diffaccel.measure_sensitivity`` (every Linear and Conv2d, embeddings and time projections
   included: the measurement, not an exclude list, decides what stays in bf16; ``--default-exclude``
   keeps the default exclude out; NVFP4, W8A16 and W8A8 per layer) with the call settings the evaluation uses; saved as
   ``sensitivity.json`` and reused when present (delete it to measure again);
2. for each ``--bits`` budget, ``allocate_static(data, bits_per_weight=B)`` and its
   ``quantization_config()`` written as ``bits-B.json`` (``diffaccel eval``'s
   ``quantization-file:PATH`` variant part reads it), with the allocation itself in ``summary.json``;
3. ``grid.json``: those variants beside the uniform formats (ours over the whole model: W8A16, NVFP4)
   and the peers (optimum-quanto qint8 / qint4 / qfloat8, torchao int8 weight-only; its int4 weight-only
   needs the mslk package on CPU, which is not installed), for
   ``diffaccel eval --grid``.

    python bench/quantization_budget.py --model micro-sd --bits 5 5.5 6 7 8
    diffaccel eval --model micro-sd --grid bench/results/quantization/budget/micro-sd/grid.json ...

Writes ``bench/results/quantization/budget/<model>/``. CPU only matters for the measurement's time
(about a minute per 100 layers on micro-SD); nothing here times anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import time
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]

#: The call settings of the evaluation runs (bench/results/eval), per model.
CALLS: dict[str, dict[str, Any]] = {
    "micro-sd": {"num_inference_steps": 25, "guidance_scale": 5.0},
    "micro-dit": {"num_inference_steps": 28},
    "micro-video": {"num_inference_steps": 20, "num_frames": 9},
}

#: Calibration prompts per model (ShapeWorld training split).
PROMPTS: dict[str, str] = {
    "micro-sd": "shapeworld:single+relation:train:4",
    "micro-dit": "shapeworld:single+relation:train:4",
    "micro-video": "shapeworld:motion:train:8",
}

#: The peers and uniform formats every grid holds.
BASE_GRID: dict[str, str] = {
    "w8a16-all": "w8a16:scope=all,min_weight_numel=0",
    "nvfp4-all": "nvfp4:scope=all,min_weight_numel=0",
    "quanto-int8": "quanto:int8",
    "quanto-int4": "quanto:int4",
    "quanto-float8": "quanto:float8",
    "torchao-int8wo": "torchao:int8wo",
}  # torchao's int4wo does not run on this CPU (its Int4WeightOnlyConfig needs the mslk package)


def load(model: str) -> tuple[Any, dict[str, Any]]:
    """The bundled pipeline (float32, CPU) and its call settings."""
    import torch

    from diffaccel import loading

    if model == "micro-video":
        pipe, call = loading.load_video_pipeline(loading.MICRO_VIDEO, "cpu", torch.float32)
    else:
        pipe, call = loading.load_pipeline(model, "cpu", torch.float32), {}
    return pipe, {**call, **CALLS[model]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(CALLS), default="micro-sd")
    parser.add_argument("--bits", type=float, nargs="+", default=[5.0, 5.5, 6.0, 7.0, 8.0])
    parser.add_argument("--formats", nargs="+", default=["nvfp4", "w8a16", "int8"])
    parser.add_argument("--steps-per-prompt", type=int, default=3)
    parser.add_argument("--measure", choices=("step", "trajectory"), default="step",
                        help="sensitivity on the denoiser's output at recorded steps, or on the final latents of whole "
                             "runs (a pipeline call per layer, format and prompt)")
    parser.add_argument("--calibration-prompts", type=int, default=None, metavar="N",
                        help="use the first N calibration prompts (default: all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--default-exclude", action="store_true",
                        help="keep QuantizationConfig's default exclude (embeddings, time projections, conv_in/out) out "
                             "of the allocation; by default every Linear and Conv2d is a candidate and the measurement "
                             "decides which stay in bf16")
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)

    import torch

    from diffaccel.evaluation.prompts import load_prompts
    from diffaccel.quantization import (
        LayerSensitivity,
        QuantizationConfig,
        allocate_static,
        measure_sensitivity,
        planned_memory,
    )

    torch.set_num_threads(args.threads)
    out = (args.out or REPO / "bench" / "results" / "quantization" / "budget" / args.model).resolve()
    out.mkdir(parents=True, exist_ok=True)
    pipe, call = load(args.model)
    model = pipe.transformer if hasattr(pipe, "transformer") and pipe.transformer is not None else pipe.unet
    sensitivity_file = out / "sensitivity.json"
    if sensitivity_file.is_file():
        data = LayerSensitivity.from_dict(json.loads(sensitivity_file.read_text()))
        seconds = None
        print(f"reusing {sensitivity_file} ({len(data.layers)} layers)")
    else:
        prompts = [record.prompt for record in load_prompts(PROMPTS[args.model])][:args.calibration_prompts]
        start = time.perf_counter()
        config = QuantizationConfig(scope="all", min_weight_numel=0)
        config = config if args.default_exclude else dataclasses.replace(config, exclude=())
        data = measure_sensitivity(pipe, prompts, formats=args.formats, config=config,
                                   steps_per_prompt=args.steps_per_prompt, measure=args.measure, **call)
        seconds = time.perf_counter() - start
        sensitivity_file.write_text(json.dumps({**data.to_dict(), "prompts": prompts, "call": call,
                                                "seconds": seconds, "threads": args.threads,
                                                "measure": args.measure}))
    smallest = planned_memory(model, dataclasses.replace(data.config, precision="nvfp4"))
    summary: dict[str, Any] = {"model": args.model, "layers": len(data.layers), "formats": list(data.formats),
                               "smallest_bits_per_weight": smallest.bits_per_weight, "allocations": {}}
    grid = dict(BASE_GRID)
    for bits in args.bits:
        try:
            allocation = allocate_static(data, bits_per_weight=bits)
        except ValueError as err:
            print(f"{bits} bits: {err}")
            continue
        name = f"bits-{bits:g}"
        path = out / f"{name}.json"
        path.write_text(json.dumps(allocation.quantization_config().to_dict(), indent=1) + "\n")
        summary["allocations"][name] = {key: value for key, value in allocation.to_dict().items()
                                        if key not in ("precisions", "config")}
        grid[f"mixed-{bits:g}"] = f"quantization-file:{path.relative_to(REPO)}"
        print(f"{name}: {allocation.bits_per_weight:.3f} bits per weight, {allocation.counts}, "
              f"predicted error {allocation.predicted_error:.3g}")
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "grid.json").write_text(json.dumps(grid, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
