"""Adapter files: what LyCORIS/SimpleTuner save loads and matches; damaged or unsafe input is refused."""

import json
import os
import struct
import threading

import pytest
import torch
from lycoris import LycorisNetwork, create_lycoris
from lycoris.wrapper import create_lycoris_from_weights
from safetensors import safe_open
from safetensors.torch import save_file

from comfyui_lycoris.core import adapter_file as af
from comfyui_lycoris.core.adapter_file import (
    AdapterFileError,
    adapter_metadata,
    match_modules,
    next_free_name,
    read_adapter,
    write_adapter,
)
from comfyui_lycoris.core.families import profile_named
from comfyui_lycoris.core.tiny import TinySizes, unet_config

_LOCK = threading.Lock()  # LyCORIS keeps its preset (and LORA_PREFIX) in process-global class state
SIZES = TinySizes(family="flux2", width=64, heads=2, depth=1, single_depth=1, context_dim=32)
CONFIG = {"algo": "lokr", "multiplier": 1.0, "linear_dim": 8, "linear_alpha": 4, "factor": 4,
          "apply_preset": {"target_module": ["Linear"]}}


def _preset(prefix: str = "lycoris") -> dict:
    return {"target_module": ["Linear"], "target_name": [], "module_algo_map": {}, "name_algo_map": {},
            "exclude_name": [], "use_fnmatch": False, "enable_conv": True, "lora_prefix": prefix}


@pytest.fixture(scope="module")
def flux2():
    profile = profile_named("flux2")
    return profile, unet_config(SIZES)


def _lycoris_file(flux2, path, prefix="lycoris", config=CONFIG):
    """Wrap a tiny Flux 2 with LyCORIS, randomise the adapter, save it the way SimpleTuner does."""
    profile, cfg = flux2
    model = profile.build_skeleton(cfg, device="cpu")
    with _LOCK:
        LycorisNetwork.apply_preset(_preset(prefix))
        network = create_lycoris(model, 1.0, 8, 4, algo="lokr", factor=4)
        LycorisNetwork.apply_preset(_preset())
    network.apply_to()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    network.save_weights(str(path), torch.float32, {"lycoris_config": json.dumps(config)})
    return network


@pytest.fixture(scope="module")
def saved(flux2, tmp_path_factory):
    path = tmp_path_factory.mktemp("lycoris") / "pytorch_lora_weights.safetensors"
    network = _lycoris_file(flux2, path)
    return path, len(network.loras), {k: v.clone() for k, v in network.state_dict().items()}


def test_reads_and_matches_what_lycoris_saves(flux2, saved):
    profile, cfg = flux2
    path, count, state = saved
    adapter = read_adapter(path)
    assert adapter.config is not None and adapter.config.algo == "lokr" and adapter.warnings == []
    assert adapter.raw_config == CONFIG
    match = match_modules(adapter, profile.routes(cfg))
    assert len(match.matched) == count == len(profile.routes(cfg)) and match.unmatched == []
    assert match.describe() == f"{count} of {count} modules matched"
    assert match.matched["lycoris_transformer_blocks_0_attn_to_q"] == "transformer_blocks.0.attn.to_q"
    flat = adapter.tensors()
    assert flat.keys() == state.keys()
    assert all(torch.equal(flat[k], state[k]) for k in state)
    assert adapter.modules["lycoris_transformer_blocks_0_attn_to_q"].keys() >= {"lokr_w1", "alpha"}


def test_lora_prefix_from_the_config(flux2, tmp_path):
    profile, cfg = flux2
    config = {**CONFIG, "apply_preset": {"target_module": ["Linear"], "lora_prefix": "mine"}}
    network = _lycoris_file(flux2, tmp_path / "p.safetensors", prefix="mine", config=config)
    adapter = read_adapter(tmp_path / "p.safetensors")
    assert adapter.lora_prefix == "mine"
    assert len(match_modules(adapter, profile.routes(cfg)).matched) == len(network.loras)


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin"])
def test_pickle_formats_are_refused_with_the_reason(tmp_path, suffix):
    path = tmp_path / f"adapter{suffix}"
    path.write_bytes(b"not read")
    with pytest.raises(AdapterFileError, match="pickle.*run arbitrary code"):
        read_adapter(path)


