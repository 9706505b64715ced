"""Trainable adapters: LyCORIS's own init, differentiable runtime math, LyCORIS-format state, snapshots."""

from __future__ import annotations

import pytest
import torch

from comfyui_lycoris.core import api, host
from comfyui_lycoris.core.adapter_set import load
from comfyui_lycoris.core.adapters import svd_base
from comfyui_lycoris.core.config import parse_config
from comfyui_lycoris.core.runtime import place
from comfyui_lycoris.core.targets import plan_for
from comfyui_lycoris.core.tiny import TinySizes
from comfyui_lycoris.core.tlora import rank_mask
from comfyui_lycoris.trainer.trainable import TrainableAdapter, TrainerError

torch.set_num_threads(1)

LAYERS = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.ff.linear_in", "single_transformer_blocks.0.attn.to_out"]
BASE = {"multiplier": 1.0, "linear_dim": 4, "linear_alpha": 2}
ALGOS = {
    "lora": {"algo": "lora"},
    "loha": {"algo": "loha"},
    "lokr-full": {"algo": "lokr", "factor": 4, "full_matrix": True, "linear_dim": 10000, "linear_alpha": 1},
    "lokr-decomposed": {"algo": "lokr", "factor": 4, "linear_dim": 2, "decompose_both": True},
    "full": {"algo": "full"},
    "ia3": {"algo": "ia3"},
    "glora": {"algo": "glora"},
    "diag-oft": {"algo": "diag-oft", "linear_dim": 8},
    "tlora": {"algo": "tlora", "linear_dim": 8, "linear_alpha": 4, "tlora_min_rank": 2},
}


@pytest.fixture(scope="module")
def unet_config():
    return dict(host.model_unet_config(host.build_tiny_model(
        TinySizes(family="flux2", width=64, heads=2, depth=1, single_depth=1, context_dim=32))))


def _config(name: str, layers=LAYERS):
    return parse_config({**BASE, **ALGOS[name], "apply_preset": {"target_module": [], "target_name": layers}})


