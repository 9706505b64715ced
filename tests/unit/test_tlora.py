"""T-LoRA mask: the formula against LyCORIS, the heatmap pixels, the sampler overlay and the node."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lycoris.modules.tlora import compute_timestep_mask
from PIL import Image

from comfyui_lycoris.core import host
from comfyui_lycoris.core.mask_plot import (
    COMPARE_CURVES,
    LIT,
    STEP,
    Schedule,
    lit_mask,
    parse_alphas,
    render_mask_plot,
)
from comfyui_lycoris.core.tiny import TinySizes
from comfyui_lycoris.core.tlora import (
    active_rank,
    active_ranks,
    integer_timestep,
    rank_mask,
    timestep_from_sigma_flow,
)

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
ALPHAS = (0.3, 0.5, 1.0, 1.7, 2.0, 3.0)
TIMESTEPS = [float(t) for t in range(0, 1001)] + [0.5, 123.25, 999.999, 250.0001]


def _pixels(plot) -> torch.Tensor:
    return _to_uint8(plot.image)


def _to_uint8(image: torch.Tensor) -> torch.Tensor:
    return (image[0] * 255).round().to(torch.uint8)


def _save(image: torch.Tensor, name: str) -> None:
    """Keep the rendered image for a human to look at."""
    ARTIFACTS.mkdir(exist_ok=True)
    Image.fromarray(_to_uint8(image).numpy()).save(ARTIFACTS / name)


@pytest.mark.parametrize("rank, min_rank", [(8, 1), (8, 4), (8, 8), (64, 1), (64, 4), (64, 16)])
@pytest.mark.parametrize("alpha", ALPHAS)
def test_formula_matches_lycoris(rank, min_rank, alpha):
    expected = torch.cat([compute_timestep_mask(t, 1000, rank, min_rank, alpha) for t in TIMESTEPS])
    mask = rank_mask(torch.tensor(TIMESTEPS, dtype=torch.float64), rank, min_rank, alpha)
    assert torch.equal(mask, expected)
    assert active_ranks(TIMESTEPS, rank, min_rank, alpha).tolist() == expected.sum(1).long().tolist()
    assert [active_rank(t, rank, min_rank, alpha) for t in TIMESTEPS[:1001:37]] == \
        expected.sum(1).long().tolist()[:1001:37]


@pytest.mark.parametrize("alpha, expected", [(1.0, [64, 48, 32, 16]), (2.0, [64, 36, 16, 4])])
def test_facts_anchors(alpha, expected):
    assert active_ranks([0, 250, 500, 750], 64, 1, alpha).tolist() == expected
    assert active_rank(1000, 64, 1, alpha) == 1


def test_timesteps_are_clamped_to_the_schedule():
    for alpha in (0.5, 1.0, 2.0):
        assert active_rank(-50, 64, 4, alpha) == active_rank(0, 64, 4, alpha) == 64
        assert active_rank(1500, 64, 4, alpha) == active_rank(1000, 64, 4, alpha) == 4
    assert rank_mask(torch.tensor([-1.0, 2000.0]), 8, 2, 1.0).sum(1).tolist() == [8.0, 2.0]


@pytest.mark.parametrize("rank, min_rank, alpha, field", [(0, 0, 1.0, "rank"), (8, 9, 1.0, "min_rank"),
                                                          (8, 1, -1.0, "alpha"), (8, 1, float("nan"), "alpha")])
def test_bad_parameters_name_the_field(rank, min_rank, alpha, field):
    with pytest.raises(ValueError, match=field):
        active_rank(0, rank, min_rank, alpha)


def test_flow_timesteps_are_simpletuners_float32_truncation():
    """SimpleTuner: `timesteps = sigmas * 1000.0` in float32, then `int(t)` (test_simpletuner_conformance has more)."""
    assert int(1000 * torch.tensor(0.9, dtype=torch.float32).item()) == 899  # a float64 product would give 899
    assert timestep_from_sigma_flow(torch.tensor(0.9, dtype=torch.float32).item()) == 900  # float32's gives 900
    sigmas = torch.tensor([1.0, 0.9, 0.8996, 0.25, 0.0, 0.90099996], dtype=torch.float32)
    assert timestep_from_sigma_flow(sigmas).tolist() == [1000, 900, 899, 250, 0, 900]
    assert integer_timestep(899.6) == 899 and integer_timestep(899.99997) == 900  # float32(899.99997) is 900.0
    assert integer_timestep(899.9999) == 899


@pytest.mark.parametrize("rank, alpha, size", [(64, 1.0, (768, 512)), (8, 2.0, (768, 512)),
                                               (100, 0.5, (1024, 700)), (640, 1.0, (600, 400))])
def test_heatmap_lights_r_of_t_ranks_per_column(rank, alpha, size):
    plot = render_mask_plot(rank, 1, [alpha], width=size[0], height=size[1])
    area = plot.area
    pixels = _pixels(plot)[area.top:area.top + area.height, area.left:area.left + area.width]
    lit = torch.zeros(area.height, area.width, dtype=torch.bool)
    for colour in LIT:
        lit |= (pixels == torch.tensor(colour, dtype=torch.uint8)).all(-1)
    expected = [area.lit_pixels(active_rank(area.timestep_at(x), rank, 1, alpha)) for x in range(area.width)]
    assert lit.sum(0).tolist() == expected
    rows = torch.arange(area.height)[:, None]
    assert torch.equal(lit, rows >= area.height - torch.tensor(expected)[None, :]), "lit cells sit at the bottom"
    assert area.timestep_at(0) == 0 and area.timestep_at(area.width - 1) == 1000


def test_compare_alphas_get_their_own_curves():
    plot = render_mask_plot(64, 1, [1.0, 0.5, 2.0])
    area = plot.area
    pixels = _pixels(plot)[area.top:area.top + area.height, area.left:area.left + area.width]
    for alpha, colour in zip((0.5, 2.0), COMPARE_CURVES, strict=False):
        drawn = (pixels == torch.tensor(colour, dtype=torch.uint8)).all(-1)
        assert drawn.sum() > area.width, f"alpha {alpha} curve is drawn"
        near = torch.nn.functional.max_pool2d(lit_mask(area, 64, 1, alpha).float()[None, None], 5, 1, 2)[0, 0] > 0
        assert not (drawn & ~near).any(), f"alpha {alpha} curve hugs its own r(t)"
    assert "r(alpha=0.5)" in plot.table and "r(alpha=2)" in plot.table


def _table_rows(table: str) -> list[list[str]]:
    lines = [ln for ln in table.splitlines() if not ln.startswith("#")]
    return [ln.split() for ln in lines[1:]]


def test_table_without_model_follows_the_formula():
    plot = render_mask_plot(64, 4, [1.0, 0.5, 2.0])
    rows = _table_rows(plot.table)
    assert [int(r[2]) for r in rows] == list(range(0, 1001, 50))
    for r in rows:
        t = int(r[2])
        assert [int(v) for v in r[3:]] == [active_rank(t, 64, 4, a) for a in (1.0, 0.5, 2.0)]


def test_alpha_text_is_parsed_with_clear_errors():
    assert parse_alphas("0.5, 2") == [0.5, 2.0] and parse_alphas(" ") == []
    with pytest.raises(ValueError, match="compare_alphas: 'x'"):
        parse_alphas("0.5, x")
    with pytest.raises(ValueError, match="compare_alphas"):
        render_mask_plot(8, 1, [1, 2, 3, 4, 5, 6])
    with pytest.raises(ValueError, match="width/height"):
        render_mask_plot(8, 1, [1.0], width=120, height=90)


@pytest.fixture(scope="module", params=["flux2", "sdxl"])
def tiny(request):
    sizes = TinySizes(family="flux2") if request.param == "flux2" else \
        TinySizes(family="sdxl", width=64, heads=2, context_dim=32)
    return request.param, host.build_tiny_model(sizes)


@pytest.mark.parametrize("scheduler", ["simple", "karras", "normal"])
def test_schedule_is_comfyuis_own(tiny, scheduler):
    import comfy.samplers

    family, model = tiny
    sampling = model.get_model_object("model_sampling")
    sigmas = host.sampler_sigmas(model, scheduler, 12)
    assert torch.equal(sigmas, comfy.samplers.calculate_sigmas(sampling, scheduler, 12).cpu())
    partial = host.sampler_sigmas(model, scheduler, 12, denoise=0.4)
    ksampler = comfy.samplers.KSampler(model, 12, "cpu", sampler="euler", scheduler=scheduler, denoise=0.4)
    assert torch.equal(partial, ksampler.sigmas.cpu()) and len(partial) == 13
    timesteps = host.sigma_timesteps(model, sigmas[:-1])
    if family == "flux2":
        assert torch.equal(timesteps, timestep_from_sigma_flow(sigmas[:-1]))
        assert timesteps[0] == 1000
    else:
        assert torch.equal(timesteps, sampling.timestep(sigmas[:-1]).long())
        assert timesteps[0] == 999


def test_node_marks_the_sampler_steps(tiny, tmp_path, monkeypatch):
    import folder_paths

    from comfyui_lycoris.nodes.tlora_visualizer import TLoraMaskVisualizer

    monkeypatch.setattr(folder_paths, "temp_directory", str(tmp_path))
    family, model = tiny
    out = TLoraMaskVisualizer.execute(64, 1, 1.0, "0.5, 2", "karras", 10, 1.0, 768, 512, model=model)
    image, table = out.result
    assert image.shape == (1, 512, 768, 3) and 0.0 <= image.min() and image.max() <= 1.0
    sigmas = host.sampler_sigmas(model, "karras", 10)[:-1]
    timesteps = host.sigma_timesteps(model, sigmas).tolist()
    rows = _table_rows(table)
    assert [int(r[0]) for r in rows] == list(range(10))
    assert [float(r[1]) for r in rows] == pytest.approx(sigmas.tolist(), rel=1e-5)
    assert [int(r[2]) for r in rows] == timesteps
    for r in rows:
        assert [int(v) for v in r[3:]] == [active_rank(int(r[2]), 64, 1, a) for a in (1.0, 0.5, 2.0)]
    plot = render_mask_plot(64, 1, [1.0, 0.5, 2.0], Schedule(tuple(timesteps)), 768, 512)
    pixels = _pixels(plot)
    for t in timesteps:
        assert pixels[plot.area.top + 1, plot.area.left + plot.area.x_of(t)].tolist() == list(STEP)
    assert out.ui.as_dict()["images"], "the heatmap is shown on the node"
    _save(image, f"tlora_mask_{family}_karras.png")


def test_node_without_model_and_with_config(tmp_path, monkeypatch):
    import folder_paths

    from comfyui_lycoris.nodes.tlora_visualizer import TLoraMaskVisualizer

    monkeypatch.setattr(folder_paths, "temp_directory", str(tmp_path))
    out = TLoraMaskVisualizer.execute(64, 1, 1.0, "0.5, 2", "simple", 20, 1.0, 768, 512)
    _save(out.result[0], "tlora_mask.png")
    assert "R=64, min_rank=1" in out.result[1]
    config = SimpleNamespace(algo="tlora", linear_dim=16, tlora_min_rank=2, tlora_alpha=2.0)
    table = TLoraMaskVisualizer.execute(64, 1, 1.0, "", "simple", 20, 1.0, 768, 512, config=config).result[1]
    assert "R=16, min_rank=2" in table and "r(alpha=2)" in table
    with pytest.raises(ValueError, match="only for algo 'tlora'"):
        TLoraMaskVisualizer.execute(64, 1, 1.0, "", "simple", 20, 1.0, 768, 512,
                                    config=SimpleNamespace(algo="lokr", linear_dim=16))