def test_other_extensions_are_refused(tmp_path):
    with pytest.raises(AdapterFileError, match="only .safetensors"):
        read_adapter(tmp_path / "adapter.json")


def _good_bytes() -> bytes:
    import io

    from safetensors.torch import save

    buf = io.BytesIO(save({"lycoris_a.lokr_w1": torch.ones(4, 4), "lycoris_a.alpha": torch.tensor(1.0)}))
    return buf.getvalue()


def _with_header(mutate) -> bytes:
    data = _good_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    mutate(header)
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + n :]


DAMAGED = [
    ("truncated", lambda: _good_bytes()[:-10], "truncated"),
    ("truncated header", lambda: _good_bytes()[:20], "truncated"),
    ("garbage", lambda: b"this is not a safetensors file at all" * 4, "not a safetensors file"),
    ("empty", lambda: b"", "not a safetensors file (empty)"),
    ("three bytes", lambda: b"abc", "not a safetensors file"),
    ("lying offsets", lambda: _with_header(lambda h: h["lycoris_a.lokr_w1"].update(data_offsets=[0, 4000])),
     "truncated or its header is damaged"),
    ("shape disagrees with offsets", lambda: _with_header(lambda h: h["lycoris_a.lokr_w1"].update(shape=[5, 4])),
     "not a valid safetensors file"),
    ("overlapping tensors", lambda: _with_header(lambda h: h["lycoris_a.alpha"].update(data_offsets=[8, 12])),
     "not a valid safetensors file"),
    ("trailing bytes", lambda: _good_bytes() + b"x" * 16, "unexpected bytes"),
    ("header not json", lambda: struct.pack("<Q", 8) + b"{nope!!}", "header is not JSON"),
    ("no offsets", lambda: _with_header(lambda h: h["lycoris_a.lokr_w1"].pop("data_offsets")), "data_offsets"),
    ("metadata not strings", lambda: _with_header(lambda h: h.update(__metadata__={"a": 1})),
     "not a valid safetensors file"),
]


@pytest.mark.parametrize("make, message", [(m, msg) for _, m, msg in DAMAGED], ids=[i for i, _, _ in DAMAGED])
def test_damaged_files_say_what_is_wrong(tmp_path, make, message):
    path = tmp_path / "damaged.safetensors"
    path.write_bytes(make())
    with pytest.raises(AdapterFileError) as err:
        read_adapter(path)
    assert message in str(err.value) and "damaged.safetensors" in str(err.value)


def test_missing_file_and_no_tensors(tmp_path):
    with pytest.raises(AdapterFileError, match="gone.safetensors: file not found"):
        read_adapter(tmp_path / "gone.safetensors")
    save_file({}, tmp_path / "none.safetensors")
    with pytest.raises(AdapterFileError, match="contains no tensors"):
        read_adapter(tmp_path / "none.safetensors")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_tensors_name_the_key(tmp_path, bad):
    w = torch.ones(4, 4)
    w[1, 2] = bad
    save_file({"lycoris_a.lokr_w1": w, "lycoris_a.alpha": torch.tensor(1.0)}, tmp_path / "x.safetensors")
    with pytest.raises(AdapterFileError, match="'lycoris_a.lokr_w1' contains"):
        read_adapter(tmp_path / "x.safetensors")


@pytest.mark.parametrize("key", ["lycoris_a", "lycoris_a.", ".alpha"])
def test_keys_need_a_module_and_a_param(tmp_path, key):
    save_file({key: torch.ones(2)}, tmp_path / "x.safetensors")
    with pytest.raises(AdapterFileError, match=f"tensor key '{key}' is not of the form"):
        read_adapter(tmp_path / "x.safetensors")


