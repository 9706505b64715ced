"""Train options SimpleTuner users look for, checked against LyCORIS 4.1.3 and SimpleTuner 4.10.1 themselves.

- LyCORIS's dropouts (`dropout`, `rank_dropout` (+ `rank_dropout_scale`), `module_dropout`): one
  layer trained here against LyCORIS's own module class on the same layer, with LyCORIS's global
  RNG seeded as our module draw is, in its rebuild forward (SimpleTuner's default) and in bypass
  mode: outputs and gradients equal. Then on a whole tiny model: dropouts 0 change nothing (bit for
  bit, the job's random stream included), inference snapshots never drop, a step is reproducible
  from the generator and exact under gradient checkpointing.
- `use_scalar`: LyCORIS's trainable `scalar` (0 at first, factors random): gradients equal LyCORIS's,
  the saved tensors are LyCORIS's `custom_state_dict`, the snapshot samples as LyCORIS's module.
- `init_lokr_norm`: SimpleTuner's `init_lokr_network_with_perturbed_normal` (helpers/training/
  peft_init.py, loaded by path: it imports only torch) on LyCORIS's module from the same seed gives
  our initial tensors; another algorithm is an error naming the option.
"""

from __future__ import annotations

import importlib.util
import zlib
from types import SimpleNamespace

import pytest
import torch
from lycoris.wrapper import network_module_dict

from comfyui_lycoris.core import host
from comfyui_lycoris.core.adapter_file import adapter_metadata, write_adapter
from comfyui_lycoris.core.adapter_set import load
from comfyui_lycoris.core.config import parse_config
from comfyui_lycoris.core.dropout import DropoutSettings, ModuleDraw
from comfyui_lycoris.core.runtime import active, build_call_state, install_hooks
from comfyui_lycoris.core.targets import plan_for
from comfyui_lycoris.core.tiny import TinySizes
from comfyui_lycoris.trainer.checkpointing import memory_mode
from comfyui_lycoris.trainer.predict import ComfyPredictor, encode_conditioning, objective_for_model, stack_conditioning
from comfyui_lycoris.trainer.preflight import PreflightError, preflight
from comfyui_lycoris.trainer.spec import JobSpec, SpecError
from comfyui_lycoris.trainer.trainable import TrainableAdapter, TrainerError, comfy_base_weights

SIZES = TinySizes(family="flux2", width=64, heads=2, depth=1, single_depth=1, context_dim=32)
LAYER = "transformer_blocks.0.ff.linear_in"  # 384 x 64, ComfyUI's img_mlp.0 (a layer of its own)
BASE = {"multiplier": 1, "linear_dim": 4, "linear_alpha": 2}
ALGO_KEYS = {"lora": {}, "loha": {}, "lokr": {"factor": 8}}


def config_for(algo: str, per_target: dict | None = None, **top) -> dict:
    entry = {"algo": algo, **ALGO_KEYS[algo], **(per_target or {})}
    return {**BASE, "algo": algo, **ALGO_KEYS[algo], **top,
            "apply_preset": {"target_module": [], "name_algo_map": {LAYER: entry}}}


def setup(raw: dict, seed: int = 0, lokr_norm: float = 0.0):
    model = host.build_tiny_model(SIZES, dtype=torch.float64)
    host.freeze_base(model)
    config = parse_config(raw)
    unet_config = host.model_unet_config(model)
    trainable = TrainableAdapter.from_plan(plan_for(config, unet_config), unet_config,
                                           comfy_base_weights(model.model.diffusion_model), config, seed=seed,
                                           dtype=torch.float64, init_lokr_norm=lokr_norm)
    return model, trainable, trainable.plan.targets[0]


