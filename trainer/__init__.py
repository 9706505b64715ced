"""The trainer: objectives, trainable adapters, one training step, checkpoints (ComfyUI-free core).

The job layer (queue, runner thread, events) sits on top of these small modules; nothing here
imports ComfyUI, so every piece is unit-testable on its own.
"""
