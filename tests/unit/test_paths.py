"""User-given names and values: one validator for names and paths (core.paths), finite strengths,
deep JSON configs. Every refusal names the input and nothing is written outside the folder."""

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from comfyui_lycoris.core import api
from comfyui_lycoris.core.adapter_file import (
    AdapterFileError,
    free_adapter_name,
    next_free_name,
    read_adapter,
    resolve_in_folder,
    write_adapter,
)
from comfyui_lycoris.core.config import ConfigError, load_json, parse_config
from comfyui_lycoris.core.paths import (
    MAX_SEGMENT_BYTES,
    PathNameError,
    free_name,
    numbered_name,
    resolve_inside,
    safe_relative_name,
)
from comfyui_lycoris.trainer.spec import JobSpec, SpecError

SUFFIX = ".safetensors"

# (name, what the message must say)
BAD_NAMES = [
    ("", "must not be empty"),
    (" ", "must not be empty"),
    ("\t", "must not be empty"),
    ("   \n", "must not be empty"),
    ("/srv/elsewhere/x", "absolute path"),
    ("/", "absolute path"),
    ("C:/x", "Windows drive"),
    ("c:x", "Windows drive"),
    ("C:\\x", "'\\' is not allowed"),
    ("a\\b", "'\\' is not allowed"),
    ("..\\x", "'\\' is not allowed"),
    ("../x", "'..' is not allowed"),
    ("a/../../b", "'..' is not allowed"),
    ("..", "'..' is not allowed"),
    ("a/..", "'..' is not allowed"),
    ("./x", "starts with a dot"),
    ("a/./b", "starts with a dot"),
    (".hidden", "starts with a dot"),
    ("a/.hidden", "starts with a dot"),
    (".safetensors", "empty folder or file name"),
    ("a//b", "empty folder or file name"),
    ("a/", "empty folder or file name"),
    ("a/ /b", "only of spaces"),
    (" x", "starts or ends with a space"),
    ("x ", "starts or ends with a space"),
    ("a /b", "starts or ends with a space"),
    ("x.", "ends with a dot"),
    ("a./b", "ends with a dot"),
    ("x..", "ends with a dot"),
    ("con", "reserved device name"),
    ("CON", "reserved device name"),
    ("nul", "reserved device name"),
    ("a/nul.txt", "reserved device name"),
    ("Aux.tar.gz", "reserved device name"),
    ("prn.safetensors", "reserved device name"),
    ("com1", "reserved device name"),
    ("COM9.x", "reserved device name"),
    ("lpt1/x", "reserved device name"),
    ("LpT5", "reserved device name"),
    ("com¹", "reserved device name"),
    ("con .txt", "reserved device name"),
    ("x:stream", "Windows drive"),
    ("a/x:stream", "':' is not allowed"),
    ("a<b", "'<' is not allowed"),
    ("a>b", "'>' is not allowed"),
    ('a"b', "'\"' is not allowed"),
    ("a|b", "'|' is not allowed"),
    ("a?b", "'?' is not allowed"),
    ("a*b", "'*' is not allowed"),
    ("a\0b", "control characters"),
    ("a\nb", "control characters"),
    ("a\x1fb", "control characters"),
    ("a\x7fb", "control characters"),
    ("a\x85b", "control characters"),
    ("a\ud800b", "unpaired surrogates"),
    ("x" * 300, "300 bytes long"),
    ("x" * (MAX_SEGMENT_BYTES - len(SUFFIX)), "at most"),  # fits alone, not with a counter and a temp name
    ("ü" * 120, "240 bytes long"),  # 120 characters, 240 bytes
    ("d" * 256 + "/x", "256 bytes long"),
    ("/".join(["abcdefgh"] * 130), "bytes long"),  # every part is fine, the whole name is not
]

GOOD_NAMES = [
    ("x", "x"),
    ("lycoris/trained", "lycoris/trained"),
    ("x.safetensors", "x"),
    ("X.SafeTensors", "X"),
    ("runs/2024-01-01/lokr v2 (test)", "runs/2024-01-01/lokr v2 (test)"),
    ("ünïcödé/名前/имя", "ünïcödé/名前/имя"),
    ("a.b.c", "a.b.c"),
    ("console", "console"),  # only the exact device names are reserved
    ("com10", "com10"),
    ("nul_x", "nul_x"),
    ("x" * (MAX_SEGMENT_BYTES - len(SUFFIX) - 24), "x" * (MAX_SEGMENT_BYTES - len(SUFFIX) - 24)),
]