def test_unknown_modules_are_reported_not_fatal(flux2, saved, tmp_path):
    profile, cfg = flux2
    tensors = read_adapter(saved[0]).tensors()
    tensors["lycoris_not_in_this_model.alpha"] = torch.tensor(1.0)
    tensors["lora_unet_foo.alpha"] = torch.tensor(1.0)
    save_file(tensors, tmp_path / "extra.safetensors")
    match = match_modules(read_adapter(tmp_path / "extra.safetensors"), profile.routes(cfg))
    assert match.unmatched == ["lora_unet_foo", "lycoris_not_in_this_model"]
    assert len(match.matched) == saved[1]
    assert match.describe().startswith(f"{saved[1]} of {saved[1] + 2} modules matched; not in this model: lora_unet_foo")
    assert "kohya" in match.describe()


@pytest.mark.parametrize("text, warning", [
    (json.dumps({"algo": "lokr", "multiplier": 0.5, "linear_dim": 8, "linear_alpha": 4, "old_key": 1}),
     "multiplier: 0.5 becomes 0"),
    ("{not json", "not valid JSON"),
    ("[1, 2]", "not a JSON object"),
])
def test_a_bad_lycoris_config_is_a_warning(tmp_path, text, warning):
    save_file({"lycoris_a.alpha": torch.tensor(1.0)}, tmp_path / "x.safetensors", {"lycoris_config": text})
    adapter = read_adapter(tmp_path / "x.safetensors")
    assert adapter.config is None and len(adapter.warnings) == 1 and warning in adapter.warnings[0]
    if "multiplier" in warning:
        assert adapter.raw_config["old_key"] == 1


def test_unknown_keys_in_the_metadata_pass_as_lycoris_ignores_them(tmp_path):
    text = json.dumps({"algo": "lokr", "multiplier": 1, "linear_dim": 8, "linear_alpha": 4, "old_key": 1})
    save_file({"lycoris_a.alpha": torch.tensor(1.0)}, tmp_path / "x.safetensors", {"lycoris_config": text})
    adapter = read_adapter(tmp_path / "x.safetensors")
    assert adapter.config is not None and adapter.warnings == []
    assert any("unknown key 'old_key'" in w for w in adapter.config.warnings)


# -- writing --

def _tensors() -> dict:
    return {"lycoris_a.lokr_w1": torch.randn(4, 4), "lycoris_a.alpha": torch.tensor(2.0),
            "lycoris_b.lokr_w2": torch.randn(8, 2).t()}  # not contiguous


def test_write_round_trip(tmp_path):
    tensors = _tensors()
    meta = adapter_metadata(json.dumps(CONFIG), "flux2", "lokr", {"factor": 4, "rank": 8, "base_model_hash": None})
    path = write_adapter(tmp_path, "sub/dir/my_lokr.safetensors", tensors, meta)
    assert path == (tmp_path / "sub" / "dir" / "my_lokr.safetensors").resolve()
    adapter = read_adapter(path)
    assert adapter.metadata == meta and adapter.config.factor == 4
    assert adapter.pack_info == {"family": "flux2", "algo": "lokr", "factor": "4", "rank": "8"}
    assert all(torch.equal(adapter.tensors()[k], v) for k, v in tensors.items())
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_adapter_metadata_keeps_simpletuner_config_as_is():
    text = json.dumps(CONFIG)
    meta = adapter_metadata(text, "flux2", "tlora", {"tlora_min_rank": 2, "tlora_alpha": 1.5})
    assert meta == {"lycoris_config": text, "format": "pt", "lycoris_pack.family": "flux2",
                    "lycoris_pack.algo": "tlora", "lycoris_pack.tlora_min_rank": "2", "lycoris_pack.tlora_alpha": "1.5"}
    with pytest.raises(AdapterFileError, match="lycoris_config: not valid JSON"):
        adapter_metadata("{", "flux2", "lokr", {})


@pytest.mark.parametrize("name", ["../x", "/abs", "a/../../b", "C:\\x", "c:x", "..\\x", "", "  ", "a\0b",
                                  ".safetensors", "a/.hidden", "x:stream", "CON", "a/nul.txt", "x."])
def test_unsafe_names_are_rejected(tmp_path, name):
    folder = tmp_path / "out"
    with pytest.raises(AdapterFileError, match="name"):
        write_adapter(folder, name, _tensors(), {})
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "b.safetensors").exists()