def lycoris_module(model, target, seed: int = 0, dropout=0.0, rank_dropout=0.0, module_dropout=0.0, *,
                   lokr_norm: float = 0.0, **kwargs):
    """LyCORIS's own class, built as create_lycoris builds it, on a float32 copy of the layer (as our init),
    from the stream our init uses; then in float64 on the float64 layer."""
    layer = model.model.diffusion_model.get_submodule(target.route.comfy_module)
    weight = layer.weight.detach()
    org = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=layer.bias is not None)
    with torch.no_grad():
        org.weight.copy_(weight.float())
    with torch.random.fork_rng():
        torch.manual_seed(seed ^ zlib.crc32(target.lora_name.encode()))
        module = network_module_dict[target.algo](target.lora_name, org, 1.0, target.dim, target.alpha, dropout,
                                                  rank_dropout, module_dropout, False, **kwargs)
        if lokr_norm:
            simpletuner_peft_init().init_lokr_network_with_perturbed_normal(SimpleNamespace(loras=[module]),
                                                                             scale=lokr_norm)
    module.double()
    org.double()
    with torch.no_grad():
        org.weight.copy_(weight)
        if layer.bias is not None:
            org.bias.copy_(layer.bias)
    module.apply_to()
    return module, org


def simpletuner_peft_init():
    spec = importlib.util.find_spec("simpletuner")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("simpletuner 4.10.1 is not installed (scripts/setup.sh installs it with --no-deps)")
    path = f"{spec.submodule_search_locations[0]}/helpers/training/peft_init.py"
    loaded = importlib.util.spec_from_file_location("simpletuner_peft_init", path)
    module = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(module)
    return module


def ours(model, trainable, x: torch.Tensor, draws=None) -> torch.Tensor:
    """The trained layer's output through the runtime's hooks, as a training call runs it."""
    dm = model.model.diffusion_model
    path = trainable.plan.targets[0].route.comfy_module
    install_hooks(dm, [path])
    state = build_call_state([trainable.application(1.0)], x.shape[0], 1, None, draws=draws)
    with active(state), torch.enable_grad():
        return dm.get_submodule(path)(x)


def grads(trainable, y: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor | None]:
    params = trainable.named_parameters()
    for p in params.values():
        p.grad = None
    if y.requires_grad:  # a dropped module leaves the adapter out of the graph
        (y * g).sum().backward()
    return {k.split(".", 1)[1]: p.grad for k, p in params.items()}


def lycoris_grads(module, org, x, g, seed: int | None) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    module.train()
    module.zero_grad(set_to_none=True)
    with torch.random.fork_rng():
        if seed is not None:
            torch.manual_seed(seed)
        y = org(x)
    (y * g).sum().backward()
    own = dict(module.named_parameters())
    return y.detach(), {k: own[k].grad for k in own}


def assert_same(ours_y, ours_g, ref_y, ref_g):
    torch.testing.assert_close(ours_y.detach(), ref_y, rtol=1e-10, atol=1e-12)
    for key, grad in ours_g.items():
        ref = ref_g[key]
        if ref is None or not bool(ref.abs().sum()):
            assert grad is None or not bool(grad.abs().sum()), f"{key}: LyCORIS has no gradient here"
            continue
        torch.testing.assert_close(grad, ref.view_as(grad), rtol=1e-9, atol=1e-12, msg=key)


def randomise(trainable, module, seed: int = 7) -> None:
    """The same random values in both (away from the init, so every factor has a gradient)."""
    gen = torch.Generator().manual_seed(seed)
    own = dict(module.named_parameters())
    with torch.no_grad():
        for name, leaf in trainable.named_parameters().items():
            key = name.split(".", 1)[1]
            value = 0.1 * torch.randn(leaf.shape, generator=gen, dtype=torch.float64)
            leaf.copy_(value)
            own[key].copy_(value.view_as(own[key]))


def inputs(seed: int = 3, out: int = 384):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 5, 64, generator=gen, dtype=torch.float64),
            torch.randn(2, 5, out, generator=gen, dtype=torch.float64))


# -- dropouts, one module against LyCORIS's ---------------------------------------------------------

@pytest.mark.parametrize("algo", ["lora", "loha", "lokr"])
def test_rank_dropout_in_the_rebuild_forward_is_lycoris(algo):
    """SimpleTuner's default (bypass off): ΔW's rows masked, `rank_dropout_scale` dividing by the mean."""
    raw = config_for(algo, {"rank_dropout_scale": True}, rank_dropout=0.5)
    model, trainable, target = setup(raw)
    module, org = lycoris_module(model, target, rank_dropout=0.5, rank_dropout_scale=True, **ALGO_KEYS[algo])
    randomise(trainable, module)
    x, g = inputs()
    for seed in (11, 12):
        draw = ModuleDraw.draw(trainable.dropouts[target.path], seed, 384, getattr(
            trainable.modules[target.path], "dim", None))
        assert draw.rows is not None and 0 < int((draw.rows == 0).sum()) < 384
        y = ours(model, trainable, x, {target.path: draw})
        assert_same(y, grads(trainable, y, g), *lycoris_grads(module, org, x, g, seed))


