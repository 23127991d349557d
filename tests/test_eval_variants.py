"""Variant specs of ``diffaccel eval``: every part of the grammar parsed into the real configs or peer
options, every bad spec refused naming the variant, before any model work."""

from __future__ import annotations

import json

import pytest

from diffaccel import DeltaCacheConfig, EncoderReuseConfig, QuantizationConfig, QuantizedAttentionConfig
from diffaccel.errors import DiffaccelError
from diffaccel.evaluation import variants as variants_module
from diffaccel.evaluation.variants import (
    Variant,
    VariantSpecError,
    check_variant_applies,
    missing_peer_packages,
    parse_variant,
    parse_variants,
)
from diffaccel.features.key_steps import ExplicitSchedule, FasterDiffusionSchedule, UniformSchedule


@pytest.mark.parametrize(
    ("spec", "configs"),
    [
        ("encoder-reuse:faster-diffusion", (EncoderReuseConfig(FasterDiffusionSchedule()),)),
        ("encoder-reuse:uniform:3", (EncoderReuseConfig(UniformSchedule(3)),)),
        ("encoder-reuse:all", (EncoderReuseConfig(UniformSchedule(1)),)),
        ("encoder-reuse:0,1,5", (EncoderReuseConfig(ExplicitSchedule((0, 1, 5))),)),
        ("delta-cache:0.1", (DeltaCacheConfig(threshold=0.1),)),
        ("delta-cache:inf", (DeltaCacheConfig(threshold=float("inf")),)),
        ("nvfp4", (QuantizationConfig("nvfp4"),)),
        ("int8", (QuantizationConfig("int8"),)),
        ("nvfp4+residual", (QuantizationConfig("nvfp4+residual"),)),
        ("quantized-attention", (QuantizedAttentionConfig(),)),
        (
            "encoder-reuse:uniform:2+delta-cache:0.05+nvfp4+residual+quantized-attention",
            (
                EncoderReuseConfig(UniformSchedule(2)),
                DeltaCacheConfig(threshold=0.05),
                QuantizationConfig("nvfp4+residual"),
                QuantizedAttentionConfig(),
            ),
        ),
    ],
)
def test_diffaccel_specs_build_the_real_configs(spec, configs):
    variant = parse_variant(f"v={spec}")
    assert variant == Variant("v", spec, configs)
    assert variant.peer is None and not variant.untouched


@pytest.mark.parametrize(
    ("spec", "peer", "options"),
    [
        ("deepcache:interval=3", "deepcache", {"interval": 3, "branch": 0}),
        ("deepcache:interval=5,branch=2", "deepcache", {"interval": 5, "branch": 2}),
        ("diffusers-cache:FirstBlockCache", "diffusers-cache", {"kind": "FirstBlockCache"}),
        ("diffusers-cache:FirstBlockCache:threshold=0.2", "diffusers-cache", {"kind": "FirstBlockCache", "threshold": 0.2}),
        (
            "diffusers-cache:TaylorSeer:cache_interval=4,disable_cache_after_step=20,use_lite_mode=true",
            "diffusers-cache",
            {"kind": "TaylorSeer", "cache_interval": 4, "disable_cache_after_step": 20, "use_lite_mode": True},
        ),
        ("diffusers-cache:MagCache:threshold=0.06,max_skip_steps=3", "diffusers-cache",
         {"kind": "MagCache", "threshold": 0.06, "max_skip_steps": 3}),
        ("diffusers-cache:FasterCache", "diffusers-cache", {"kind": "FasterCache"}),
        ("diffusers-cache:PyramidAttentionBroadcast:spatial_attention_block_skip_range=2", "diffusers-cache",
         {"kind": "PyramidAttentionBroadcast", "spatial_attention_block_skip_range": 2}),
        ("cache-dit", "cache-dit", {}),
        ("cache-dit:Fn_compute_blocks=8,residual_diff_threshold=0.12", "cache-dit",
         {"Fn_compute_blocks": 8, "residual_diff_threshold": 0.12}),
        ("tomesd:ratio=0.5", "tomesd", {"ratio": 0.5}),
        ("quanto:int8", "quanto", {"weights": "int8"}),
        ("quanto:float8", "quanto", {"weights": "float8"}),
        ("torchao:int4wo", "torchao", {"config": "int4wo"}),
    ],
)
def test_peer_specs(spec, peer, options):
    variant = parse_variant(f"p={spec}")
    assert (variant.name, variant.spec, variant.configs, variant.peer) == ("p", spec, (), peer)
    assert dict(variant.peer_options) == options
    assert all(type(v) is type(options[k]) for k, v in variant.peer_options.items())
    with pytest.raises(TypeError):
        variant.peer_options["x"] = 1


def test_parse_variants_puts_untouched_first_and_reads_grids(tmp_path):
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"dc3": "deepcache:interval=3", "q8": "int8"}), encoding="utf-8")
    variants = parse_variants(["reuse=encoder-reuse:uniform:2", "untouched=none"], grid=grid)
    assert [(v.name, v.spec) for v in variants] == [
        ("untouched", "none"), ("reuse", "encoder-reuse:uniform:2"), ("dc3", "deepcache:interval=3"), ("q8", "int8"),
    ]
    assert variants[0] == Variant("untouched", "none") and variants[0].untouched
    assert parse_variants() == [Variant("untouched", "none")]