@pytest.mark.parametrize("name, message", BAD_NAMES, ids=[repr(n[:20]) for n, _ in BAD_NAMES])
def test_bad_names_are_refused_naming_the_input(name, message):
    with pytest.raises(PathNameError) as err:
        safe_relative_name(name, "output_name", SUFFIX)
    text = str(err.value)
    assert text.startswith("output_name: "), text
    assert message in text, text
    assert "(got " in text and "; " in text, "says what it got and what is allowed"
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("name, clean", GOOD_NAMES, ids=[repr(n[:20]) for n, _ in GOOD_NAMES])
def test_good_names_pass_clean(name, clean, tmp_path):
    assert safe_relative_name(name, "filename", SUFFIX) == clean
    path = resolve_inside(tmp_path, name, "filename", suffix=SUFFIX)
    assert path == (tmp_path.resolve() / (clean + SUFFIX))


def test_non_text_is_refused():
    for value in (None, 3, b"x", ["x"]):
        with pytest.raises(PathNameError, match="^folder: must be text"):
            safe_relative_name(value, "folder")


def test_names_only_read_keep_no_room_for_counters():
    long = "d" * 250
    with pytest.raises(PathNameError, match="at most"):
        safe_relative_name(long, "folder")
    assert safe_relative_name(long, "folder", new=False) == long


def test_symlinks_out_of_the_folder_are_refused(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "inner").mkdir(parents=True)
    outside.mkdir()
    (root / "out").symlink_to(outside, target_is_directory=True)
    (root / "in").symlink_to(root / "inner", target_is_directory=True)
    (root / "file.safetensors").symlink_to(outside / "victim.safetensors")
    (root / "loop").symlink_to(root / "loop")
    for name in ("out/x", "out", "file", "out/deeper/x"):
        with pytest.raises(PathNameError, match=r"^filename: .*resolves outside the loras folder"):
            resolve_inside(root, name, "filename", suffix=SUFFIX if name == "file" else "", where="the loras folder")
    with pytest.raises(PathNameError, match="^filename: "):
        resolve_inside(root, "loop/x", "filename")
    # a link that stays inside is followed: the resolved path is returned
    assert resolve_inside(root, "in/x", "filename") == (root / "inner" / "x").resolve()
    for call in (lambda: free_name(root, "out/x", "filename"), lambda: numbered_name(root, "out/x", "filename")):
        with pytest.raises(PathNameError, match="resolves outside"):
            call()
    with pytest.raises(AdapterFileError, match="^filename: .*outside the output folder"):
        write_adapter(root, "out/x", {"lycoris_a.alpha": torch.tensor(1.0)}, {}, input_name="filename")
    with pytest.raises(AdapterFileError, match="symbolic link"):
        write_adapter(root, "file", {"lycoris_a.alpha": torch.tensor(1.0)}, {}, overwrite=True)
    assert list(outside.iterdir()) == []


def test_adapter_name_errors_are_both_error_types(tmp_path):
    with pytest.raises(AdapterFileError) as err:
        resolve_in_folder(tmp_path, "../x", "filename")
    assert isinstance(err.value, PathNameError) and str(err.value).startswith("filename: ")
    assert list(tmp_path.iterdir()) == []


def test_one_counter_for_files_and_folders(tmp_path):
    assert numbered_name(tmp_path, "lokr", "n", suffix=SUFFIX) == "lokr_00001"
    assert free_name(tmp_path, "lokr.safetensors", "n", suffix=SUFFIX) == "lokr"
    (tmp_path / "lokr.safetensors").write_bytes(b"")
    assert free_name(tmp_path, "lokr", "n", suffix=SUFFIX) == "lokr_00001"
    (tmp_path / "lokr_00007.safetensors").write_bytes(b"")
    (tmp_path / "LOKR_00009.SAFETENSORS").write_bytes(b"")  # case-insensitive file systems
    (tmp_path / "lokrx_00099.safetensors").write_bytes(b"")
    (tmp_path / "lokr_00050.txt").write_bytes(b"")
    assert free_name(tmp_path, "lokr", "n", suffix=SUFFIX) == "lokr_00010"
    assert next_free_name(tmp_path, "lokr") == "lokr_00010"
    assert free_adapter_name(tmp_path, "lokr") == "lokr_00010"
    assert free_adapter_name(tmp_path, "sub/lokr") == "sub/lokr"
    assert next_free_name(tmp_path, "sub/lokr") == "sub/lokr_00001"
    (tmp_path / "dangling.safetensors").symlink_to(tmp_path / "nowhere")
    assert free_name(tmp_path, "dangling", "n", suffix=SUFFIX) == "dangling_00001"

    (tmp_path / "jobs" / "run").mkdir(parents=True)  # folders count the same way
    assert free_name(tmp_path / "jobs", "run", "output_name") == "run_00001"
    assert free_name(tmp_path, "jobs/run", "output_name") == "jobs/run_00001"
    (tmp_path / "jobs" / "run_00003").mkdir()
    assert free_name(tmp_path, "jobs/run", "output_name") == "jobs/run_00004"
    with pytest.raises(PathNameError, match="^output_name: "):
        free_name(tmp_path, "../run", "output_name")


