"""`make demo`: the main job end to end on the embedded tiny model, through the shipped workflows.

Starts ComfyUI headless with this pack, converts the example workflows to API prompts with the
pack's converter and runs them as the frontend would queue them:

  01  train a Flux 2 LoKr (preset flux2_lokr) on an in-graph training latent; the job's progress
      (step, loss, speed) is printed while it trains, from GET /lycoris/jobs/{id}
  02  load the trained file, A/B strengths 0 / 0.5 / 1 in one sampler run, labelled grid
  03  merge it into the model exactly and save the merged model and the adapter
  04  train a T-LoRA and plot its timestep mask over the sampler's schedule

and writes to demo-output/: the adapter (.safetensors, lycoris_config in the metadata),
loss.png, tlora_mask.png, ab_grid.png, training_data.png and summary.json:
{"steps", "loss_first", "loss_last", "distance_to_data": {"<strength>": value}, "seconds", ...}.
loss_first / loss_last are the mean loss of the first / last tenth of the steps (one step's loss
depends on its random noise level). distance_to_data[s] is the mean squared distance between
the latent sampled at strength s and the nearest training latent (same seed for every strength).
Exits 1 when the loss did not fall or strength 1 is not closer to the data than strength 0.
"""

from __future__ import annotations

import json
import shutil
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workflow_api import ui_to_api  # noqa: E402

from comfyenv import REPO, install_import_paths  # noqa: E402
from comfyserver import ComfyServer, PromptError  # noqa: E402

OUT = REPO / "demo-output"
BASE = REPO / ".cache" / "demo-base"
WORKFLOWS = REPO / "example_workflows"
TAG = "lycoris-demo"  # the workflows write under output/<TAG>/ and models/loras/<TAG>/


def say(text: str) -> None:
    print(f"demo: {text}", flush=True)


def find(prompt: dict, class_type: str, title: str | None = None) -> str:
    for node_id, entry in prompt.items():
        if entry["class_type"] == class_type and (title is None or title in entry["_meta"]["title"].lower()):
            return node_id
    raise KeyError(f"no {class_type} {title or ''} in the workflow")


def output_file(server: ComfyServer, outputs: dict, node_id: str, kind: str = "images") -> Path:
    item = outputs[node_id][kind][0]
    return server.base / item.get("type", "output") / item["subfolder"] / item["filename"]


def fresh_base() -> None:
    """Same names every run: drop what the previous demo wrote (the set-up itself is kept)."""
    for path in (BASE / "output" / TAG, BASE / "output" / "lycoris_jobs", BASE / "models" / "loras" / TAG):
        shutil.rmtree(path, ignore_errors=True)


def run_with_progress(server: ComfyServer, prompt: dict, train_id: str) -> dict:
    """Queue `prompt` (its LyCORIS Job waits for the training) and print the job's progress meanwhile."""
    name = prompt[train_id]["inputs"]["output_name"]
    submitted = time.time()
    prompt_id = server.submit(prompt)
    result: dict = {}

    def wait() -> None:
        try:
            result["outputs"] = server.wait(prompt_id, timeout=1200)
        except Exception as err:  # reported by the main thread
            result["error"] = err

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    job_id, last_step, last_print = None, -1, 0.0
    while waiter.is_alive():
        if job_id is None:
            jobs = [j for j in server.get("/lycoris/jobs")["jobs"] if j["name"] == name and j["created"] >= submitted - 1]
            job_id = jobs[-1]["id"] if jobs else None
        if job_id is not None:
            job = server.get(f"/lycoris/jobs/{job_id}")
            if job["step"] != last_step and (time.monotonic() - last_print > 2 or job["step"] == job["steps"]):
                loss = f"{job['loss']:.4f}" if job["loss"] is not None else "-"
                eta = f"{job['eta_s']:.0f}s" if job["eta_s"] is not None else "-"
                say(f"  train {job['state']}: step {job['step']}/{job['steps']}  loss {loss}  "
                    f"{job['its']:.1f} it/s  ETA {eta}")
                last_step, last_print = job["step"], time.monotonic()
        waiter.join(timeout=0.5)
    if "error" in result:
        raise result["error"]
    return result["outputs"]


def window_mean(values: list[float], first: bool) -> float:
    size = max(1, len(values) // 10)
    part = values[:size] if first else values[-size:]
    return sum(part) / len(part)


def distances(samples, data, strengths: list[float]) -> dict[str, float]:
    """Mean squared distance of each sampled latent (sample-major A/B batch) to its nearest training latent."""
    out = {}
    for i, strength in enumerate(strengths):
        nearest = min(float(((samples[i] - item) ** 2).mean()) for item in data)
        out[f"{strength:.1f}"] = round(nearest, 6)
    return out


def validation_summary(server: ComfyServer, job: dict, data) -> tuple[list[dict], object]:
    """Per preview: its mean squared distance to the nearest training latent's preview (same projection,
    pixel values 0..1), and the strip of all previews (a row per strength, a column per step)."""
    import numpy as np
    import torch
    from PIL import Image

    from comfyui_lycoris.core.latent_preview import preview_image

    targets = preview_image(data.float(), scale=8, normalize="fixed")
    rows, images = [], {}
    for entry in job["validation"]:
        path = server.base / entry["type"] / entry["subfolder"] / entry["filename"]
        image = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).float() / 255
        images[(entry["step"], entry["strength"])] = image
        nearest = min(float(((image - t) ** 2).mean()) for t in targets)
        rows.append({"step": entry["step"], "strength": entry["strength"], "distance_to_data": round(nearest, 6)})
    steps = sorted({k[0] for k in images})
    strengths = sorted({k[1] for k in images})
    strip = torch.cat([torch.cat([images[(s, k)] for s in steps], dim=1) for k in strengths], dim=0)
    return rows, Image.fromarray((strip * 255).round().to(torch.uint8).numpy())