def test_yaml_grid(tmp_path):
    pytest.importorskip("yaml")
    grid = tmp_path / "grid.yaml"
    grid.write_text("fbc: diffusers-cache:FirstBlockCache:threshold=0.1\nnv: nvfp4\n", encoding="utf-8")
    assert [(v.name, v.peer, v.configs) for v in parse_variants(grid=grid)] == [
        ("untouched", None, ()), ("fbc", "diffusers-cache", ()), ("nv", None, (QuantizationConfig("nvfp4"),)),
    ]


def test_yaml_grid_without_pyyaml_is_a_clear_error(tmp_path, monkeypatch):
    grid = tmp_path / "grid.yml"
    grid.write_text("nv: nvfp4\n", encoding="utf-8")
    real = variants_module.importlib.util.find_spec
    monkeypatch.setattr(variants_module.importlib.util, "find_spec", lambda name: None if name == "yaml" else real(name))
    with pytest.raises(VariantSpecError, match="needs PyYAML"):
        parse_variants(grid=grid)


@pytest.mark.parametrize(
    ("text", "what"),
    [
        ("reuse", "expected NAME=SPEC"),
        ("=int8", "variant name"),
        ("bad/name=int8", "variant name"),
        ("../up=int8", "variant name"),
        ("v=", "empty spec"),
        ("v=fp8", "unknown feature or peer 'fp8'"),
        ("v=bf16", "unknown feature or peer 'bf16'"),
        ("v=int8+none", "unknown feature or peer 'none'"),
        ("v=encoder-reuse", "needs a value"),
        ("v=encoder-reuse:sometimes", "bad 'encoder-reuse'"),
        ("v=encoder-reuse:1,2", "bad 'encoder-reuse'.*step 0"),
        ("v=delta-cache:-1", "bad 'delta-cache'.*threshold"),
        ("v=delta-cache:nan", "bad 'delta-cache'"),
        ("v=nvfp4:8", "takes no value"),
        ("v=int8+nvfp4", "each feature may be given once"),
        ("v=delta-cache:0.1+delta-cache:0.2", "each feature may be given once"),
        ("v=residual", "unknown feature or peer 'residual'"),
        ("v=deepcache", "needs options"),
        ("v=deepcache:branch=1", "interval=N"),
        ("v=deepcache:interval=0", "interval=N"),
        ("v=deepcache:interval=two", "'interval' must be int"),
        ("v=deepcache:every=2", "unknown option 'every'"),
        ("v=deepcache:interval=2,interval=3", "given twice"),
        ("v=deepcache:interval=2+int8", "a peer runs alone"),
        ("v=diffusers-cache:FBC", "takes one of"),
        ("v=diffusers-cache:FirstBlockCache:thresh=0.1", "unknown option 'thresh'"),
        ("v=diffusers-cache:MagCache:mag_ratios=1", "unknown option 'mag_ratios'"),
        ("v=diffusers-cache:TaylorSeer:use_lite_mode=yes", "'use_lite_mode' must be bool"),
        ("v=diffusers-cache:FirstBlockCache:threshold", "expected key=value"),
        ("v=cache-dit:warmup=3", "unknown option 'warmup'"),
        ("v=tomesd:ratio=1.5", "0 < R < 1"),
        ("v=tomesd", "needs options"),
        ("v=quanto:int2", "takes one of \\('int8', 'int4', 'float8'\\)"),
        ("v=torchao:fp8", "takes one of"),
    ],
)
def test_bad_specs_name_the_variant(text, what):
    with pytest.raises(VariantSpecError, match=what) as info:
        parse_variant(text)
    assert str(info.value).startswith("variant ")
    name = text.partition("=")[0] if "=" in text else text
    assert repr(name) in str(info.value)
    assert isinstance(info.value, DiffaccelError)


def test_unknown_feature_lists_what_is_accepted():
    with pytest.raises(VariantSpecError) as info:
        parse_variant("v=fp8")
    for accepted in ("encoder-reuse:SCHEDULE", "delta-cache:THRESHOLD", "nvfp4+residual", "int8", "quantized-attention",
                     "deepcache:", "diffusers-cache:", "cache-dit", "tomesd:", "quanto:", "torchao:"):
        assert accepted in str(info.value)


def test_names_are_unique_and_untouched_is_reserved():
    with pytest.raises(VariantSpecError, match="'A'.*taken by variant 'a'"):
        parse_variants(["a=int8", "A=nvfp4"])
    with pytest.raises(VariantSpecError, match="'untouched'.*taken"):
        parse_variants(["untouched=int8"])
    with pytest.raises(VariantSpecError, match="variant 'x'"):
        parse_variants(["x=nvfp4", "x=int8"])


