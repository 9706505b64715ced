"""Target resolution equals LyCORIS's own selection (create_lycoris after apply_preset)."""

import json
from pathlib import Path

import pytest
from lycoris.wrapper import network_module_dict
from lycoris_reference import lycoris_network, module_shapes

from comfyui_lycoris.core import host
from comfyui_lycoris.core.config import ConfigError, parse_config
from comfyui_lycoris.core.families import profile_named
from comfyui_lycoris.core.lycoris_modules import adapter_param_shapes
from comfyui_lycoris.core.plan_report import plan_stats, summarize
from comfyui_lycoris.core.targets import resolve
from comfyui_lycoris.core.tiny import TinySizes

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PRESETS = sorted(p for p in CONFIGS.glob("*.json") if p.name != "schema.json")
SIZES = {
    "flux2": TinySizes(family="flux2", width=64, heads=2, depth=2, single_depth=2, context_dim=32),
    "flux1": TinySizes(family="flux1", width=64, heads=2, depth=2, single_depth=2, context_dim=32),
    "sdxl": TinySizes(family="sdxl", width=64, depth=1, context_dim=32),
}


def comfy_unet_config(family):
    """The unet_config of the tiny ComfyUI model (ComfyUI adds settings, e.g. SDXL's 64 channels per head)."""
    return host.model_unet_config(host.build_tiny_model(SIZES[family]))


def plan_and_reference(config, family):
    profile = profile_named(family)
    ucfg = comfy_unet_config(family)
    plan = resolve(config, profile.build_skeleton(ucfg), profile, ucfg)
    network = lycoris_network(config, profile.build_skeleton(ucfg, device="cpu"))
    return plan, network


def assert_same_as_lycoris(plan, network):
    ours = {t.lora_name: adapter_param_shapes(t) for t in plan.targets}
    theirs = module_shapes(network)
    assert sorted(ours) == sorted(theirs), "same module set as LyCORIS"
    assert ours == theirs, "same parameter shapes (dim / factor / algorithm) per module"
    by_name = {t.lora_name: t for t in plan.targets}
    for module in network.loras:
        target = by_name[module.lora_name]
        assert type(module) is network_module_dict[target.algo]
        if hasattr(module, "lora_dim") and target.algo not in ("diag-oft", "boft", "ia3", "full"):
            assert module.lora_dim == target.dim
        if hasattr(module, "scale") and target.algo in ("lora", "loha", "tlora", "glora"):
            assert float(module.scale) == pytest.approx(target.alpha / target.dim)


PRESET_CASES = [(p, f) for p in PRESETS for f in json.loads(p.read_text())["families"]]


@pytest.mark.parametrize("path, family", PRESET_CASES, ids=[f"{p.stem}-{f}" for p, f in PRESET_CASES])
def test_shipped_preset_plan_equals_lycoris(path, family):
    config = parse_config(path.read_text())
    plan, network = plan_and_reference(config, family)
    assert_same_as_lycoris(plan, network)
    assert len(plan.targets) > 0


BASE = {"algo": "lokr", "multiplier": 1.0, "linear_dim": 8, "linear_alpha": 4, "factor": 4}
SEMANTIC_CASES = {
    "nested module_algo_map overrides the block": {
        "apply_preset": {"target_module": ["Flux2TransformerBlock"],
                         "module_algo_map": {"Flux2FeedForward": {"factor": 2, "algo": "loha", "dim": 4}}}},
    "regex names with name_algo_map": {
        "apply_preset": {"target_name": [r"transformer_blocks\.0\.attn\.to_q"],
                         "name_algo_map": {r"single_transformer_blocks\.\d+\.attn\.to_out": {"dim": 2, "algo": "lora"}}}},
    "fnmatch names and exclusions": {
        "apply_preset": {"target_module": ["Flux2Attention", "Flux2ParallelSelfAttention"], "use_fnmatch": True,
                         "exclude_name": ["*.to_k", "single_transformer_blocks.1*"]}},
    "a name inside a targeted class": {
        "apply_preset": {"target_module": ["Flux2Attention"], "target_name": ["transformer_blocks.1.attn"],
                         "name_algo_map": {"transformer_blocks.0.attn.to_v": {"factor": 2}}}},
    "decomposed lokr, per-class dims": {
        "decompose_both": True, "factor": 8,
        "apply_preset": {"target_module": ["Flux2FeedForward"], "module_algo_map": {"Flux2FeedForward": {"dim": 2}}}},
}


@pytest.mark.parametrize("case", list(SEMANTIC_CASES))
def test_selection_semantics_equal_lycoris(case):
    config = parse_config({**BASE, **SEMANTIC_CASES[case]})
    plan, network = plan_and_reference(config, "flux2")
    assert_same_as_lycoris(plan, network)


def test_no_state_leaks_between_resolutions():
    """A config with target_name, then one without: the second must not inherit the first's names."""
    first = parse_config({**BASE, **SEMANTIC_CASES["regex names with name_algo_map"]})
    second = parse_config({**BASE, "apply_preset": {"target_module": ["Flux2FeedForward"]}})
    fresh, _ = plan_and_reference(second, "flux2")
    plan_and_reference(first, "flux2")
    again, network = plan_and_reference(second, "flux2")
    assert [t.path for t in again.targets] == [t.path for t in fresh.targets]
    assert all(".ff." in t.path or ".ff_context." in t.path for t in again.targets)
    assert_same_as_lycoris(again, network)