@pytest.mark.parametrize("name, message", [
    ("/srv/elsewhere/x", "absolute path"), ("../x", "'..'"), ("con", "reserved"), ("nul", "reserved"),
    (" ", "empty"), ("a/.hidden", "dot"), ("x.", "dot"), ("x" * 300, "300 bytes"), ("a\\b", "'\\\\'"),
])
def test_job_spec_refuses_bad_output_names(name, message):
    with pytest.raises(SpecError, match=f"^output_name: .*{message}"):
        JobSpec("{}", output_name=name)
    spec = JobSpec("{}", output_name="runs/ünï v2")
    assert JobSpec.from_json(spec.to_json()) == spec


def test_spec_from_json_refuses_bad_output_names():
    text = JobSpec("{}").to_json().replace('"lycoris/trained"', '"../../x"')
    with pytest.raises(SpecError, match="^output_name: "):
        JobSpec.from_json(text)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, float("-nan")])
def test_api_refuses_non_finite_strengths_before_touching_the_model(value):
    # model and adapter are None: the check comes first, so nothing else is looked at
    with pytest.raises(api.StrengthError, match=r"^strength: must be a finite number, got (nan|inf|-inf)$"):
        api.apply(None, None, value)
    with pytest.raises(api.StrengthError, match="^strength: must be a finite number"):
        api.merge(None, None, value)
    with pytest.raises(api.StrengthError, match="^strengths: must be a finite number"):
        api.apply_sweep(None, None, [0.0, value])
    with pytest.raises(api.StrengthError, match="^strength: must be a finite number"):
        api.apply_sweep(None, None, [value])


def test_api_refuses_strengths_that_are_not_numbers():
    for value in ("1", None, True):
        with pytest.raises(api.StrengthError, match="^strength: must be a finite number, got"):
            api.apply(None, None, value)
    with pytest.raises(api.StrengthError, match="^strengths: give at least one"):
        api.apply_sweep(None, None, [])
    assert api.check_strength(0.5) == 0.5 and api.check_strength(-10) == -10.0


@pytest.mark.parametrize("depth", [17, 1000, 100_000])
def test_deep_json_config_is_a_config_error(depth):
    for text in ("[" * depth + "]" * depth, '{"apply_preset": ' + '{"a": ' * depth + "1" + "}" * depth + "}",
                 '{"description": ' + "[" * depth + "]" * depth + "}"):
        for parse in (load_json, parse_config):
            with pytest.raises(ConfigError, match="nested more than 16 levels deep|must be a JSON object"):
                parse(text)
    deep: list = []
    for _ in range(depth):
        deep = [deep]
    with pytest.raises(ConfigError, match="^description: nested more than 16 levels deep"):
        parse_config({"description": deep, "multiplier": 1, "linear_dim": 4, "linear_alpha": 1})
    with pytest.raises(ConfigError, match="nested more than 16"):
        parse_config({"multiplier": 1, "linear_dim": 4, "linear_alpha": 1}, {"apply_preset": {"x": deep}})


def test_a_cyclic_config_is_a_config_error():
    cyclic: dict = {"multiplier": 1, "linear_dim": 4, "linear_alpha": 1}
    cyclic["apply_preset"] = {"module_algo_map": {"A": cyclic}}
    with pytest.raises(ConfigError, match="^apply_preset.module_algo_map.A.*nested more than 16"):
        parse_config(cyclic)


def test_normal_configs_still_parse():
    config = parse_config({"algo": "lokr", "multiplier": 1, "linear_dim": 4, "linear_alpha": 1,
                           "apply_preset": {"target_module": ["Attention"],
                                            "module_algo_map": {"FeedForward": {"factor": 2}}}})
    assert config.preset.module_algo_map == {"FeedForward": {"factor": 2}}


def test_deep_config_metadata_in_an_adapter_file_is_a_warning(tmp_path):
    path = tmp_path / "deep.safetensors"
    save_file({"lycoris_a.alpha": torch.tensor(1.0)}, str(path),
              {"lycoris_config": "[" * 100_000 + "]" * 100_000})
    adapter = read_adapter(path)
    assert adapter.config is None and "nested too deeply" in adapter.warnings[0]
    path = tmp_path / "deep2.safetensors"
    save_file({"lycoris_a.alpha": torch.tensor(1.0)}, str(path),
              {"lycoris_config": json.dumps({"algo": "lokr", "description": [[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]})})
    adapter = read_adapter(path)
    assert adapter.config is None and "nested more than 16" in adapter.warnings[0]