@pytest.mark.parametrize("algo", ["lora", "lokr", "loha"])
def test_bypass_mode_dropouts_are_lycoris(algo):
    """bypass_mode: LoRA masks its rank, LoHa ΔW's rows, LoKr none; then nn.Dropout on the delta."""
    raw = config_for(algo, {"rank_dropout_scale": True}, rank_dropout=0.5, dropout=0.3, module_dropout=0.4,
                     bypass_mode=True)
    model, trainable, target = setup(raw)
    settings = trainable.dropouts[target.path]
    assert settings.rank_axis == {"lora": "ranks", "lokr": None, "loha": "rows"}[algo]
    assert settings.elementwise == 0.3
    module, org = lycoris_module(model, target, dropout=0.3, rank_dropout=0.5, module_dropout=0.4,
                                 rank_dropout_scale=True, bypass_mode=True, **ALGO_KEYS[algo])
    randomise(trainable, module)
    x, g = inputs()
    outcomes = set()
    for seed in range(20, 26):
        draw = ModuleDraw.draw(settings, seed, 384, getattr(trainable.modules[target.path], "dim", None))
        outcomes.add(draw.dropped)
        y = ours(model, trainable, x, {target.path: draw})
        assert_same(y, grads(trainable, y, g), *lycoris_grads(module, org, x, g, seed))
    assert outcomes == {True, False}, "both a dropped and a kept module were compared"


def test_module_dropout_one_runs_the_base_only():
    raw = config_for("lokr", module_dropout=1.0)
    model, trainable, target = setup(raw)
    module, org = lycoris_module(model, target, module_dropout=1.0, **ALGO_KEYS["lokr"])
    randomise(trainable, module)
    x, g = inputs()
    draw = ModuleDraw.draw(trainable.dropouts[target.path], 5, 384, None)
    y = ours(model, trainable, x, {target.path: draw})
    base = model.model.diffusion_model.get_submodule(target.route.comfy_module)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, base.weight, base.bias), rtol=0, atol=0)
    assert not y.requires_grad, "no adapter in the graph: zero adapter gradient"
    ref_y, _ = lycoris_grads(module, org, x, g, 5)
    torch.testing.assert_close(y, ref_y, rtol=0, atol=0)


def test_per_target_dropouts_and_unsupported_algorithms_are_errors():
    raw = config_for("lora", {"dropout": 0.1})
    with pytest.raises(TrainerError, match=r"\.dropout: LyCORIS takes dropouts at the top level"):
        setup(raw)
    with pytest.raises(ValueError, match="^rank_dropout: training glora"):
        DropoutSettings("glora", rank_dropout=0.1)
    DropoutSettings("glora", module_dropout=0.5)  # module dropout works for every algorithm


# -- dropouts on a whole model: off changes nothing, inference never drops, reproducible, exact when checkpointed

def model_gradient(model, trainable, generator, checkpointing=False) -> torch.Tensor:
    """The adapter's gradient of a flow loss on a fixed tiny batch, the model called as the trainer calls it."""
    base = model.model
    objective = objective_for_model(base, "flux2")
    latents = torch.randn((2, 128, 8, 8), generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    cond = stack_conditioning([encode_conditioning(base, host.tiny_conditioning(model, t, 8), latents[i:i + 1],
                                                   getattr(objective, "guidance", None))
                               for i, t in enumerate(("a red cube", "a cat"))])
    cond = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in cond.items()}
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    made = objective.make_inputs(latents, noise, objective.sample(2, torch.Generator().manual_seed(1), 64))
    predict = ComfyPredictor(base, trainable, 1.0, generator=generator)
    params = trainable.parameters()
    for p in params:
        p.grad = None
    with torch.enable_grad(), memory_mode(base.diffusion_model, checkpointing):
        pred = predict(made.model_input, made.sigma, cond, made.timesteps)
        (pred - made.target.to(pred)).pow(2).mean().backward()
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])


