"""core.adapters against LyCORIS itself: every algorithm x layer x strength, from files LyCORIS wrote.

Each case builds a small seeded layer, lets LyCORIS create its module (create_lycoris, or the module
class directly where create_lycoris cannot pass the option), fills every parameter with seeded
non-zero values (alpha != rank), saves with `network.save_weights`, reads the file back and parses
the stripped keys. The reference is LyCORIS's non-bypass *rebuild* forward at the strength:
`create_lycoris_from_weights(strength, file, model)` + `apply_to()` on a fresh copy of the layer,
or, where that loader fails (IA3: make_module_from_state_dict takes one tensor but gets two;
Tucker-conv LoKr: it reads the rank and shapes off the wrong axes), the original module's own
rebuild forward with `multiplier` set.
"""

from __future__ import annotations

import copy
import zlib
from dataclasses import dataclass, field

import pytest
import torch
from lycoris import LycorisNetwork, create_lycoris, create_lycoris_from_weights
from lycoris.modules.tlora import clear_timestep_mask, set_timestep_mask
from lycoris.wrapper import network_module_dict
from safetensors.torch import load_file, save_file

from comfyui_lycoris.core.adapters import AdapterError, LayerSpec, parse_module
from comfyui_lycoris.core.lycoris_modules import skip_lycoris_gc

NAME = "lycoris_layer"
STRENGTHS = (0.0, 0.5, 1.0, -1.0, 2.0)
LAYERS = {
    "linear": lambda: torch.nn.Linear(24, 40),
    "conv3": lambda: torch.nn.Conv2d(8, 12, 3, padding=1),
    "conv1": lambda: torch.nn.Conv2d(8, 12, 1),
    "conv3s": lambda: torch.nn.Conv2d(8, 12, 3, stride=2, padding=2, dilation=2),
    "conv3w": lambda: torch.nn.Conv2d(16, 32, 3, padding=1),  # room for a factorised / Tucker LoKr w2
    "conv3ws": lambda: torch.nn.Conv2d(16, 32, 3, stride=2, padding=2, dilation=2),
    "linear32": lambda: torch.nn.Linear(24, 32),  # BOFT needs power-of-2 block counts
    "conv3p2": lambda: torch.nn.Conv2d(8, 16, 3, padding=1),
}


@dataclass(frozen=True)
class Case:
    id: str
    algo: str  # the adapter's `algo`
    layer: str
    kwargs: dict = field(default_factory=dict)  # create_lycoris keywords (or module kwargs when direct)
    linear: bool = True  # expected linear_in_strength
    dim: int = 4
    alpha: float = 3.0
    direct: bool = False  # build the module class directly (create_lycoris cannot pass the option)
    reload: bool = True  # reference from create_lycoris_from_weights; False: the module's own rebuild


def _cases() -> list[Case]:
    c = [Case(f"lora-{k}", "lora", k, {"algo": "lora"}) for k in ("linear", "conv3", "conv1", "conv3s")]
    c += [Case(f"lora-dora-{k}", "lora", k, {"algo": "lora", "dora_wd": True}, linear=False)
          for k in ("linear", "conv3")]
    c += [Case("lora-tucker-conv3", "lora", "conv3", {"algo": "lora", "use_tucker": True})]
    c += [Case(f"loha-{k}", "loha", k, {"algo": "loha"}) for k in ("linear", "conv3", "conv1")]
    # rank 2: small enough that the bypass runs as a rank-r² chain instead of building ΔW
    c += [Case(f"loha-r2-{k}", "loha", k, {"algo": "loha"}, dim=2) for k in ("linear", "conv3s")]
    c += [Case(f"loha-dora-{k}", "loha", k, {"algo": "loha", "dora_wd": True}, linear=False)
          for k in ("linear", "conv3")]
    c += [Case("loha-tucker-conv3", "loha", "conv3", {"algo": "loha", "use_tucker": True})]
    lokr = {"algo": "lokr", "factor": 4}
    c += [Case(f"lokr-full-{k}", "lokr", k, {"algo": "lokr", "full_matrix": True}) for k in ("linear", "conv3")]
    c += [Case(f"lokr-w2-{k}", "lokr", k, lokr, dim=2) for k in ("linear", "conv3w", "conv3ws")]
    c += [Case("lokr-fullconv-conv3s", "lokr", "conv3s", lokr, dim=2)]  # rank too large: both halves full
    c += [Case("lokr-both-linear", "lokr", "linear", {"algo": "lokr", "decompose_both": True, "factor": 8}, dim=2)]
    c += [Case(f"lokr-tucker-{k}", "lokr", k, {**lokr, "use_tucker": True}, dim=2, reload=False)
          for k in ("conv3w", "conv3ws")]
    c += [Case("lokr-dora-linear", "lokr", "linear", {**lokr, "dora_wd": True}, linear=False, dim=2)]
    c += [Case(f"full-{k}", "full", k, {"algo": "full"}) for k in ("linear", "conv3", "conv1")]
    c += [Case(f"ia3-out-{k}", "ia3", k, {"algo": "ia3"}, reload=False) for k in ("linear", "conv3")]
    c += [Case(f"ia3-in-{k}", "ia3", k, {"algo": "ia3", "train_on_input": True}, direct=True, reload=False)
          for k in ("linear", "conv3")]
    oft = {"algo": "diag-oft"}
    c += [Case("oft-linear", "diag-oft", "linear", oft),
          Case("oft-constraint-linear", "diag-oft", "linear", {**oft, "constraint": 0.01}),
          Case("oft-rescaled-linear", "diag-oft", "linear", {**oft, "rescaled": True}, linear=False),
          Case("oft-rescaled-constraint-conv3", "diag-oft", "conv3", {**oft, "rescaled": True, "constraint": 0.01},
               linear=False),
          Case("oft-conv1", "diag-oft", "conv1", oft)]
    c += [Case(f"boft-{k}", "boft", k, {"algo": "boft"}, linear=False) for k in ("linear32", "conv3p2")]
    c += [Case("boft-rescaled-constraint-linear32", "boft", "linear32",
               {"algo": "boft", "rescaled": True, "constraint": 0.01}, linear=False)]
    c += [Case(f"glora-{k}", "glora", k, {"algo": "glora"}) for k in ("linear", "conv3", "conv1")]
    c += [Case(f"tlora-{k}", "tlora", k, {"algo": "tlora"}) for k in ("linear", "conv1")]
    return c


