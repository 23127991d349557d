"""Peer variants of ``diffaccel eval``: each peer really changes the output when attached, detach gives
bitwise the untouched pipeline (outputs and state), re-attaching repeats the attached output, the
description is JSON with the settings used, and a peer that does not apply is refused at build."""

from __future__ import annotations

import importlib
import importlib.metadata
import json

import numpy as np
import pytest
import torch

from diffaccel import seams
from diffaccel.evaluation import PeerAttachment, peer_attachment
from diffaccel.evaluation import peers as peers_module
from diffaccel.evaluation.variants import PEER_PACKAGES, VariantSpecError, parse_variant
from diffaccel.testing import tiny_call_inputs, tiny_pipeline

STEPS = 6

# (family, spec, settings the description must contain: the spec's own and some of the peer's defaults)
CASES = [
    ("sd", "deepcache:interval=3", {"cache_interval": 3, "cache_branch_id": 0, "skip_mode": "uniform"}),
    ("sd", "tomesd:ratio=0.5", {"ratio": 0.5, "max_downsample": 1, "use_rand": True}),
    ("flux", "diffusers-cache:FirstBlockCache:threshold=0.5", {"kind": "FirstBlockCache", "threshold": 0.5}),
    # not CacheMixins, and their pipelines set no cache context: applied through CacheMixin.enable_cache
    ("pixart-sigma", "diffusers-cache:FirstBlockCache:threshold=0.5", {"kind": "FirstBlockCache"}),
    ("sd3", "diffusers-cache:TaylorSeer:cache_interval=2", {"kind": "TaylorSeer", "cache_interval": 2}),
    (
        "flux",
        "cache-dit:Fn_compute_blocks=1,Bn_compute_blocks=0,max_warmup_steps=1,residual_diff_threshold=10",
        {"Fn_compute_blocks": 1, "max_warmup_steps": 1, "residual_diff_threshold": 10.0, "max_cached_steps": -1},
    ),
    ("flux", "quanto:int8", {"weights": "qint8", "activations": None}),
    ("flux", "torchao:int8wo", {"config": "Int8WeightOnlyConfig", "set_inductor_config": False}),
    ("flux", "torchao:int8dq", {"config": "Int8DynamicActivationInt8WeightConfig", "set_inductor_config": False}),
]


def _needs_package(spec: str) -> None:
    peer = spec.partition(":")[0]
    if peer in PEER_PACKAGES:
        pytest.importorskip(PEER_PACKAGES[peer])


def _run(pipe, family: str, global_seed: int) -> np.ndarray:
    torch.manual_seed(global_seed)  # a peer's output must not depend on the global RNG
    out = pipe("a red circle", num_inference_steps=STEPS, output_type="np",
               generator=torch.Generator().manual_seed(0), **tiny_call_inputs(family))
    return out[0]


def _state(pipe) -> list:
    """What a peer may patch: the pipeline's class and instance attributes, and for every denoiser
    module its class, attributes, submodules and hooks."""
    state: list = [sorted((k, id(v)) for k, v in vars(type(pipe)).items())]
    state.append(sorted((k, id(v)) for k, v in vars(pipe).items() if not k.startswith("_")))
    for name, model in seams.denoisers(pipe).items():
        for module_name, module in model.named_modules():
            attrs = vars(module)
            dicts = {k: sorted(map(str, v)) for k, v in attrs.items() if isinstance(v, dict)}
            state.append((name, module_name, type(module), sorted(attrs), dicts))
    return state