def whole_model(raw: dict):
    raw = {**raw, "apply_preset": {"target_module": ["Flux2Attention", "Flux2FeedForward"]}}
    model, trainable, _ = setup(raw)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(3)
        for p in trainable.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
    return model, trainable


def test_dropouts_zero_change_nothing_bit_for_bit():
    plain = {**BASE, "algo": "lora"}
    model, a = whole_model(plain)
    _, b = whole_model({**plain, "dropout": 0.0, "rank_dropout": 0.0, "module_dropout": 0.0, "bypass_mode": True})
    assert not b.dropouts
    gen_a, gen_b = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert torch.equal(model_gradient(model, a, gen_a), model_gradient(model, b, gen_b))
    assert torch.equal(gen_a.get_state(), gen_b.get_state()), "nothing drawn from the job's stream"


def test_dropouts_are_reproducible_exact_when_checkpointed_and_never_at_inference():
    dropping = {**BASE, "algo": "lora", "dropout": 0.3, "rank_dropout": 0.5, "module_dropout": 0.3,
                "bypass_mode": True}
    model, trainable = whole_model(dropping)
    assert len(trainable.dropouts) == len(trainable.plan.targets)
    first = model_gradient(model, trainable, torch.Generator().manual_seed(9))
    again = model_gradient(model, trainable, torch.Generator().manual_seed(9), checkpointing=True)
    other = model_gradient(model, trainable, torch.Generator().manual_seed(10))
    torch.testing.assert_close(first, again, rtol=1e-10, atol=1e-13)
    assert not torch.allclose(first, other), "another draw drops other ranks"
    # the job generator's state is what a checkpoint saves: restoring it redraws the same masks
    gen = torch.Generator().manual_seed(9)
    saved = gen.get_state()
    draws = trainable.draw_dropouts(gen)
    gen.set_state(saved)
    redrawn = trainable.draw_dropouts(gen)
    assert [d.dropped for d in draws.values()] == [d.dropped for d in redrawn.values()]
    assert all(d.ranks is None or torch.equal(d.ranks, r.ranks) for d, r in zip(draws.values(), redrawn.values()))
    # inference (Apply, validation renders) uses a snapshot: dropout values change nothing there
    _, undropped = whole_model({**BASE, "algo": "lora", "bypass_mode": True})
    x, _ = inputs(out=64)
    layer = model.model.diffusion_model.get_submodule(trainable.plan.targets[0].route.comfy_module)
    outs = []
    for snapshot in (trainable.to_loaded("a"), undropped.to_loaded("b")):
        install_hooks(model.model.diffusion_model, [trainable.plan.targets[0].route.comfy_module])
        with active(build_call_state([snapshot_app(snapshot)], 2, 1, None)), torch.no_grad():
            outs.append(layer(x))
    assert torch.equal(outs[0], outs[1])


def snapshot_app(snapshot):
    from comfyui_lycoris.core.runtime import Application

    by_module = {}
    for binding in snapshot.bindings.values():
        by_module.setdefault(binding.route.comfy_module, []).append(binding)
    return Application("inference", by_module, (1.0,), snapshot.tlora)


# -- use_scalar -------------------------------------------------------------------------------------