CASES = _cases()
BY_ID = {case.id: case for case in CASES}


class Holder(torch.nn.Module):
    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.layer = layer


@dataclass
class Built:
    pristine: torch.nn.Module  # the layer as it was before LyCORIS touched it
    module: torch.nn.Module  # the LyCORIS module (applied to its own copy of the layer)
    path: str
    params: dict[str, torch.Tensor]
    x: torch.Tensor

    @property
    def spec(self) -> LayerSpec:
        return LayerSpec.from_module(self.pristine)

    def base(self, x: torch.Tensor) -> torch.Tensor:
        return self.spec.apply(x, self.pristine.weight, self.pristine.bias)


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    cache: dict[str, Built] = {}
    workdir = tmp_path_factory.mktemp("adapter-math")

    def get(case: Case) -> Built:
        if case.id not in cache:
            cache[case.id] = _build(case, str(workdir / f"{case.id}.safetensors"))
        return cache[case.id]

    return get


def _network(case: Case, holder: Holder) -> LycorisNetwork:
    kwargs = dict(case.kwargs)
    with skip_lycoris_gc(), torch.no_grad():
        if case.direct:
            cls = network_module_dict[kwargs.pop("algo")]
            module = cls(NAME, holder.layer, 1.0, case.dim, case.alpha, 0.0, 0.0, 0.0, False, **kwargs)
            network = LycorisNetwork(holder, init_only=True)
            network.loras = [module]
        else:  # create_lycoris re-applies its "full" preset, which leaves these class-level targets as set here
            LycorisNetwork.apply_preset({"target_module": ["Linear", "Conv2d"], "target_name": [],
                                         "module_algo_map": {}, "name_algo_map": {}, "exclude_name": [],
                                         "enable_conv": True, "use_fnmatch": False, "lora_prefix": "lycoris"})
            network = create_lycoris(holder, 1.0, case.dim, case.alpha, conv_dim=case.dim, conv_alpha=case.alpha,
                                     **kwargs)
    assert [m.lora_name for m in network.loras] == [NAME]
    return network