@pytest.mark.parametrize(("family", "spec", "settings"), CASES, ids=[c[1].partition(",")[0] for c in CASES])
def test_peer_attaches_changes_output_and_detaches_to_exactly_untouched(family, spec, settings):
    _needs_package(spec)
    pipe = tiny_pipeline(family)
    untouched = _run(pipe, family, 1)
    state = _state(pipe)

    peer = peer_attachment(pipe, parse_variant(f"p={spec}"))
    assert isinstance(peer, PeerAttachment)
    assert _state(pipe) == state, "building the peer must leave the pipeline untouched"
    assert np.array_equal(_run(pipe, family, 2), untouched)

    peer.attach()
    first = _run(pipe, family, 3)
    again = _run(pipe, family, 4)
    peer.detach()
    assert not np.array_equal(first, untouched), f"{spec} did not change the output"
    assert np.array_equal(again, first), "two attached calls with the same seed differ"
    assert _state(pipe) == state
    assert np.array_equal(_run(pipe, family, 5), untouched)

    peer.attach()
    second = _run(pipe, family, 6)
    peer.detach()
    assert np.array_equal(second, first), "re-attaching gave a different attached output"
    assert _state(pipe) == state
    assert np.array_equal(_run(pipe, family, 7), untouched)
    assert np.array_equal(_run(tiny_pipeline(family), family, 8), untouched), "a fresh pipeline differs"

    description = json.loads(json.dumps(peer.describe()))
    assert description["peer"] == spec.partition(":")[0]
    assert description["version"] == importlib.metadata.version(description["package"])
    assert settings.items() <= description["settings"].items()


def test_weight_peers_swap_a_quantized_copy_and_leave_the_original_weights():
    pytest.importorskip("torchao")
    pipe = tiny_pipeline("flux")
    original = pipe.transformer
    weights = {k: v.clone() for k, v in original.state_dict().items()}
    peer = peer_attachment(pipe, parse_variant("ao=torchao:int8wo"))
    peer.attach()
    assert pipe.transformer is not original
    assert peer.describe()["settings"]["quantized"] == sum(
        isinstance(m, torch.nn.Linear) for m in original.modules()
    )
    peer.detach()
    assert pipe.transformer is original
    assert all(torch.equal(weights[k], v) for k, v in original.state_dict().items())


@pytest.mark.parametrize(
    ("family", "spec", "why"),
    [
        ("flux", "deepcache:interval=3", "needs a unet denoiser"),
        ("sd", "deepcache:interval=3,branch=9", "down block 3"),
        ("wan", "tomesd:ratio=0.5", "needs a unet denoiser"),
        ("sd", "cache-dit", "needs a transformer denoiser"),
        ("wan", "diffusers-cache:TaylorSeer", "found no block of WanTransformer3DModel"),
        ("flux", "diffusers-cache:MagCache", "mag_ratios"),
        ("pixart-sigma", "diffusers-cache:FasterCache", "current_timestep"),
        # diffusers' own hook fails on SD3's last block, which returns no encoder stream
        ("sd3", "diffusers-cache:FirstBlockCache", "cannot cache StableDiffusion3Pipeline: .* no encoder stream"),
        ("sd3", "diffusers-cache:MagCache:calibrate=true", "cannot cache StableDiffusion3Pipeline"),
    ],
)
def test_a_peer_that_does_not_apply_is_refused_at_build(family, spec, why):
    _needs_package(spec)
    pipe = tiny_pipeline(family)
    state = _state(pipe)
    with pytest.raises(VariantSpecError, match=f"variant 'x' .*{why}"):
        peer_attachment(pipe, parse_variant(f"x={spec}"))
    assert _state(pipe) == state


@pytest.mark.skipif(torch.cuda.is_available(), reason="int4 weight-only is refused on CPU-only machines")
def test_torchao_int4_is_refused_at_build_on_cpu():
    pytest.importorskip("torchao")
    pipe = tiny_pipeline("flux")
    original = pipe.transformer
    refused = r"variant 'i4' \('torchao:int4wo'\): torchao cannot quantize .*Int4WeightOnlyConfig"
    with pytest.raises(VariantSpecError, match=refused):
        peer_attachment(pipe, parse_variant("i4=torchao:int4wo"))
    assert pipe.transformer is original


def test_a_missing_peer_package_names_the_pip_install_line(monkeypatch):
    real = importlib.import_module

    def without_deepcache(name, *args, **kwargs):
        if name == "DeepCache":
            raise ModuleNotFoundError("No module named 'DeepCache'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(peers_module.importlib, "import_module", without_deepcache)
    with pytest.raises(VariantSpecError, match=r"variant 'dc' .*pip install DeepCache"):
        peer_attachment(tiny_pipeline("sd"), parse_variant("dc=deepcache:interval=2"))
