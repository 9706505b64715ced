"""The runtime's rebuilt-weight path computes what the plain delta path computes, and adapters are
never changed by being used.

The rebuilt-weight path (W' = W + Σ strength * ΔW for one call, then one op) replaces the base op
plus delta products. Against the exact per-sample merged weights (float64) and against the delta
path it must agree with: per-sample strengths (strength 0 included), fused row slices and a row
permutation, stacked applications, T-LoRA masks (which stay on the delta path), an algorithm that
is not linear in the strength (DoRA), bias deltas on a bias-free layer, convs, fp16 / bf16 inputs,
and, with autograd, the same gradients for the adapter's tensors and the input, with no rebuilt
weight saved for backward. Plain torch modules stand in for ComfyUI's (no ComfyUI needed), except
in the last tests, which sample a real (tiny) ComfyUI model in bf16 with a LyCORIS file.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from comfyui_lycoris.core import runtime, scratch
from comfyui_lycoris.core.adapters import LayerSpec, lowrank, parse_module
from comfyui_lycoris.core.families import Route
from comfyui_lycoris.core.families.base import take_rows
from comfyui_lycoris.core.runtime import (
    Application,
    ModuleBinding,
    TLoraSchedule,
    active,
    build_call_state,
    install_hooks,
    rebuild_policy,
)
from comfyui_lycoris.core.tlora import rank_mask

H, IN, BATCH, TOKENS = 16, 32, 4, 5
TIMESTEPS = torch.tensor([0, 250, 600, 999])
TLORA = TLoraSchedule(min_rank=1, alpha=1.0)


def _rand(gen, *shape, scale=0.3):
    return torch.randn(*shape, generator=gen) * scale


def _adapter(name, params, shape, kind="linear", **conv):
    spec = LayerSpec(kind, shape, **conv)
    return parse_module(name, params, spec)


class Model(torch.nn.Module):
    """A fused q/k/v Linear with a bias, a bias-free Linear, a Linear whose halves are swapped, a conv."""

    def __init__(self, gen):
        super().__init__()
        self.qkv = torch.nn.Linear(IN, 3 * H)
        self.proj = torch.nn.Linear(H, IN, bias=False)
        self.swap = torch.nn.Linear(IN, H)
        self.conv = torch.nn.Conv2d(8, 12, 3, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(_rand(gen, *p.shape, scale=0.5))
        self.requires_grad_(False)


def _setup(seed=0, trainable=False):
    """(model, applications, leaves): two stacked applications over every module."""
    gen = torch.Generator().manual_seed(seed)
    model = Model(gen)
    lin = (H, IN)
    q = _adapter("q", {"lokr_w1": _rand(gen, 4, 4), "lokr_w2": _rand(gen, 4, 8)}, lin)  # a = 4
    k = _adapter("k", {"hada_w1_a": _rand(gen, H, 4), "hada_w1_b": _rand(gen, 4, IN), "hada_w2_a": _rand(gen, H, 4),
                       "hada_w2_b": _rand(gen, 4, IN), "alpha": torch.tensor(2.0)}, lin)
    v = _adapter("v", {"lora_up.weight": _rand(gen, H, 4), "lora_down.weight": _rand(gen, 4, IN),
                       "alpha": torch.tensor(3.0)}, lin)
    v_t = _adapter("v_t", {"q_layer.weight": _rand(gen, 4, IN), "p_layer.weight": _rand(gen, H, 4),
                           "lambda_layer": _rand(gen, 1, 4), "alpha": torch.tensor(4.0), "base_q": _rand(gen, 4, IN),
                           "base_p": _rand(gen, H, 4), "base_lambda": _rand(gen, 1, 4)}, lin)
    q2 = _adapter("q2", {"lokr_w1": _rand(gen, 2, 2), "lokr_w2_a": _rand(gen, 8, 2), "lokr_w2_b": _rand(gen, 2, 16),
                         "alpha": torch.tensor(1.5)}, lin)  # a = 2, decomposed w2
    k2 = _adapter("k2", {"diff": _rand(gen, H, IN, scale=0.1), "diff_b": _rand(gen, H)}, lin)
    # rank 2: its delta path is the rank-4 Khatri-Rao chain, added into the fused output in place
    v2 = _adapter("v2", {"hada_w1_a": _rand(gen, H, 2), "hada_w1_b": _rand(gen, 2, IN), "hada_w2_a": _rand(gen, H, 2),
                         "hada_w2_b": _rand(gen, 2, IN), "alpha": torch.tensor(1.0)}, lin)
    proj_full = _adapter("pf", {"diff": _rand(gen, IN, H, scale=0.1), "diff_b": _rand(gen, IN)}, (IN, H))
    proj_dora = _adapter("pd", {"lora_up.weight": _rand(gen, IN, 2), "lora_down.weight": _rand(gen, 2, H),
                                "alpha": torch.tensor(1.0),
                                "dora_scale": model.proj.weight.norm(dim=1, keepdim=True) * 1.1}, (IN, H))
    swap = _adapter("s", {"lokr_w1": _rand(gen, 1, 2), "lokr_w2": _rand(gen, H, 16)}, lin)  # rows not aligned to w2
    swap2 = _adapter("s2", {"lokr_w1": _rand(gen, 2, 2), "lokr_w2": _rand(gen, 8, 16)}, lin)  # aligned, w1 row 1 first
    conv_lokr = _adapter("cl", {"lokr_w1": _rand(gen, 2, 2), "lokr_w2": _rand(gen, 6, 4, 3, 3)}, (12, 8, 3, 3),
                         "conv", padding=1)
    conv_loha = _adapter("ch", {"hada_w1_a": _rand(gen, 12, 2), "hada_w1_b": _rand(gen, 2, 72),
                                "hada_w2_a": _rand(gen, 12, 2), "hada_w2_b": _rand(gen, 2, 72)}, (12, 8, 3, 3),
                         "conv", padding=1)
    if trainable:
        for adapter in (q, k, v, q2, k2, v2):
            for key, tensor in adapter.params.items():
                if key != "alpha":
                    tensor.requires_grad_(True)
    first = {"qkv": [ModuleBinding("q", q, Route.rows("qkv", 0, H)), ModuleBinding("k", k, Route.rows("qkv", H, H)),
                     ModuleBinding("v", v, Route.rows("qkv", 2 * H, H))],
             "proj": [ModuleBinding("pf", proj_full, Route("proj"))],
             "swap": [ModuleBinding("s", swap, Route("swap", ((0, 8, 8), (8, 0, 8))))],
             "conv": [ModuleBinding("cl", conv_lokr, Route("conv"))]}
    second = {"qkv": [ModuleBinding("q2", q2, Route.rows("qkv", 0, H)), ModuleBinding("k2", k2, Route.rows("qkv", H, H)),
                      ModuleBinding("v2", v2, Route.rows("qkv", 2 * H, H))],
              "proj": [ModuleBinding("pd", proj_dora, Route("proj"))],
              "swap": [ModuleBinding("s2", swap2, Route("swap", ((0, 8, 8), (8, 0, 8))))],
              "conv": [ModuleBinding("ch", conv_loha, Route("conv"))]}
    tl = {"qkv": [ModuleBinding("v_t", v_t, Route.rows("qkv", 2 * H, H))]}
    install_hooks(model, ["qkv", "proj", "swap", "conv"])
    leaves = [t for a in (q, k, v, q2, k2, v2) for t in a.params.values() if t.requires_grad]
    return model, [first, second, tl], leaves


def _apps(bindings, strengths):
    return [Application("a", bindings[0], strengths[0]), Application("b", bindings[1], strengths[1]),
            Application("t", bindings[2], strengths[2], TLORA)]


def _inputs(dtype, gen_seed=5):
    gen = torch.Generator().manual_seed(gen_seed)
    return {"qkv": torch.randn(BATCH, TOKENS, IN, generator=gen).to(dtype),
            "proj": torch.randn(BATCH, TOKENS, H, generator=gen).to(dtype),
            "swap": torch.randn(BATCH, TOKENS, IN, generator=gen).to(dtype),
            "conv": torch.randn(BATCH, 8, 6, 6, generator=gen).to(dtype)}


def _run(model, apps, inputs, policy):
    state = build_call_state(apps, BATCH, 1, TIMESTEPS)
    with active(state), rebuild_policy(policy):
        return {name: getattr(model, name)(x) for name, x in inputs.items()}


def _reference(model, apps, inputs):
    """Per sample: the layer with its exactly merged weight W + Σ ΔW(s_i) (T-LoRA: sample i's mask), float64."""
    out = {}
    for name, x in inputs.items():
        module = getattr(model, name)
        weight, bias = module.weight.double(), None if module.bias is None else module.bias.double()
        rows = []
        for i in range(BATCH):
            w = weight.clone()
            b = bias.clone() if bias is not None else torch.zeros(weight.shape[0], dtype=torch.float64)
            for app in apps:
                s = app.strengths[i % len(app.strengths)]
                for binding in app.bindings.get(name, []):
                    adapter, route = binding.adapter, binding.route
                    mask = None
                    if app.tlora is not None:
                        mask = rank_mask(TIMESTEPS[i : i + 1], adapter.rank, 1, 1.0)
                    dw, db = adapter.delta_weight(take_rows(route, weight), s, rank_mask=mask)
                    for c, d, n in route.blocks or ((0, 0, weight.shape[0]),):
                        w[c : c + n] += dw[d : d + n].detach()
                        if db is not None:
                            b[c : c + n] += db[d : d + n].detach()
            xi = x[i : i + 1].double()
            y = F.linear(xi, w, b) if name != "conv" else F.conv2d(xi, w, b, padding=1)
            rows.append(y)
        out[name] = torch.cat(rows)
    return out


def _close(a, b, tol):
    return float((a.double() - b.double()).abs().max()) <= tol * float(b.double().abs().max())


STRENGTHS = [((0.0, 0.7, -1.0, 0.7), (0.5,), (1.0, 0.3, 1.0, 0.0)),  # per sample, strength 0 included
             ((0.8,), (-0.5,), (1.0,))]
TOLERANCE = {torch.float32: 2e-6, torch.float16: 5e-3, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("window", [None, 7 * IN], ids=["one-window", "7-row-windows"])
@pytest.mark.parametrize("strengths", STRENGTHS, ids=["per-sample", "uniform"])
@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
def test_rebuilt_weight_equals_delta_path_and_exact_merge(dtype, strengths, window, monkeypatch):
    if window is not None:  # W' built a few rows at a time, windows cutting across slices and LoKr blocks
        monkeypatch.setattr(scratch, "WINDOW_BYTES", window * torch.finfo(dtype).bits // 8)
        monkeypatch.setattr(scratch, "WINDOW_MIN_ROWS", 1)  # LoHa's ΔW then in blocks of a few rows too
    model, bindings, _ = _setup()
    apps = _apps(bindings, strengths)
    inputs = _inputs(dtype)
    if dtype != torch.float32:
        model.to(dtype)
    assembled = []
    original = runtime._Rebuilt.__init__

    def spy(self, weight, bias, bindings, strengths):
        assembled.append(tuple(b.path for b in bindings))
        original(self, weight, bias, bindings, strengths)

    monkeypatch.setattr(runtime._Rebuilt, "__init__", spy)
    chained = []  # adapters whose delta went straight into the output (LoHa v2: its Khatri-Rao chain)
    add_output = lowrank.LoHaAdapter.add_output_

    def spy_add(self, *args):
        done = add_output(self, *args)
        chained.extend([self.lora_name] if done else [])
        return done

    monkeypatch.setattr(lowrank.LoHaAdapter, "add_output_", spy_add)
    outs = {"rebuild": _run(model, apps, inputs, "rebuild")}
    folded = set(assembled)
    outs.update({policy: _run(model, apps, inputs, policy) for policy in ("delta", "auto")})
    with torch.no_grad():
        ref = _reference(model, apps, inputs)
    tol = TOLERANCE[dtype]
    for name in inputs:
        for policy, out in outs.items():
            assert out[name].dtype == dtype
            assert _close(out[name], ref[name], tol), f"{name} {policy}: {float((out[name].double() - ref[name]).abs().max()):.3g}"
        assert _close(outs["rebuild"][name], outs["delta"][name], tol), name
    # Every stacked module but T-LoRA's went into the rebuilt weights (the row-permuted one, the conv too).
    assert {("q", "k", "v", "q2", "k2", "v2"), ("pf", "pd"), ("s", "s2"), ("cl", "ch")} <= folded, folded
    assert "v2" in chained and "k" not in chained, chained  # k (rank 4 on 16x32): ΔW is cheaper


def test_strength_zero_is_exactly_the_base():
    model, bindings, _ = _setup()
    linear = [{k: [b for b in v if b.adapter.linear_in_strength] for k, v in bind.items()} for bind in bindings]
    apps = _apps(linear, ((0.0,), (0.0, 0.0), (0.0,)))
    inputs = _inputs(torch.float32)
    with torch.no_grad():
        base = {name: getattr(model, name)(x) for name, x in inputs.items()}
        for policy in ("rebuild", "delta"):
            out = _run(model, apps, inputs, policy)
            assert all(torch.equal(out[name], base[name]) for name in inputs), policy


def test_clone_without_state_runs_the_base_class_forward():
    model, _, _ = _setup()
    assert type(model.qkv).__name__ == "Linear" and isinstance(model.qkv, torch.nn.Linear)
    x = _inputs(torch.float32)["qkv"]
    assert torch.equal(model.qkv(x), F.linear(x, model.qkv.weight, model.qkv.bias))


@pytest.mark.parametrize("checkpointed", [False, True], ids=["plain", "checkpointed"])
def test_training_gradients_equal_the_delta_path(checkpointed):
    model, bindings, leaves = _setup(trainable=True)
    apps = _apps(bindings, ((0.7,), (1.0,), (1.0,)))
    inputs = _inputs(torch.float32)
    results = {}
    for policy in ("delta", "rebuild", "auto"):
        xs = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
        for t in leaves:
            t.grad = None

        def forward(xs=xs, policy=policy):
            return sum((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum()
                       for o in _run(model, apps, xs, policy).values())

        loss = torch.utils.checkpoint.checkpoint(forward, use_reentrant=False) if checkpointed else forward()
        loss.backward()
        results[policy] = ([t.grad.clone() for t in leaves], {k: v.grad.clone() for k, v in xs.items()})
    assert all(p.grad is None for p in model.parameters()), "the frozen base gets no gradient"
    ref_leaves, ref_x = results["delta"]
    for policy in ("rebuild", "auto"):
        got_leaves, got_x = results[policy]
        for a, b in zip(got_leaves, ref_leaves, strict=True):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max())), policy
        for name in ref_x:
            assert torch.allclose(got_x[name], ref_x[name], rtol=1e-4, atol=1e-6), (policy, name)


def test_rebuilt_linear_saves_only_its_input():
    model, bindings, leaves = _setup(trainable=True)
    apps = [Application("a", {"qkv": bindings[0]["qkv"]}, (1.0,))]
    x = _inputs(torch.float32)["qkv"].requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t), \
            rebuild_policy("rebuild"), active(build_call_state(apps, BATCH, 1, None)):
        model.qkv(x).sum().backward()
    assert saved and all(t.numel() <= x.numel() for t in saved), [tuple(t.shape) for t in saved]
    assert not any(tuple(t.shape) == (3 * H, IN) for t in saved), "W' is rebuilt in backward, not saved"


def test_trainable_tensors_are_cast_per_call_and_never_cached():
    model, bindings, _ = _setup(trainable=True)
    model.to(torch.bfloat16)
    apps = [Application("a", {"qkv": bindings[0]["qkv"]}, (1.0,))]
    x = _inputs(torch.bfloat16)["qkv"]
    leaves = [t for b in bindings[0]["qkv"] for t in b.adapter.params.values() if t.requires_grad]
    before = list(leaves)
    for policy in ("rebuild", "delta"):
        with rebuild_policy(policy), active(build_call_state(apps, BATCH, 1, None)):
            model.qkv(x).float().sum().backward()
    assert all(a is b and a.dtype == torch.float32 and a.grad is not None for a, b in zip(leaves, before, strict=True))
    for binding in bindings[0]["qkv"]:
        adapter = binding.adapter
        placed = adapter.placed("cpu", torch.bfloat16)
        assert all(placed[k] is t for k, t in adapter.params.items() if t.requires_grad)


# -- a real ComfyUI model in bf16 with a LyCORIS file (item: adapters are not changed by being used) --

def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@pytest.fixture(scope="module")
def flux2():
    from model_pairs import make_pair

    return make_pair("flux2")


@pytest.mark.parametrize("name", ["lokr-full", "loha", "lora-dora"])
def test_sampling_a_bf16_model_leaves_the_adapter_as_the_file(flux2, name, tmp_path):
    from test_runtime_dtypes import denoised, low_precision_twin
    from test_runtime_interop import lycoris_file

    from comfyui_lycoris.core import api

    path = lycoris_file(flux2, name, tmp_path / f"{name}.safetensors")
    original = load_file(path)
    adapter = api.load_adapter(path, flux2.patcher)
    twin = low_precision_twin(flux2, torch.bfloat16)
    for policy in ("auto", "rebuild", "delta"):
        with rebuild_policy(policy):
            out = denoised(flux2, api.apply_sweep(twin, adapter, (1.0, 0.5)), torch.bfloat16)
        assert torch.isfinite(out).all()
    for binding in adapter.bindings.values():
        for key, tensor in binding.adapter.params.items():
            file_tensor = original[f"{binding.adapter.lora_name}.{key}"]
            assert tensor.dtype == file_tensor.dtype and tensor.device.type == "cpu", key
            assert _same_bits(tensor, file_tensor), key
    saved = load_file(api.save_adapter(adapter, tmp_path, "after_sampling"))
    assert saved.keys() == original.keys()
    for key, tensor in saved.items():
        assert tensor.dtype == original[key].dtype and _same_bits(tensor, original[key]), key


def test_sampling_prices_passes_by_dtype():
    """bf16 matmuls run on matrix units while elementwise passes do not (core.adapters.base.pass_cost):
    a 3072-wide LoHa r16 at 1280 tokens is rebuilt when sampling in fp32 and runs its Khatri-Rao chain
    in bf16; training keeps the fp32 price whatever the dtype (the memory estimate follows it)."""
    gen = torch.Generator().manual_seed(3)
    width, rank = 3072, 16
    loha = _adapter("w", {"hada_w1_a": _rand(gen, width, rank), "hada_w1_b": _rand(gen, rank, width),
                          "hada_w2_a": _rand(gen, width, rank), "hada_w2_b": _rand(gen, rank, width),
                          "alpha": torch.tensor(8.0)}, (width, width))
    assert runtime._rebuild_pays(loha, 1280, False, torch.float32)
    assert not runtime._rebuild_pays(loha, 1280, False, torch.bfloat16)
    assert loha._khatri_rao_pays(torch.zeros(1280, width, dtype=torch.bfloat16))
    for dtype in (torch.float32, torch.bfloat16):
        assert runtime._rebuild_pays(loha, 1280, True, dtype) == runtime._rebuild_pays(loha, 1280, True)
