"""Running ComfyUI's model code from the trainer's thread: its interrupt flag and its training switch."""

import threading

import pytest
import torch

from comfyui_lycoris.core import host


def _comfy_linear() -> torch.nn.Module:
    import comfy.ops

    layer = comfy.ops.disable_weight_init.Linear(4, 4)
    layer.weight = torch.nn.Parameter(torch.ones(4, 4))
    layer.bias = None
    return layer


def _on_thread(fn):
    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - handed back to the test
            out["error"] = err

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    return out


def test_a_background_thread_leaves_comfys_interrupt_to_the_prompt():
    """Every ComfyUI op reads and clears the global interrupt flag: inside `ignoring_comfy_interrupt`
    a thread runs ops without taking it, and the foreground still gets its Cancel."""
    import comfy.model_management as mm

    layer, x = _comfy_linear(), torch.ones(1, 4)
    mm.interrupt_current_processing(True)
    try:
        def background():
            with host.ignoring_comfy_interrupt():
                return layer(x)

        out = _on_thread(background)
        assert "error" not in out, out.get("error")
        assert torch.equal(out["value"], torch.full((1, 4), 4.0))
        assert mm.processing_interrupted(), "the flag is still the prompt's"
        # Outside the block (any other thread, or this one afterwards) ComfyUI's check is unchanged.
        outside = _on_thread(lambda: layer(x))
        assert isinstance(outside.get("error"), mm.InterruptProcessingException)
        assert not mm.processing_interrupted(), "ComfyUI's check took the flag, as it always does"
    finally:
        mm.interrupt_current_processing(False)


def test_training_ops_sets_comfys_training_switch_while_any_user_is_inside(monkeypatch):
    """v0.33 runs fused kernels with no backward unless `in_training` is on. Nested and concurrent users
    share it; it returns to its earlier value after the last one (0.3.75 has no switch: unit logic here)."""
    import comfy.model_management as mm

    monkeypatch.setattr(mm, "in_training", False, raising=False)
    inside, leave = threading.Event(), threading.Event()

    def other():
        with host.training_ops():
            inside.set()
            leave.wait(30)

    thread = threading.Thread(target=other)
    with host.training_ops():
        assert mm.in_training is True
        with host.training_ops():
            assert mm.in_training is True
        assert mm.in_training is True, "the inner block left; the outer one is still inside"
        thread.start()
        inside.wait(30)
    assert mm.in_training is True, "the other thread is still training"
    leave.set()
    thread.join(30)
    assert mm.in_training is False


def test_training_ops_restores_the_switch_after_an_error(monkeypatch):
    import comfy.model_management as mm

    monkeypatch.setattr(mm, "in_training", False, raising=False)
    with pytest.raises(RuntimeError), host.training_ops():
        raise RuntimeError("a failing step")
    assert mm.in_training is False