@torch.no_grad()
def _fill(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Every trainable tensor seeded and non-zero, kept in the range training would leave it."""
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if name in ("dora_scale", "rescale", "lambda_layer"):
            p.mul_(1 + 0.2 * noise)  # norms / scales near their init
        elif name in ("q_layer.weight", "p_layer.weight"):
            p.add_(0.05 * noise)  # T-LoRA: near its SVD init
        else:
            p.copy_(0.3 * noise)


def _build(case: Case, path: str) -> Built:
    seed = zlib.crc32(case.id.encode())
    torch.manual_seed(seed)
    layer = LAYERS[case.layer]()
    pristine = copy.deepcopy(layer)
    network = _network(case, Holder(layer))
    module = network.loras[0]
    _fill(module, torch.Generator().manual_seed(seed))
    network.apply_to()
    network.save_weights(path, None, None)
    saved = load_file(path)
    assert all(k.startswith(NAME + ".") for k in saved)
    params = {k[len(NAME) + 1:]: v for k, v in saved.items()}
    gen = torch.Generator().manual_seed(seed + 1)
    shape = (2, 5, layer.in_features) if isinstance(layer, torch.nn.Linear) else (2, layer.in_channels, 7, 7)
    return Built(pristine, module, path, params, torch.randn(shape, generator=gen))


@torch.no_grad()
def _reference(built: Built, case: Case, x: torch.Tensor, strength: float) -> torch.Tensor:
    """LyCORIS's rebuild forward at `strength`."""
    if not case.reload:
        module = built.module
        module.multiplier, module.bypass_mode = strength, False
        return module(x)
    holder = Holder(copy.deepcopy(built.pristine))
    with skip_lycoris_gc():
        network, _ = create_lycoris_from_weights(strength, built.path, holder)
    assert [m.lora_name for m in network.loras] == [NAME]
    network.apply_to()
    assert not network.loras[0].bypass_mode
    return holder.layer(x)


def _assert_close(got: torch.Tensor, want: torch.Tensor, rel: float, what: str, magnitude: float | None = None):
    err = (got.float() - want.float()).abs().max().item()
    mag = want.float().abs().max().item() if magnitude is None else magnitude
    assert err <= rel * max(mag, 1e-6), f"{what}: max error {err:.3g} against magnitude {mag:.3g}"


def _parse(built: Built, params: dict | None = None):
    return parse_module(NAME, dict(built.params if params is None else params), built.spec)


@pytest.mark.parametrize("strength", STRENGTHS)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_matches_lycoris_rebuild(build, case: Case, strength: float):
    built = build(case)
    clear_timestep_mask()
    adapter = _parse(built)
    assert (adapter.algo, adapter.linear_in_strength) == (case.algo, case.linear)
    x, weight, bias = built.x, built.pristine.weight.detach(), built.pristine.bias.detach()
    ref = _reference(built, case, x, strength)
    with torch.no_grad():
        if adapter.linear_in_strength:  # (a) bypass
            out = built.base(x) + strength * adapter.delta_output(x, base_weight=weight)
            _assert_close(out, ref, 1e-5, "base + strength * delta_output")
        dw, db = adapter.delta_weight(weight, strength)  # (b) merge
        assert db is None or case.algo == "full"
        out = built.spec.apply(x, weight + dw, bias if db is None else bias + db)
        _assert_close(out, ref, 1e-5, "layer with W + dW")
        if adapter.linear_in_strength:  # (c) linearity of the merge
            dw1, _ = adapter.delta_weight(weight, 1.0)
            _assert_close(dw, strength * dw1, 1e-6, "dW(s) vs s * dW(1)", dw1.abs().max().item())


@pytest.mark.parametrize("case_id", ["tlora-linear", "tlora-conv1"])
def test_tlora_per_sample_mask_matches_lycoris_one_sample_at_a_time(build, case_id):
    case = BY_ID[case_id]
    built = build(case)
    adapter = _parse(built)
    x = torch.cat([built.x, built.x[:1] * 0.5])  # batch of 3
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    weight = built.pristine.weight.detach()
    for strength in (1.0, -0.5):
        refs = []
        for b in range(x.shape[0]):  # LyCORIS's mask is one global row: run it per sample
            set_timestep_mask(mask[b : b + 1])
            refs.append(_reference(built, case, x[b : b + 1], strength))
        clear_timestep_mask()
        with torch.no_grad():
            out = built.base(x) + strength * adapter.delta_output(x, base_weight=weight, rank_mask=mask)
            _assert_close(out, torch.cat(refs), 1e-5, "per-sample mask bypass")
            for b in range(x.shape[0]):
                dw, _ = adapter.delta_weight(weight, strength, rank_mask=mask[b : b + 1])
                merged = built.spec.apply(x[b : b + 1], weight + dw, built.pristine.bias)
                _assert_close(merged, refs[b], 1e-5, f"merge at mask row {b}")


def test_tlora_base_rederived_like_lycoris_and_stored_base_is_used(build):
    built = build(BY_ID["tlora-linear"])
    weight = built.pristine.weight.detach()
    derived = _parse(built)
    assert derived.needs_base_weight and derived.rank == 4
    assert any("SVD" in w for w in derived.warnings)
    dw_derived, _ = derived.delta_weight(weight, 1.0)
    assert not derived.needs_base_weight
    for key in ("base_q", "base_p", "base_lambda"):
        torch.testing.assert_close(derived.state_dict()[key], getattr(built.module, key), rtol=0, atol=1e-6)
    stored = _parse(built, derived.state_dict())
    assert not stored.needs_base_weight and not stored.warnings
    with torch.no_grad():
        torch.testing.assert_close(stored.delta_output(built.x), derived.delta_output(built.x, weight))
    torch.testing.assert_close(stored.delta_weight(weight, 1.0)[0], dw_derived)


def test_lycoris_loads_a_tlora_file_that_also_stores_the_base(build, tmp_path):
    """Files this pack writes carry base_q/base_p/base_lambda; LyCORIS must still load them (it ignores them)."""
    case = BY_ID["tlora-linear"]
    built = build(case)
    full = {f"{NAME}.{k}": v.contiguous() for k, v in _parse(built).state_dict().items()}
    full.update({f"{NAME}.{k}": getattr(built.module, k).detach().clone() for k in ("base_q", "base_p", "base_lambda")})
    path = str(tmp_path / "with-base.safetensors")
    save_file(full, path)
    clear_timestep_mask()
    ref = _reference(built, case, built.x, 1.0)
    got = _reference(Built(built.pristine, built.module, path, built.params, built.x), case, built.x, 1.0)
    _assert_close(got, ref, 1e-6, "LyCORIS output from a file with the stored base")


BF16_CASES = ["lora-linear", "loha-conv3", "loha-r2-linear", "lokr-w2-linear", "glora-linear", "tlora-linear"]


@pytest.mark.parametrize("case_id", BF16_CASES)
def test_bf16_close_to_fp32_reference(build, case_id):
    case = BY_ID[case_id]
    built = build(case)
    clear_timestep_mask()
    adapter = _parse(built)
    adapter.delta_weight(built.pristine.weight.detach(), 1.0)  # T-LoRA: derive the base in fp32 first
    adapter.to(dtype=torch.bfloat16)
    ref = _reference(built, case, built.x, 0.5)
    x, weight = built.x.bfloat16(), built.pristine.weight.detach().bfloat16()
    with torch.no_grad():
        delta = adapter.delta_output(x, base_weight=weight)
        assert delta.dtype == torch.bfloat16
        _assert_close(built.base(built.x) + 0.5 * delta.float(), ref, 3e-2, "bf16 bypass")
        dw, _ = adapter.delta_weight(weight, 0.5)
        assert dw.dtype == torch.bfloat16
        merged = built.spec.apply(built.x, weight.float() + dw.float(), built.pristine.bias)
        _assert_close(merged, ref, 3e-2, "bf16 merge")


# -- errors: every one names the key --

WRONG_SHAPE = [("lora-linear", "lora_up.weight"), ("lora-conv3", "lora_down.weight"),
               ("lora-dora-linear", "dora_scale"), ("lora-tucker-conv3", "lora_mid.weight"),
               ("loha-linear", "hada_w2_b"), ("loha-tucker-conv3", "hada_t1"),
               ("lokr-w2-linear", "lokr_w2_b"), ("lokr-tucker-conv3w", "lokr_t2"), ("lokr-full-linear", "lokr_w2"),
               ("full-linear", "diff_b"), ("ia3-out-linear", "weight"), ("oft-linear", "oft_blocks"),
               ("oft-rescaled-linear", "rescale"), ("boft-linear32", "oft_blocks"), ("glora-linear", "b1.weight"),
               ("tlora-linear", "p_layer.weight")]
MISSING = [("lora-linear", "lora_down.weight"), ("lora-linear", "lora_up.weight"), ("loha-linear", "hada_w2_a"),
           ("loha-tucker-conv3", "hada_t2"), ("lokr-both-linear", "lokr_w1_b"), ("lokr-w2-linear", "lokr_w2_b"),
           ("full-linear", "diff"), ("glora-linear", "b2.weight"), ("tlora-linear", "p_layer.weight")]


@pytest.mark.parametrize("case_id, key", WRONG_SHAPE)
def test_wrong_shape_names_the_key_with_expected_and_got(build, case_id, key):
    params = dict(build(BY_ID[case_id]).params)
    shape = list(params[key].shape)
    shape[-1] += 1
    params[key] = torch.ones(shape)
    with pytest.raises(AdapterError, match=rf"{NAME}\.{key}: .*expected.*got"):
        _parse(build(BY_ID[case_id]), params)


@pytest.mark.parametrize("case_id, key", MISSING)
def test_missing_key_is_named(build, case_id, key):
    params = dict(build(BY_ID[case_id]).params)
    del params[key]
    with pytest.raises(AdapterError, match=rf"{NAME}\.{key}: missing"):
        _parse(build(BY_ID[case_id]), params)


@pytest.mark.parametrize("case_id, key", [("lora-linear", "lora_up.weight"), ("lokr-w2-linear", "alpha"),
                                          ("tlora-linear", "lambda_layer"), ("oft-linear", "oft_blocks")])
def test_nan_is_named(build, case_id, key):
    params = dict(build(BY_ID[case_id]).params)
    poisoned = params[key].clone()
    poisoned.view(-1)[0] = float("nan")
    params[key] = poisoned
    with pytest.raises(AdapterError, match=rf"{NAME}\.{key}: contains NaN"):
        _parse(build(BY_ID[case_id]), params)


def test_unsupported_modules_and_partial_tlora_base(build):
    spec = LayerSpec("linear", (40, 24))
    with pytest.raises(AdapterError, match="no LyCORIS algorithm recognised"):
        parse_module(NAME, {"foo": torch.ones(2)}, spec)
    with pytest.raises(AdapterError, match="not supported"):
        parse_module(NAME, {"w_norm": torch.ones(40)}, spec)
    tlora = dict(build(BY_ID["tlora-conv1"]).params)
    with pytest.raises(AdapterError, match=rf"{NAME}\.q_layer\.weight: T-LoRA works on Linear and 1x1 convs"):
        parse_module(NAME, tlora, LayerSpec("conv", (12, 8, 3, 3), padding=1))
    tlora = {**build(BY_ID["tlora-linear"]).params, "base_q": torch.ones(4, 24)}
    with pytest.raises(AdapterError, match=rf"{NAME}\.base_p: missing"):
        parse_module(NAME, tlora, spec)
    adapter = parse_module(NAME, {**build(BY_ID["lora-linear"]).params, "scalar": torch.tensor(2.0)}, spec)
    assert "scalar" not in adapter.state_dict() and "ignored keys ['scalar']" in adapter.warnings[0]


def test_layer_spec_and_lone_ia3_weight():
    conv = LayerSpec.from_module(torch.nn.Conv2d(8, 12, (3, 1), stride=2, padding=(1, 0)))
    assert (conv.stride, conv.padding, conv.dilation, conv.groups) == ((2, 2), (1, 0), (1, 1), 1)
    assert LayerSpec("conv", (12, 8, 3, 3), stride=2).stride == (2, 2)
    with pytest.raises(AdapterError, match="LayerSpec.kind"):
        LayerSpec("embedding", (40, 24))
    with pytest.raises(AdapterError, match="LayerSpec.weight_shape"):
        LayerSpec("linear", (40, 24, 1))
    adapter = parse_module(NAME, {"weight": torch.ones(40)}, LayerSpec("linear", (40, 24)))
    assert (adapter.algo, adapter.on_input) == ("ia3", False)


def test_non_linear_adapters_refuse_delta_output(build):
    built = build(BY_ID["lora-dora-linear"])
    with pytest.raises(RuntimeError, match="not linear in the strength"):
        _parse(built).delta_output(built.x, base_weight=built.pristine.weight)


def test_state_dict_round_trips_and_to_moves(build):
    for case in CASES:
        built = build(case)
        adapter = _parse(built)
        assert adapter.state_dict().keys() == built.params.keys()
        adapter.to(dtype=torch.float16)
        for key, tensor in adapter.state_dict().items():
            kept = key in ("alpha", "on_input")
            assert tensor.dtype == (built.params[key].dtype if kept else torch.float16), (case.id, key)


# -- LyCORIS 4.1.3 defects this package does not inherit (if one starts failing, LyCORIS fixed it) --

@pytest.mark.parametrize("case_id", ["loha-linear", "lokr-w2-linear", "lokr-both-linear", "lokr-tucker-conv3w"])
def test_lycoris_get_diff_weight_applies_the_scale_twice(build, case_id):
    built = build(BY_ID[case_id])
    adapter = _parse(built)
    ours, _ = adapter.delta_weight(built.pristine.weight.detach(), 1.0)
    with torch.no_grad():
        theirs, _ = built.module.get_diff_weight(1.0)
    torch.testing.assert_close(theirs.reshape(ours.shape), ours * adapter.scale)


@pytest.mark.parametrize("case_id", ["ia3-out-linear", "lokr-tucker-conv3w"])
def test_lycoris_cannot_reload_these_files(build, case_id):
    built = build(BY_ID[case_id])
    with pytest.raises((TypeError, AttributeError)):
        create_lycoris_from_weights(1.0, built.path, Holder(copy.deepcopy(built.pristine)))