def _weights(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    cache = {}

    def weight(target):
        if target.path not in cache:
            cache[target.path] = torch.randn(target.weight_shape, generator=gen) / target.weight_shape[1] ** 0.5
        return cache[target.path]

    return weight


def _build(name: str, unet_config, **kwargs) -> tuple[TrainableAdapter, object]:
    config = _config(name)
    weights = _weights()
    return TrainableAdapter.from_plan(plan_for(config, unet_config), unet_config, weights, config, **kwargs), weights


def _deltas(trainable: TrainableAdapter, weights, x_seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(x_seed)
    out = {}
    for target in trainable.plan.targets:
        binding = trainable.bindings[target.path]
        x = torch.randn(2, 3, target.weight_shape[1], generator=gen)
        mask = rank_mask(torch.tensor([100, 700]), binding.adapter.rank, 2, 1.0) if target.algo == "tlora" else None
        out[target.path] = binding.adapter.delta_output(x, base_weight=weights(target), rank_mask=mask)
    return out


@pytest.mark.parametrize("name", list(ALGOS))
def test_initial_delta_is_zero_and_training_moves_it(name, unet_config):
    trainable, weights = _build(name, unet_config)
    params = trainable.parameters()
    assert params and all(p.is_leaf and p.requires_grad and p.dtype == torch.float32 for p in params)
    deltas = _deltas(trainable, weights)
    for delta in deltas.values():
        assert float(delta.detach().abs().max()) < 1e-5  # LyCORIS inits one side at zero (T-LoRA: current == base)
    target = {k: torch.randn_like(v) for k, v in deltas.items()}
    loss = sum(((deltas[k] - target[k]) ** 2).mean() for k in deltas)
    loss.backward()
    assert all(p.grad is not None for p in params), "every trainable tensor is in the graph"
    assert any(float(p.grad.abs().max()) > 0 for p in params)
    optimizer = torch.optim.SGD(params, lr=0.1)
    for _ in range(3):
        optimizer.step()
        optimizer.zero_grad()
        deltas = _deltas(trainable, weights)
        new_loss = sum(((deltas[k] - target[k]) ** 2).mean() for k in deltas)
        new_loss.backward()
    assert float(new_loss.detach()) < float(loss.detach())


def test_tlora_init_is_lycoris_svd_and_base_is_saved(unet_config):
    trainable, weights = _build("tlora", unet_config)
    state = trainable.state_dict()
    for target in trainable.plan.targets:
        adapter = trainable.modules[target.path]
        expected = svd_base(weights(target), adapter.rank, adapter.layer)
        for key, value in expected.items():
            assert torch.allclose(state[f"{target.lora_name}.{key}"], value, atol=1e-5), key
        assert not state[f"{target.lora_name}.base_q"].requires_grad
        assert f"{target.lora_name}.base_q" not in trainable.named_parameters()


def test_init_is_seeded_and_private(unet_config):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, _ = _build("lokr-decomposed", unet_config, seed=7)
    assert torch.equal(torch.get_rng_state(), before), "the global RNG is untouched"
    b, _ = _build("lokr-decomposed", unet_config, seed=7)
    c, _ = _build("lokr-decomposed", unet_config, seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_runtime_placement_keeps_the_leaves(unet_config):
    trainable, _ = _build("lokr-full", unet_config)
    before = trainable.parameters()
    for binding in trainable.bindings.values():
        place(binding.adapter, torch.device("cpu"), torch.bfloat16)
    assert all(a is b for a, b in zip(before, trainable.parameters()))
    assert all(p.dtype == torch.float32 for p in trainable.parameters())


def test_state_dict_round_trip_and_errors(unet_config):
    trainable, _ = _build("lokr-full", unet_config)
    keys = list(trainable.state_dict())
    assert all(k.startswith("lycoris_") for k in keys) and "lycoris_transformer_blocks_0_attn_to_q.lokr_w1" in keys
    with torch.no_grad():
        for p in trainable.parameters():
            p.add_(0.25)
    saved = trainable.state_dict()
    other, _ = _build("lokr-full", unet_config, seed=3)
    leaves = other.parameters()
    other.load_state_dict(saved)
    assert all(a is b for a, b in zip(leaves, other.parameters())), "the optimizer keeps its references"
    assert all(torch.equal(saved[k], v) for k, v in other.state_dict().items())
    with pytest.raises(TrainerError, match="missing"):
        other.load_state_dict({k: v for k, v in saved.items() if not k.endswith("lokr_w2")})
    bad = dict(saved, **{keys[1]: torch.zeros(1, 1)})
    with pytest.raises(TrainerError, match=f"{keys[1]}: expected shape"):
        other.load_state_dict(bad)
    alpha_key = next(k for k in keys if k.endswith(".alpha"))
    with pytest.raises(TrainerError, match=f"{alpha_key}: saved"):
        other.load_state_dict(dict(saved, **{alpha_key: torch.tensor(7.0)}))


def test_snapshot_is_detached_and_saves_a_reloadable_file(unet_config, tmp_path):
    trainable, weights = _build("tlora", unet_config)
    with torch.no_grad():
        for p in trainable.parameters():
            p.mul_(1.1)
    loaded = trainable.to_loaded("snap")
    expected = {k: v.detach().clone() for k, v in _deltas(trainable, weights).items()}
    with torch.no_grad():
        for p in trainable.parameters():
            p.mul_(2.0)
    path = api.save_adapter(loaded, tmp_path, "snap")
    reloaded = load(path, unet_config)
    assert not [w for w in reloaded.warnings if "SVD" in w], "T-LoRA base is stored: no SVD at load"
    assert reloaded.tlora is not None and reloaded.tlora.min_rank == 2
    for source in (loaded, reloaded):
        gen = torch.Generator().manual_seed(1)
        for target in trainable.plan.targets:
            adapter = source.bindings[target.path].adapter
            x = torch.randn(2, 3, target.weight_shape[1], generator=gen)
            mask = rank_mask(torch.tensor([100, 700]), adapter.rank, 2, 1.0)
            got = adapter.delta_output(x, base_weight=weights(target), rank_mask=mask)
            assert torch.allclose(got, expected[target.path], atol=1e-5)


def test_non_linear_algorithms_are_refused(unet_config):
    config = parse_config({**BASE, "algo": "lora", "dora_wd": True,
                           "apply_preset": {"target_module": [], "target_name": LAYERS[:1]}})
    with pytest.raises(TrainerError, match="not linear in the strength"):
        TrainableAdapter.from_plan(plan_for(config, unet_config), unet_config, _weights(), config)


def test_dropouts_are_taken_and_unapplied_ones_reported(unet_config):
    config = parse_config({**BASE, "algo": "lora", "rank_dropout": 0.1, "dropout": 0.2,
                           "apply_preset": {"target_module": [], "target_name": LAYERS[:1]}})
    trainable = TrainableAdapter.from_plan(plan_for(config, unet_config), unet_config, _weights(), config)
    (settings,) = trainable.dropouts.values()
    assert (settings.rank_axis, settings.rank_dropout, settings.elementwise) == ("rows", 0.1, 0.0)
    assert any(w.startswith("dropout: LyCORIS applies it only in bypass_mode") for w in trainable.warnings)
    assert not any("rank_dropout" in w for w in trainable.warnings)


@pytest.mark.parametrize("algo", ["lora", "lokr"])
def test_conv_targets_train_with_the_layers_geometry(algo):
    unet_config = dict(host.model_unet_config(host.build_tiny_model(TinySizes(family="sdxl", width=32, context_dim=32))))
    config = parse_config({**BASE, "algo": algo, "factor": 4,
                           "apply_preset": {"target_module": [], "target_name": ["down_blocks.0.downsamplers.0.conv"]}})
    plan = plan_for(config, unet_config)
    trainable = TrainableAdapter.from_plan(plan, unet_config, _weights(), config)
    binding = trainable.bindings["down_blocks.0.downsamplers.0.conv"]
    assert binding.adapter.layer.stride == (2, 2) and binding.adapter.layer.padding == (1, 1)
    x = torch.randn(2, 32, 8, 8, generator=torch.Generator().manual_seed(0))
    delta = binding.adapter.delta_output(x)
    assert delta.shape == (2, 32, 4, 4) and float(delta.detach().abs().max()) == 0.0
    (delta - 1).pow(2).mean().backward()
    assert all(p.grad is not None for p in trainable.parameters())
    assert any(float(p.grad.abs().max()) > 0 for p in trainable.parameters())