@pytest.mark.parametrize(
    ("name", "text", "what"),
    [
        ("bad.json", '{"a": "int8",', "bad JSON"),
        ("list.json", '["int8"]', "maps variant names to specs"),
        ("empty.json", "{}", "maps variant names to specs"),
        ("grid.toml", "a = 'int8'", ".json, .yaml or .yml"),
        ("nonstr.json", '{"a": 3}', "spec must be a string"),
        ("badspec.json", '{"q": "int3"}', "variant 'q'.*unknown feature"),
    ],
)
def test_bad_grids(tmp_path, name, text, what):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(VariantSpecError, match=what):
        parse_variants(grid=path)


def test_missing_grid_file(tmp_path):
    with pytest.raises(VariantSpecError, match="cannot read"):
        parse_variants(grid=tmp_path / "absent.json")


@pytest.mark.parametrize(
    ("spec", "needs"),
    [
        ("encoder-reuse:uniform:2", "unet"),
        ("delta-cache:0.1+encoder-reuse:uniform:2", "unet"),
        ("deepcache:interval=2", "unet"),
        ("tomesd:ratio=0.5", "unet"),
        ("diffusers-cache:FirstBlockCache", "transformer"),
        ("cache-dit", "transformer"),
    ],
)
def test_check_variant_applies_refuses_the_wrong_denoiser(spec, needs):
    variant = parse_variant(f"v={spec}")
    check_variant_applies(variant, needs)
    other = {"unet": "transformer", "transformer": "unet"}[needs]
    with pytest.raises(VariantSpecError, match=f"variant 'v'.*needs a {needs} denoiser; this model's is a {other}"):
        check_variant_applies(variant, other)


@pytest.mark.parametrize("spec", ["none", "delta-cache:0.1", "nvfp4+quantized-attention", "quanto:int8", "torchao:int8dq"])
def test_check_variant_applies_to_either_denoiser(spec):
    for kind in ("unet", "transformer"):
        check_variant_applies(parse_variant(f"v={spec}"), kind)
    with pytest.raises(ValueError, match="denoiser_kind"):
        check_variant_applies(parse_variant(f"v={spec}"), "vae")


def test_missing_peer_packages(monkeypatch):
    variants = parse_variants([
        "dc=deepcache:interval=2", "cd=cache-dit", "tm=tomesd:ratio=0.5", "qo=quanto:int4", "ao=torchao:int8wo",
        "fbc=diffusers-cache:FirstBlockCache", "nv=nvfp4",
    ])
    installed = {"DeepCache", "torchao"}
    asked = []

    def find_spec(name):
        asked.append(name)
        if name == "optimum.quanto":
            raise ModuleNotFoundError("No module named 'optimum'")  # what find_spec does when the parent is absent
        return object() if name in installed else None

    monkeypatch.setattr(variants_module.importlib.util, "find_spec", find_spec)
    assert missing_peer_packages(variants) == {"cd": "cache_dit", "tm": "tomesd", "qo": "optimum.quanto"}
    assert sorted(asked) == sorted(["DeepCache", "cache_dit", "tomesd", "optimum.quanto", "torchao"])


def test_missing_peer_packages_on_this_machine():
    import importlib.util

    variant = parse_variant("dc=deepcache:interval=2")
    expected = {} if importlib.util.find_spec("DeepCache") is not None else {"dc": "DeepCache"}
    assert missing_peer_packages([variant]) == expected


def test_variant_checks_its_name_and_what_it_attaches():
    with pytest.raises(VariantSpecError, match="variant name"):
        Variant("a b", "int8", (QuantizationConfig("int8"),))
    with pytest.raises(VariantSpecError, match="not both"):
        Variant("v", "int8", (QuantizationConfig("int8"),), peer="quanto", peer_options={"weights": "int8"})


def test_steering_parts_parse_into_their_configs_and_join_features_only():
    from diffaccel.evaluation.variants import parse_variant

    best = parse_variant("b=best-of:4")
    assert best.kind == "steering" and best.steering.num_particles == 4 and best.steering.resample_every == 0
    assert best.steering.final_correction is False  # keeping the best: a final resampling could only drop it
    fk = parse_variant("f=encoder-reuse:uniform:2+fk:particles=3,potential=difference,resample_start=6")
    assert (fk.steering.num_particles, fk.steering.potential, fk.steering.resample_start) == (3, "difference", 6)
    assert type(fk.configs[0]).__name__ == "EncoderReuseConfig"
    found = parse_variant("s=search:zero-order,budget_nfe=400,step_size=0.25")
    assert (found.steering.method, found.steering.budget_nfe, found.steering.step_size) == ("zero-order", 400, 0.25)
    for bad, message in [("x=best-of:many", "best-of needs"), ("x=fk:particles=2+best-of:2", "steers one way"),
                         ("x=search:grid", "search takes a method"), ("x=fk:particles=0", "num_particles"),
                         ("x=fk:walkers=2", "unknown option 'walkers'")]:
        with pytest.raises(VariantSpecError, match=message):
            parse_variant(bad)