@pytest.mark.parametrize("algo", ["lora", "loha", "lokr"])
def test_use_scalar_trains_lycoris_scalar(algo, tmp_path):
    raw = config_for(algo, use_scalar=True)
    model, trainable, target = setup(raw)
    module, org = lycoris_module(model, target, use_scalar=True, **ALGO_KEYS[algo])
    named = {k.split(".", 1)[1]: v for k, v in trainable.named_parameters().items()}
    own = dict(module.named_parameters())
    assert float(named["scalar"].detach()) == 0.0 and set(named) == set(own)
    for key, value in named.items():
        assert torch.equal(value.detach(), own[key].detach()), f"{key}: LyCORIS's init, unscaled"
    assert any(bool(v.abs().sum()) for k, v in named.items() if k != "scalar"), "factors random, scalar 0"
    x, g = inputs()
    y = ours(model, trainable, x)
    first = grads(trainable, y, g)
    assert bool(first["scalar"].abs().sum()), "the first step moves the scalar"
    assert_same(y, first, *lycoris_grads(module, org, x, g, None))
    randomise(trainable, module)
    y = ours(model, trainable, x)
    assert_same(y, grads(trainable, y, g), *lycoris_grads(module, org, x, g, None))
    # saved as LyCORIS saves it (custom_state_dict: the factor times the scalar, no scalar) ...
    saved = {k.split(".", 1)[1]: v for k, v in trainable.state_dict().items()}
    assert saved.keys() == module.state_dict().keys()
    for key, value in module.state_dict().items():
        assert torch.equal(saved[key], value.detach().to(saved[key].dtype)), key
    # ... and the written file, loaded as Load LyCORIS loads it, samples as LyCORIS's module
    path = write_adapter(tmp_path, "scalar", trainable.state_dict(),
                         adapter_metadata(trainable.config.to_json(), "flux2", algo))
    loaded = load(path, host.model_unet_config(model))
    dm = model.model.diffusion_model
    layer = dm.get_submodule(target.route.comfy_module)
    install_hooks(dm, [target.route.comfy_module])
    with active(build_call_state([snapshot_app(loaded)], 2, 1, None)), torch.no_grad():
        sampled = layer(x)
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(sampled, org(x), rtol=1e-10, atol=1e-12)
    # a checkpoint keeps the scalar apart; a file without it loads with scalar 1 (LyCORIS's load_weight_hook)
    state = trainable.training_state()
    assert f"{target.lora_name}.scalar" in state
    trainable.load_state_dict(trainable.state_dict())
    assert float(trainable.named_parameters()[f"{target.lora_name}.scalar"].detach()) == 1.0
    trainable.load_state_dict(state)
    assert torch.equal(trainable.training_state()[f"{target.lora_name}.scalar"], state[f"{target.lora_name}.scalar"])


# -- init_lokr_norm ---------------------------------------------------------------------------------

def test_init_lokr_norm_is_simpletuners():
    raw = config_for("lokr", full_matrix=True)
    model, trainable, target = setup(raw, seed=4, lokr_norm=1e-3)
    module, _ = lycoris_module(model, target, 4, lokr_norm=1e-3, full_matrix=True, **ALGO_KEYS["lokr"])
    named = {k.split(".", 1)[1]: v.detach() for k, v in trainable.named_parameters().items()}
    assert torch.equal(named["lokr_w1"], torch.ones_like(named["lokr_w1"]))
    assert torch.equal(named["lokr_w2"], module.lokr_w2.detach())
    assert bool(named["lokr_w2"].abs().sum())
    _, plain, _ = setup(raw, seed=4)
    assert not torch.equal(plain.named_parameters()[f"{target.lora_name}.lokr_w2"].detach(), named["lokr_w2"])


def test_init_lokr_norm_errors_name_the_option():
    with pytest.raises(TrainerError, match="^init_lokr_norm: .*needs algo 'lokr'"):
        setup(config_for("lora"), lokr_norm=1e-3)
    with pytest.raises(TrainerError, match="^init_lokr_norm: .*factorised LoKr half"):
        setup(config_for("lokr", linear_dim=2), lokr_norm=1e-3)
    with pytest.raises(SpecError, match="^init_lokr_norm: must be 0"):
        JobSpec(config_json="{}", init_lokr_norm=-1.0)
    assert JobSpec.from_json(JobSpec(config_json="{}", init_lokr_norm=1e-3).to_json()).init_lokr_norm == 1e-3
    model = host.build_tiny_model(SIZES)
    unet_config = host.model_unet_config(model)
    with pytest.raises(PreflightError, match="init_lokr_norm: LoKr's perturbed-normal init needs algo 'lokr'"):
        preflight(config_for("lora"), unet_config, spec=JobSpec(config_json="{}", init_lokr_norm=1e-3))
    assert preflight(config_for("lokr", full_matrix=True), unet_config,
                     spec=JobSpec(config_json="{}", init_lokr_norm=1e-3)) is not None
