"""Run diffusers' own fast pipeline tests against diffaccel's drop-in classes.

Usage::

    python bench/diffusers_conformance.py /path/to/diffusers-checkout [--variants stock,none,all,uniform:2]
                                          [-k EXPR] [--json bench/results/conformance/diffusers_conformance.json]

The checkout needs diffusers' ``tests/`` folder (``git archive <commit> tests`` of the commit that
matches the installed diffusers, or the closest one); the installed diffusers is what runs. Each
variant runs ``tests/pipelines/stable_diffusion/test_stable_diffusion.py`` and
``tests/pipelines/stable_diffusion_xl/test_stable_diffusion_xl.py`` in a subprocess, offline, with
the test classes' ``pipeline_class`` set to:

* ``stock``: diffusers' own ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` (the baseline);
* ``none``: ``AcceleratedStableDiffusionPipeline`` / ``AcceleratedStableDiffusionXLPipeline``, no feature;
* any other name: the drop-in class with ``EncoderReuseConfig(name)`` attached when it is built
  (``all``: every step a key step, which must equal the stock class; ``uniform:2``: a real feature,
  where tests comparing against expected outputs may legitimately differ).

The hub tokenizers the tests load (``hf-internal-testing/tiny-random-clip``) are replaced by an
offline CLIP BPE tokenizer of 1000 tokens (the first merges of CLIP's vocabulary, built with
:func:`diffaccel.tokenizers.clip_tokenizer`), the same for every variant, and the drop-in classes are made visible by name in
``diffusers.pipelines`` (diffusers' ``ReturnNameVisitor`` looks pipeline classes up there). A
feature variant attaches its feature to every pipeline built with a UNet (the ``encode_prompt``
tests also build one without). Tests that need the hub
(integration tests, downloads) fail or skip in every variant alike. The script prints, per variant,
the tests that fail there but not with the stock class, and exits with status 1 when ``none`` or
``all`` has any. Needs ``pytest``, ``parameterized``, ``requests-mock`` and ``scipy`` (diffusers'
test dependencies; without scipy the LMS-scheduler tests fail in every variant, hiding what they check).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

TEST_FILES = (
    "tests/pipelines/stable_diffusion/test_stable_diffusion.py",
    "tests/pipelines/stable_diffusion_xl/test_stable_diffusion_xl.py",
)
DEFAULT_VARIANTS = ("stock", "none", "all", "uniform:2")
#: Variants that must fail exactly the tests the stock class fails.
EXACT_VARIANTS = ("none", "all")
HUB_TOKENIZER = "hf-internal-testing/tiny-random-clip"
SMALL_VOCAB = 1000


def small_clip_tokenizer() -> Any:
    """A CLIP BPE tokenizer with ``SMALL_VOCAB`` tokens: CLIP's 512 byte tokens, its first merges
    and the two special tokens (the tests' text encoders have a vocabulary of 1000)."""
    from transformers import CLIPTokenizer

    from diffaccel.tokenizers import clip_tokenizer

    model = json.loads(clip_tokenizer().backend_tokenizer.to_str())["model"]
    kept = SMALL_VOCAB - 2
    vocab = {token: index for token, index in model["vocab"].items() if index < kept}
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = kept, kept + 1
    merges = [tuple(merge) for merge in model["merges"][: kept - 512]]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def _patch_tokenizer_loading() -> None:
    """Make ``CLIPTokenizer.from_pretrained(HUB_TOKENIZER)`` build the small tokenizer offline."""
    from transformers import CLIPTokenizer

    original = CLIPTokenizer.from_pretrained.__func__

    def from_pretrained(cls: type, name: Any, *args: Any, **kwargs: Any) -> Any:
        if str(name) == HUB_TOKENIZER:
            return small_clip_tokenizer()
        return original(cls, name, *args, **kwargs)

    CLIPTokenizer.from_pretrained = classmethod(from_pretrained)


def _with_feature(accelerated: type, schedule: str) -> type:
    """A subclass of ``accelerated`` (same name and ``__init__`` signature) whose instances are
    built with ``EncoderReuseConfig(schedule)`` attached."""
    import diffaccel

    config = diffaccel.EncoderReuseConfig(schedule)
    init = accelerated.__init__

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        if self.unet is not None:  # a text-encoder-only pipeline (encode_prompt tests) has nothing to accelerate
            diffaccel.accelerate(self, config)

    return type(accelerated.__name__, (accelerated,), {"__init__": __init__, "__module__": accelerated.__module__})


def _pipeline_classes(variant: str) -> dict[type, type]:
    """Stock diffusers class -> the class the tests should use for ``variant``."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from diffaccel.pipelines import AcceleratedStableDiffusionPipeline, AcceleratedStableDiffusionXLPipeline

    accelerated = {StableDiffusionPipeline: AcceleratedStableDiffusionPipeline,
                   StableDiffusionXLPipeline: AcceleratedStableDiffusionXLPipeline}
    if variant == "stock":
        return {}
    if variant == "none":
        return accelerated
    return {stock: _with_feature(cls, variant) for stock, cls in accelerated.items()}


class _Plugin:
    """pytest plugin: swaps the test classes' ``pipeline_class`` and records every test's outcome."""

    def __init__(self, classes: dict[type, type], report: Path) -> None:
        self.classes, self.report = classes, report
        self.outcomes: dict[str, dict[str, str]] = {}

    def pytest_collection_modifyitems(self, items: list[Any]) -> None:
        import diffusers.pipelines

        for replacement in self.classes.values():
            # diffusers' ReturnNameVisitor (test_encode_prompt_works_in_isolation) looks a pipeline
            # class up by name in diffusers.pipelines, where only diffusers' own classes are.
            setattr(diffusers.pipelines, replacement.__name__, replacement)
        for item in items:
            cls = getattr(item, "cls", None)
            replacement = self.classes.get(getattr(cls, "pipeline_class", None))
            if replacement is not None:
                cls.pipeline_class = replacement

    def pytest_runtest_logreport(self, report: Any) -> None:
        if report.when == "call" or report.outcome != "passed":
            message = ""
            if report.failed:
                crash = getattr(report.longrepr, "reprcrash", None)
                message = crash.message if crash is not None else str(report.longrepr).strip().splitlines()[-1]
            outcome = "error" if report.failed and report.when != "call" else report.outcome
            previous = self.outcomes.get(report.nodeid)
            if previous is None or previous["outcome"] == "passed":
                self.outcomes[report.nodeid] = {"outcome": outcome, "message": message.splitlines()[0][:300] if message else ""}
                # Written after every test, so that an interrupted run still tells what it saw.
                self.report.write_text(json.dumps(self.outcomes, indent=1, sort_keys=True))


def run_worker(checkout: Path, variant: str, report: Path, select: str | None) -> int:
    """Run the test files for one variant in this process and write the outcomes to ``report``."""
    import pytest

    import diffaccel  # noqa: F401  (imports the installed diffusers before the checkout's conftest runs)

    _patch_tokenizer_loading()
    plugin = _Plugin(_pipeline_classes(variant), report)
    os.chdir(checkout)
    args = ["-q", "-p", "no:cacheprovider", "--no-header", "-o", "addopts=", *TEST_FILES]
    if select:
        args += ["-k", select]
    status = pytest.main(args, plugins=[plugin])
    return 0 if status in (0, 1) else int(status)


def _run_variant(checkout: Path, variant: str, select: str | None, workdir: Path) -> dict[str, dict[str, str]]:
    report = workdir / f"{variant.replace(':', '_')}.json"
    command = [sys.executable, __file__, str(checkout), "--worker", variant, "--report", str(report)]
    if select:
        command += ["-k", select]
    # One thread per worker: the tests' models are tiny, and variants may run side by side (--jobs).
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1")
    begin = time.perf_counter()
    log = workdir / f"{variant.replace(':', '_')}.log"
    with open(log, "w") as handle:
        status = subprocess.run(command, env=env, stdout=handle, stderr=subprocess.STDOUT).returncode
    if status != 0 or not report.is_file():
        raise SystemExit(f"variant {variant!r}: pytest did not run (status {status}); see {log}")
    outcomes = json.loads(report.read_text())
    counts = {key: sum(1 for o in outcomes.values() if o["outcome"] == key) for key in ("passed", "failed", "error", "skipped")}
    print(f"{variant:>12}: {counts} in {time.perf_counter() - begin:.0f} s", flush=True)
    return outcomes


def _bad(outcome: dict[str, str] | None) -> bool:
    return outcome is not None and outcome["outcome"] in ("failed", "error")


def new_failures(stock: dict[str, dict[str, str]], variant: dict[str, dict[str, str]]) -> dict[str, str]:
    """Tests that fail (or error) in ``variant`` but not with the stock class, with their message."""
    return {test: o["message"] for test, o in sorted(variant.items()) if _bad(o) and not _bad(stock.get(test))}


def _checkout_version(checkout: Path) -> str:
    for path, marker in ((checkout / "src/diffusers/__init__.py", "__version__ = "), (checkout / "setup.py", "version=")):
        if path.is_file():
            for line in path.read_text().splitlines():
                if line.strip().startswith(marker):
                    return line.split("=", 1)[1].split("#")[0].strip().strip(",").strip("\"'")
    return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkout", type=Path, help="a diffusers source checkout (needs its tests/ folder)")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help="comma-separated: stock, none, or EncoderReuseConfig schedules such as all, uniform:2")
    parser.add_argument("-k", dest="select", default=None, help="pytest -k expression, to run a subset")
    parser.add_argument("--json", type=Path, default=None, help="write the comparison here")
    parser.add_argument("--jobs", type=int, default=1, help="variants run at once")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--report", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    checkout = args.checkout.resolve()
    if args.worker is not None:
        return run_worker(checkout, args.worker, args.report, args.select)
    missing = [f for f in TEST_FILES if not (checkout / f).is_file()]
    if missing:
        raise SystemExit(f"{checkout} has no {missing}: pass a diffusers checkout with its tests/ folder")
    import diffusers

    print(f"diffusers installed {diffusers.__version__}, checkout {checkout} says {_checkout_version(checkout)}")
    variants = [v for v in args.variants.split(",") if v]
    if "stock" not in variants:
        variants.insert(0, "stock")
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"diffaccel-conformance-{os.getpid()}"
    workdir.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
        runs = {variant: pool.submit(_run_variant, checkout, variant, args.select, workdir) for variant in variants}
        results = {variant: run.result() for variant, run in runs.items()}
    stock = results["stock"]
    comparison: dict[str, Any] = {"diffusers": diffusers.__version__, "stock_failures": new_failures({}, stock)}
    status = 0
    for variant in variants[1:]:
        extra = new_failures(stock, results[variant])
        comparison[variant] = extra
        note = "must be none" if variant in EXACT_VARIANTS else "expected-output tests may legitimately differ"
        print(f"\n{variant}: {len(extra)} failure(s) the stock class does not have ({note})")
        for test, message in extra.items():
            print(f"  {test}\n      {message}")
        if extra and variant in EXACT_VARIANTS:
            status = 1
    print(f"\nstock class: {len(comparison['stock_failures'])} failure(s) of its own (hub downloads, slices "
          "computed with the hub tokenizer, ...): the baseline, ignored above")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(comparison, indent=2))
    return status


if __name__ == "__main__":
    sys.exit(main())
