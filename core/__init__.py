"""ComfyUI-free core of the LyCORIS node pack.

Everything here imports only torch, safetensors, lycoris and diffusers, except `host.py`, the one
boundary module that talks to ComfyUI. Nodes and the trainer call into this package.
"""