def test_symlinks_pointing_outside_are_rejected(tmp_path):
    folder, outside = tmp_path / "out", tmp_path / "elsewhere"
    folder.mkdir()
    outside.mkdir()
    (folder / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(AdapterFileError, match="outside the output folder"):
        write_adapter(folder, "link/x", _tensors(), {})
    (folder / "file.safetensors").symlink_to(outside / "victim.safetensors")
    with pytest.raises(AdapterFileError, match="symbolic link"):
        write_adapter(folder, "file", _tensors(), {}, overwrite=True)
    assert list(outside.iterdir()) == []


def test_overwrite_only_when_asked(tmp_path):
    first = write_adapter(tmp_path, "a", {"lycoris_a.alpha": torch.tensor(1.0)}, {})
    with pytest.raises(AdapterFileError, match="a.safetensors: already exists"):
        write_adapter(tmp_path, "a", {"lycoris_a.alpha": torch.tensor(2.0)}, {})
    assert read_adapter(first).modules["lycoris_a"]["alpha"].item() == 1.0
    write_adapter(tmp_path, "a", {"lycoris_a.alpha": torch.tensor(2.0)}, {}, overwrite=True)
    assert read_adapter(first).modules["lycoris_a"]["alpha"].item() == 2.0


@pytest.mark.parametrize("stage", ["during save", "at rename"])
def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch, stage):
    path = write_adapter(tmp_path, "a", {"lycoris_a.alpha": torch.tensor(1.0)}, {})
    before = path.read_bytes()

    def half_write(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    def no_rename(src, dst):
        raise OSError("rename failed")

    if stage == "during save":
        monkeypatch.setattr(af, "save_file", half_write)
    else:
        monkeypatch.setattr(af.os, "replace", no_rename)
    with pytest.raises(OSError):
        write_adapter(tmp_path, "a", {"lycoris_a.alpha": torch.tensor(2.0)}, {}, overwrite=True)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


def test_bad_tensors_and_metadata_are_refused(tmp_path):
    with pytest.raises(AdapterFileError, match="'lycoris_a.alpha' contains 1 NaN"):
        write_adapter(tmp_path, "a", {"lycoris_a.alpha": torch.tensor(float("nan"))}, {})
    with pytest.raises(AdapterFileError, match="metadata 'rank'"):
        write_adapter(tmp_path, "a", {"lycoris_a.alpha": torch.tensor(1.0)}, {"rank": 8})
    assert list(tmp_path.iterdir()) == []


def test_next_free_name_counts_up(tmp_path):
    assert next_free_name(tmp_path, "lokr") == "lokr_00001"
    write_adapter(tmp_path, next_free_name(tmp_path, "lokr"), {"lycoris_a.alpha": torch.tensor(1.0)}, {})
    assert next_free_name(tmp_path, "lokr") == "lokr_00002"
    (tmp_path / "lokr_00041.safetensors").write_bytes(b"")
    (tmp_path / "lokrx_00099.safetensors").write_bytes(b"")
    assert next_free_name(tmp_path, "lokr") == "lokr_00042"
    assert next_free_name(tmp_path, "runs/lokr") == "runs/lokr_00001"
    with pytest.raises(AdapterFileError):
        next_free_name(tmp_path, "../lokr")


def test_lycoris_loads_what_we_write(flux2, saved, tmp_path):
    """A file written by write_adapter loads with LyCORIS's own loader, module for module."""
    profile, cfg = flux2
    source = read_adapter(saved[0])
    path = write_adapter(tmp_path, "ours", source.tensors(), adapter_metadata(json.dumps(CONFIG), "flux2", "lokr", {}))
    model = profile.build_skeleton(cfg, device="cpu")
    with _LOCK:
        LycorisNetwork.apply_preset(_preset())
        network, weights = create_lycoris_from_weights(1.0, str(path), model)
    assert len(network.loras) == saved[1]
    assert {m.lora_name for m in network.loras} == set(source.modules)
    with safe_open(str(path), "pt") as fh:
        assert fh.metadata()["lycoris_config"] == json.dumps(CONFIG)