def test_plan_routes_to_comfy_modules():
    config = parse_config((CONFIGS / "flux2_lokr.json").read_text())
    plan, _ = plan_and_reference(config, "flux2")
    by_path = plan.by_path()
    q = by_path["transformer_blocks.0.attn.to_q"]
    assert q.route.comfy_module == "double_blocks.0.img_attn.qkv" and q.module_kwargs["factor"] == 4
    assert by_path["transformer_blocks.0.ff.linear_in"].module_kwargs["factor"] == 2
    assert by_path["single_transformer_blocks.1.attn.to_qkv_mlp_proj"].route.comfy_module == "single_blocks.1.linear1"


@pytest.mark.parametrize("path, family, suggestion", [
    ("flux2_lokr.json", "sdxl", "its classes are:"),
    ("sdxl_lokr_attention.json", "flux2", "use target_module ['Flux2Attention'"),
])
def test_zero_matches_is_an_error_naming_the_models_classes(path, family, suggestion):
    config = parse_config((CONFIGS / path).read_text())
    profile = profile_named(family)
    ucfg = comfy_unet_config(family)
    with pytest.raises(ConfigError, match="matched no layer of this") as err:
        resolve(config, profile.build_skeleton(ucfg), profile, ucfg)
    assert suggestion in str(err.value)


def test_summary_counts_parameters():
    config = parse_config((CONFIGS / "flux2_lokr.json").read_text())
    plan, network = plan_and_reference(config, "flux2")
    stats = plan_stats(plan)
    assert stats["params"] == sum(p.numel() for m in network.loras for n, p in m.named_parameters()
                                  if not n.startswith("org_"))
    text = summarize(plan)
    assert "Flux2Attention" in text and "Flux2FeedForward" in text and f"{stats['params']:,} parameters" in text


GENERIC = {"algo": "lokr", "multiplier": 1.0, "linear_dim": 10000, "linear_alpha": 1, "factor": 10,
           "apply_preset": {"target_module": ["Attention", "FeedForward"]}}


def plan_of(config, family):
    profile = profile_named(family)
    ucfg = comfy_unet_config(family)
    return resolve(parse_config(config), profile.build_skeleton(ucfg), profile, ucfg)


def test_generic_attention_on_flux1_warns_which_class_matched_nothing():
    """SimpleTuner's generic example selects only FeedForward on Flux 1: say so, and name Flux 1's class."""
    plan = plan_of(GENERIC, "flux1")
    assert {t.owner_class for t in plan.targets} == {"FeedForward"}
    assert plan.warnings == (
        "apply_preset.target_module: 'Attention' matched no module of this Flux 1 model, so no attention layer is "
        "adapted (only FeedForward: 8 modules); this model's attention classes: FluxAttention",)
    mapped = plan_of({**GENERIC, "apply_preset": {"module_algo_map": {"Attention": {}, "FeedForward": {}}}}, "flux1")
    assert mapped.warnings[0].startswith("apply_preset.module_algo_map: 'Attention' matched no module")
    assert "this model's classes:" in plan_of({**GENERIC, "apply_preset": {"target_module": ["Nope", "FeedForward"]}},
                                              "flux1").warnings[0]


@pytest.mark.parametrize("path, family", PRESET_CASES, ids=[f"{p.stem}-{f}" for p, f in PRESET_CASES])
def test_multi_family_presets_do_not_warn_about_other_families_classes(path, family):
    """lora/loha/tlora list each kind under every family's class name: no class warning when the kind matched."""
    plan = plan_of(json.loads(path.read_text()), family)
    assert not [w for w in plan.warnings if "matched no module" in w or w.startswith("families:")]
    feedforward = [w for w in plan.warnings if w.startswith("FeedForward:")]
    assert bool(feedforward) == (family == "sdxl" and path.stem in ("lora", "loha", "all_linear_lokr"))


def test_feedforward_on_sdxl_warns_and_names_the_attention_preset():
    (warning,) = plan_of({**GENERIC, "full_matrix": True}, "sdxl").warnings
    assert warning.startswith("FeedForward: 22 adapted layers are inside SDXL's FeedForward blocks (selected by "
                              "FeedForward, e.g. down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj)")
    assert "loss to NaN" in warning and "sdxl_lokr_attention" in warning


def test_name_patterns_that_match_nothing_warn():
    config = {**BASE, "apply_preset": {"target_module": ["Flux2Attention"], "target_name": [r"double_blocks\.0\..*"],
                                       "exclude_name": [r".*\.img_attn\..*"]}}
    warnings = plan_of(config, "flux2").warnings
    assert warnings[0].startswith(r"apply_preset.target_name[0]: 'double_blocks\.0\..*' matched no module of this "
                                  "Flux 2 model, so it adapts nothing; names are diffusers module paths such as "
                                  "'transformer_blocks.0.attn.to_q'")
    assert warnings[1].startswith(r"apply_preset.exclude_name[0]: '.*\.img_attn\..*' matched no module")


def test_preset_for_another_family_warns():
    config = {**json.loads((CONFIGS / "flux1_lokr.json").read_text()),
              "apply_preset": {"target_module": ["Linear"], "enable_conv": False}}
    assert plan_of(config, "flux2").warnings == ("families: this config is written for flux1, not for this Flux 2 model",)