def main() -> int:
    install_import_paths()
    from safetensors.torch import load_file

    start = time.monotonic()
    fresh_base()
    server = ComfyServer(BASE)
    say(f"starting ComfyUI headless at {server.url} (log: {server.log_path})")
    server.start()
    try:
        info = server.get("/object_info")
        prompts = {p.stem: ui_to_api(json.loads(p.read_text()), info) for p in sorted(WORKFLOWS.glob("0[1-4]_*.json"))}
        train_wf, ab_wf, merge_wf, tlora_wf = (prompts[k] for k in sorted(prompts))

        train_id = find(train_wf, "LycorisTrain")
        spec = train_wf[train_id]["inputs"]
        say(f"01 training a Flux 2 LoKr (preset flux2_lokr) on the tiny model: {spec['steps']} steps, "
            f"lr {spec['learning_rate']:g}")
        t = time.monotonic()
        train_out = run_with_progress(server, train_wf, train_id)
        job = server.get(f"/lycoris/jobs/{train_out[train_id]['job_id'][0]}")
        say(f"01 done in {time.monotonic() - t:.0f}s: {job['message']}")

        say("02 applying it and rendering strengths 0 / 0.5 / 1 in one A/B batch")
        ab_out = server.run(ab_wf)
        say("03 merging it exactly into the model, saving the merged model and the adapter")
        merge_out = server.run(merge_wf)
        say("04 training a T-LoRA and plotting its timestep mask")
        tlora_out = server.run(tlora_wf, timeout=900)
    except PromptError as err:
        say(f"a workflow failed: {err}\n{server.log_tail()}")
        return 1
    finally:
        server.stop()

    OUT.mkdir(exist_ok=True)
    adapter_src = BASE / "models" / "loras" / f"{spec['output_name']}.safetensors"
    copies = {
        Path(spec["output_name"]).name + ".safetensors": adapter_src,
        "loss.png": output_file(server, train_out, find(train_wf, "SaveImage", "loss")),
        "training_data.png": output_file(server, train_out, find(train_wf, "SaveImage", "training")),
        "ab_grid.png": output_file(server, ab_out, find(ab_wf, "SaveImage", "grid")),
        "tlora_mask.png": output_file(server, tlora_out, find(tlora_wf, "SaveImage", "mask")),
    }
    for name, src in copies.items():
        shutil.copyfile(src, OUT / name)

    losses = [loss for _, loss in job["losses"] if loss is not None]
    ab_node = ab_wf[find(ab_wf, "LycorisAB")]["inputs"]["strengths"]
    strengths = [float(s) for s in ab_node.split(",")]
    data = load_file(str(output_file(server, train_out, find(train_wf, "SaveLatent", "training"), "latents")))
    samples = load_file(str(output_file(server, ab_out, find(ab_wf, "SaveLatent", "a/b"), "latents")))
    merged = load_file(str(output_file(server, merge_out, find(merge_wf, "SaveLatent", "merged"), "latents")))
    sampled = samples["latent_tensor"]
    merge_gap = float((merged["latent_tensor"][0] - sampled[strengths.index(1.0)]).abs().max())
    summary = {
        "steps": job["step"],
        "loss_first": round(window_mean(losses, True), 6),
        "loss_last": round(window_mean(losses, False), 6),
        "distance_to_data": distances(sampled, data["latent_tensor"], strengths),
        "seconds": round(time.monotonic() - start, 1),
        "loss_window": max(1, len(losses) // 10),
        "merge_vs_apply_max_abs_diff": merge_gap,
        "adapter": str(OUT / next(iter(copies))),
    }
    if job.get("validation"):
        summary["validation"], strip = validation_summary(server, job, data["latent_tensor"])
        strip.save(OUT / "validation.png")
        copies["validation.png"] = OUT / "validation.png"
    (OUT / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    d = summary["distance_to_data"]
    learned = d["1.0"] < d["0.0"]
    fell = summary["loss_last"] < summary["loss_first"]
    print()
    print("LyCORIS demo: tiny Flux 2, preset flux2_lokr")
    print(f"  trained      {summary['steps']} steps, loss {summary['loss_first']:.4f} -> {summary['loss_last']:.4f} "
          f"(mean of the first / last {summary['loss_window']} steps){'' if fell else '  NOT FALLING'}")
    print("  distance to the training latent, by strength (mean squared, lower = closer):")
    for key, value in d.items():
        print(f"    strength {key}: {value:.4f}")
    print(f"  the adapter {'moves samples toward the data' if learned else 'did NOT move samples toward the data'}"
          f" ({d['1.0'] / d['0.0']:.0%} of the base distance at strength 1)")
    print(f"  merge vs apply at strength 1: max |difference| {merge_gap:.2e}")
    at_one = [v for v in summary.get("validation", []) if v["strength"] == 1.0]
    if at_one:
        print("  validation previews at strength 1, distance to the training latent's preview by step:")
        print("    " + "  ".join(f"{v['step']}: {v['distance_to_data']:.4f}" for v in at_one))
    print(f"  total {summary['seconds']:.0f}s; wrote:")
    for name in [*copies, "summary.json"]:
        print(f"    {OUT / name}")
    approached = not at_one or at_one[-1]["distance_to_data"] < at_one[0]["distance_to_data"]
    if not approached:
        print("  the last validation preview is NOT closer to the data than the first")
    return 0 if learned and fell and approached else 1


if __name__ == "__main__":
    raise SystemExit(main())
