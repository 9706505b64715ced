"""Per-block strengths and strength schedules: exact against independent references.

On tiny Flux 2, Flux 1 and SDXL (LyCORIS-made files on every Linear), with a LoKr and a T-LoRA:
- blocks {"*": 0.5} == strength 0.5;
- blocks {<first block list>.*: 0} == the same file with those modules removed (filtered file);
- a constant schedule of 0.7 == strength 0.7; outside a schedule's non-zero span: the base model;
- merge with blocks == apply with blocks (a merged model against the bypass runtime);
- a per-sample A/B batch with blocks: each sample equals its own single-strength run;
- errors: a pattern that matches nothing, a schedule given to merge, bad keyframes.
"""

from __future__ import annotations

import json

import pytest
import torch
from lycoris_reference import save_random_lycoris_file
from model_pairs import make_pair
from safetensors import safe_open
from safetensors.torch import save_file

from comfyui_lycoris.core import api
from comfyui_lycoris.core.config import parse_config
from comfyui_lycoris.core.strength_shape import Schedule, StrengthShapeError, parse_block_lines, resolve_blocks

FIRST_BLOCKS = {"flux2": "double_blocks", "flux1": "double_blocks", "sdxl": "input_blocks"}
CONFIGS = {
    "lokr": {"algo": "lokr", "multiplier": 1.0, "linear_dim": 10000, "linear_alpha": 1, "factor": 4,
             "full_matrix": True},
    "tlora": {"algo": "tlora", "multiplier": 1.0, "linear_dim": 8, "linear_alpha": 4, "tlora_min_rank": 2,
              "tlora_alpha": 1.0},
}


@pytest.fixture(scope="module", params=["flux2", "flux1", "sdxl"])
def pair(request):
    return make_pair(request.param)


@pytest.fixture(params=list(CONFIGS))
def adapter_file(pair, request, tmp_path):
    config = parse_config({**CONFIGS[request.param], "apply_preset": {"target_module": ["Linear"]}})
    model = pair.profile.build_skeleton(pair.unet_config, device="cpu")
    model.load_state_dict(pair.diffusers.state_dict())
    path = tmp_path / f"{request.param}.safetensors"
    save_random_lycoris_file(config, model, path, scale=0.1)
    return path


def merged_denoised(pair, merged) -> torch.Tensor:
    merged.patch_model()
    try:
        return pair.comfy_denoised(merged)
    finally:
        merged.unpatch_model()


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return float((a - b).abs().max()) <= 1e-5 * float(b.abs().max()) + 1e-6


def test_all_blocks_at_half_is_strength_half(pair, adapter_file):
    adapter = api.load_adapter(adapter_file, pair.patcher, strict=True)
    ours = pair.comfy_denoised(api.apply(pair.patcher, adapter, 1.0, blocks={"*": 0.5}))
    assert close(ours, pair.comfy_denoised(api.apply(pair.patcher, adapter, 0.5)))
    assert not close(ours, pair.comfy_denoised()), "the adapter does something"


def test_a_block_at_zero_is_the_file_without_those_modules(pair, adapter_file, tmp_path):
    adapter = api.load_adapter(adapter_file, pair.patcher, strict=True)
    first = FIRST_BLOCKS[pair.family]
    dropped = {b.path for b in adapter.bindings.values() if b.route.comfy_module.startswith(f"{first}.")}
    assert dropped and len(dropped) < len(adapter.bindings)
    prefixes = tuple(f"lycoris_{p.replace('.', '_')}." for p in dropped)
    with safe_open(str(adapter_file), "pt") as fh:
        kept = {k: fh.get_tensor(k) for k in fh.keys() if not k.startswith(prefixes)}
        metadata = fh.metadata()
    filtered = tmp_path / "filtered.safetensors"
    save_file(kept, str(filtered), metadata)
    reference = pair.comfy_denoised(api.apply(pair.patcher, api.load_adapter(filtered, pair.patcher), 1.0))
    ours = pair.comfy_denoised(api.apply(pair.patcher, adapter, 1.0, blocks={f"{first}.*": 0}))
    assert close(ours, reference)
    if adapter.tlora is None:  # a merged T-LoRA is one timestep's mask; bypass follows each sample's
        merged, _ = api.merge(pair.patcher, adapter, 1.0, blocks={f"{first}.*": 0})
        assert close(merged_denoised(pair, merged), reference), "merge with blocks == bypass with blocks"


def test_first_matching_pattern_wins_and_merge_matches_bypass(pair, adapter_file):
    adapter = api.load_adapter(adapter_file, pair.patcher, strict=True)
    first = FIRST_BLOCKS[pair.family]
    paths = list(adapter.by_comfy_module())
    index = min(int(p.split(".")[1]) for p in paths if p.startswith(f"{first}."))
    blocks = {f"{first}.{index}.*": -0.5, f"{first}.*": 0.25, "*": 1.5}
    bypass = pair.comfy_denoised(api.apply(pair.patcher, adapter, 0.8, blocks=blocks))
    if adapter.tlora is None:  # a merged T-LoRA is one timestep's mask; bypass follows each sample's
        merged, _ = api.merge(pair.patcher, adapter, 0.8, blocks=blocks)
        assert close(merged_denoised(pair, merged), bypass)
    assert not close(bypass, pair.comfy_denoised(api.apply(pair.patcher, adapter, 0.8 * 1.5)))
    resolved = resolve_blocks(blocks, paths)
    assert {resolved[p] for p in paths if p.startswith(f"{first}.{index}.")} == {-0.5}
    assert {resolved[p] for p in paths if not p.startswith(f"{first}.")} == {1.5}


