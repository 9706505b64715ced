"""Export LyCORIS Job: a self-contained job folder for headless and multi-GPU (torchrun) training."""

from __future__ import annotations

import shlex
import shutil
import uuid
from pathlib import Path

import folder_paths
import torch
from comfy_api.latest import io, ui

from ..core import host
from ..core.adapter_set import architecture_key
from ..core.paths import PathNameError
from ..core.tiny import TinySizes
from ..trainer.job_folders import reserve_folder
from ..trainer.jobfile import JobFileError, ModelRef, write_job
from .train_nodes import TrainLycoris, check_submission, init_lora_path, job_spec, output_name_problem
from .types import TRAIN_CATEGORY, LycorisValidation

TINY = "tiny (rebuilt from its recipe)"
_FILE_KINDS = {"diffusion_models": "diffusion_model", "checkpoints": "checkpoint"}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_TINY_MAX_PARAMS = 50_000_000  # a "tiny" model bigger than this is a real model picked by mistake


def _base_models() -> list[str]:
    files = [f"{folder}/{name}" for folder in _FILE_KINDS for name in folder_paths.get_filename_list(folder)]
    return [TINY, *files]


def _training_inputs() -> list:
    """Train LyCORIS's inputs (model, dataset, config and every training setting) except `resume`."""
    return [inp for inp in TrainLycoris.define_schema().inputs if inp.id not in ("resume", "validation")]


def _tiny_ref(model, seed: int) -> ModelRef:
    """The tiny recipe that rebuilds `model` bit for bit, or a ValueError saying why there is none."""
    diffusion = model.model.diffusion_model
    if sum(p.numel() for p in diffusion.parameters()) > _TINY_MAX_PARAMS:
        raise ValueError("base_model: this model is too big to be a Tiny Model; pick its file instead")
    cfg, family = host.model_unet_config(model), host.model_family(model)
    if family == "sdxl":
        sizes = TinySizes(family, cfg["model_channels"], 1, cfg["transformer_depth_middle"], 1, cfg["context_dim"], seed)
    else:
        sizes = TinySizes(family, cfg["hidden_size"], cfg["num_heads"], cfg["depth"], cfg["depth_single_blocks"],
                          cfg["context_in_dim"], seed)
    dtype = next(diffusion.parameters()).dtype
    rebuilt = dict(host.build_tiny_model(sizes, dtype).model.diffusion_model.named_parameters())
    same = set(rebuilt) == {name for name, _ in diffusion.named_parameters()} and all(
        torch.equal(host.comfy_weight(model, key), value.to("cpu", torch.float32)) for key, value in rebuilt.items())
    if not same:
        raise ValueError(f"base_model: the model is not a Tiny Model with seed {seed} ({sizes}); set tiny_seed to "
                         "the Tiny Model node's seed, or pick the model's file")
    return ModelRef("tiny", sizes, _DTYPE_NAMES.get(dtype, "float32"),
                    architecture=architecture_key(host.model_unet_config(model)))


def _file_ref(model, base_model: str) -> ModelRef:
    folder, _, name = base_model.partition("/")
    if folder not in _FILE_KINDS or not name:
        raise ValueError(f"base_model: '{base_model}' is not '{TINY}' or a file of {', '.join(_FILE_KINDS)}")
    path = folder_paths.get_full_path_or_raise(folder, name)
    # Load Diffusion Model's weight_dtype (fp8...) as read from the loaded model: the headless run loads it so too
    weight_dtype = host.model_weight_dtype(model) if folder == "diffusion_models" else "default"
    return ModelRef(_FILE_KINDS[folder], file=name, path=str(Path(path).resolve()),
                    architecture=architecture_key(host.model_unet_config(model)), weight_dtype=weight_dtype)


def _job_folder(name: str) -> Path:
    """A fresh folder output/lycoris_jobs/<name>, or <name>_00001, ... (created now, so no Train job or other
    export shares it; the same counter as Train's job folders); never outside output/lycoris_jobs."""
    root = Path(folder_paths.get_output_directory()) / "lycoris_jobs"
    try:
        return reserve_folder(root, name)
    except (PathNameError, OSError) as err:
        raise ValueError(f"Export LyCORIS Job: {err}") from None


class ExportLycorisJob(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LycorisExportJob",
            display_name="Export LyCORIS Job",
            category=TRAIN_CATEGORY,
            description=(
                "Writes a self-contained training job folder to output/lycoris_jobs/<output_name>: job.json (the "
                "same settings as Train LyCORIS and a reference to the base model: its file and the weight_dtype Load "
                "Diffusion Model loaded it with), the cached dataset (latents and "
                "conditioning as safetensors). Train it without a server: `python -m trainer run <folder>`, or on "
                "several GPUs: `torchrun --nproc_per_node=8 -m trainer run <folder>` (from the pack's folder)."
            ),
            inputs=[
                *_training_inputs(),
                io.Combo.Input("base_model", options=_base_models(), default=TINY,
                               tooltip="The file the connected model was loaded from (models/diffusion_models or "
                                       "models/checkpoints), or the tiny recipe for a Tiny Model (LyCORIS dev). "
                                       "A diffusion model's weight_dtype (e.g. fp8_e4m3fn) is read from the "
                                       "connected model and used by the headless run."),
                io.Int.Input("tiny_seed", default=0, min=0, max=2**31 - 1,
                             tooltip="With the tiny recipe: the Tiny Model node's seed (checked against the model)."),
                LycorisValidation.Input("validation", optional=True,
                                        tooltip="From LyCORIS Validation: rank 0 renders previews into the job "
                                                "folder (latent preview projection: the VAE is not exported)."),
            ],
            outputs=[io.String.Output("job_folder", display_name="job folder",
                                      tooltip="Path of the written job folder.")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, output_name) -> bool | str:
        return output_name_problem(output_name)

    @classmethod
    def fingerprint_inputs(cls, **inputs):
        """Never cached: queueing it again writes a new job folder (the old one may have been moved)."""
        return uuid.uuid4().hex

    @classmethod
    def execute(cls, model, dataset, config, base_model, tiny_seed, validation=None, **training) -> io.NodeOutput:
        spec = job_spec("Export LyCORIS Job", config, **training)
        output_name = spec.output_name
        warnings = check_submission("Export LyCORIS Job", config, model, dataset, spec)
        if validation is not None and validation.vae is not None:
            warnings.append("validation: the VAE is not part of a job folder; headless previews use the latent "
                            "preview projection")
        folder = _job_folder(output_name)  # refuses a folder that leads outside before any work
        try:
            reference = _tiny_ref(model, tiny_seed) if base_model == TINY else _file_ref(model, base_model)
            if spec.init_lora:  # the job folder carries its init file (<job>/loras/<init_lora>); job.json comes last
                copy = folder / "loras" / spec.init_lora
                copy.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(init_lora_path(spec.init_lora), copy)
            write_job(folder, spec, dataset, reference, name=output_name, validation=validation)
        except BaseException as err:
            shutil.rmtree(folder, ignore_errors=True)  # the folder was made for this export only
            if isinstance(err, JobFileError):
                raise ValueError(f"Export LyCORIS Job: {err}") from None
            raise
        quoted = shlex.quote(str(folder))
        text = (f"job written to {folder}\nfrom the pack's folder run:\n  python -m trainer run {quoted}\n"
                f"  torchrun --nproc_per_node=8 -m trainer run {quoted}") + "".join(f"\nwarning: {w}" for w in warnings)
        return io.NodeOutput(str(folder), ui=ui.PreviewText(text))


NODES = [ExportLycorisJob]