def test_schedules_constant_and_outside_their_span(pair, adapter_file):
    adapter = api.load_adapter(adapter_file, pair.patcher, strict=True)
    constant = pair.comfy_denoised(api.apply(pair.patcher, adapter, 1.0, schedule=[(0.0, 0.7), (1.0, 0.7)]))
    assert close(constant, pair.comfy_denoised(api.apply(pair.patcher, adapter, 0.7)))
    # The two samples sit at different sigmas: a span covering only the first sample's percent.
    sampling = pair.patcher.get_model_object("model_sampling")
    bound = Schedule.of([(0.0, 1.0)]).bind(sampling.percent_to_sigma)
    p0, p1 = (float(p) for p in bound.percent_of(pair.inputs["sigma"]))
    assert p0 < p1, "sample 0 is the earlier (noisier) one"
    cut = (p0 + p1) / 2
    schedule = [(0.0, 1.0), (cut - 0.01, 1.0), (cut, 0.0), (1.0, 0.0)]
    out = pair.comfy_denoised(api.apply(pair.patcher, adapter, 1.0, schedule=schedule))
    full = pair.comfy_denoised(api.apply(pair.patcher, adapter, 1.0))
    base = pair.comfy_denoised()
    assert close(out[0], full[0]) and close(out[1], base[1])


def test_per_sample_ab_with_blocks_equals_single_runs(pair, adapter_file):
    adapter = api.load_adapter(adapter_file, pair.patcher, strict=True)
    blocks = {f"{FIRST_BLOCKS[pair.family]}.*": 0.5}
    sweep = pair.comfy_denoised(api.apply_sweep(pair.patcher, adapter, (0.0, 1.0), blocks=blocks))
    singles = [pair.comfy_denoised(api.apply(pair.patcher, adapter, s, blocks=blocks))[i] for i, s in enumerate((0, 1))]
    assert close(sweep[0], singles[0]) and close(sweep[1], singles[1])


def test_variants_in_one_batch_equal_each_variant_applied_alone(pair, adapter_file):
    adapter = api.load_adapter(adapter_file, pair.patcher, strict=True)
    first = FIRST_BLOCKS[pair.family]
    looks = [api.Variant("first blocks off", 0.8, blocks={f"{first}.*": 0.0}),
             api.Variant("late only", 1.2, blocks=[("*", 0.5)], schedule=[(0.0, 0.0), (0.5, 0.0), (1.0, 1.0)])]
    ours = pair.comfy_denoised(api.apply_variants(pair.patcher, adapter, looks))
    for i, look in enumerate(looks):
        alone = pair.comfy_denoised(api.apply(pair.patcher, adapter, look.strength, blocks=look.blocks,
                                              schedule=look.schedule))
        assert close(ours[i], alone[i]), look.name
    assert not close(ours[0], pair.comfy_denoised()[0]), "the variant does something"
    with pytest.raises(api.StrengthError, match="variants: two variants are named 'a'"):
        api.apply_variants(pair.patcher, adapter, [api.Variant("a"), api.Variant("a", 0.5)])
    with pytest.raises(StrengthShapeError, match="variants: 'typo': blocks: pattern 'dubble_blocks.\\*' matches no"):
        api.apply_variants(pair.patcher, adapter, [api.Variant("ok"), api.Variant("typo", blocks={"dubble_blocks.*": 0})])


def test_errors_name_the_input(pair, adapter_file):
    adapter = api.load_adapter(adapter_file, pair.patcher, strict=True)
    with pytest.raises(StrengthShapeError, match="blocks: pattern 'dubble_blocks.\\*' matches no adapted module"):
        api.apply(pair.patcher, adapter, 1.0, blocks={"dubble_blocks.*": 0.0})
    with pytest.raises(StrengthShapeError, match="schedule: a strength schedule cannot be merged"):
        api.merge(pair.patcher, adapter, 1.0, schedule=[(0, 1)])
    with pytest.raises(StrengthShapeError, match="keyframe 1 percent must be in 0..1"):
        api.apply(pair.patcher, adapter, 1.0, schedule=[(1.5, 1.0)])
    with pytest.raises(StrengthShapeError, match="blocks: 'x': must be a finite number"):
        api.apply(pair.patcher, adapter, 1.0, blocks={"x": float("nan")})


def test_block_lines_and_schedule_math():
    assert parse_block_lines("double_blocks.* = 0.5  # early\n\nsingle_blocks.1? = 0\n") == [
        ("double_blocks.*", 0.5), ("single_blocks.1?", 0.0)]
    with pytest.raises(StrengthShapeError, match="block_strengths: line 1 'oops' is not 'pattern = value'"):
        parse_block_lines("oops")
    schedule = Schedule.of([(0.6, 0.0), (0.2, 1.0)])
    values = schedule.at_percent(torch.tensor([0.0, 0.2, 0.4, 0.6, 1.0])).tolist()
    assert values == pytest.approx([1.0, 1.0, 0.5, 0.0, 0.0])
    assert json.dumps(schedule.keyframes) == "[[0.2, 1.0], [0.6, 0.0]]"
