"""Benchmarks of the pack's adapter runtime against ComfyUI core (`make bench`; see bench/README.md).

Everything runs in one process on the CPU, on tiny seeded Flux 2-layout models: each row's
baseline is measured in the same run as the pack's figure, so ratios hold across machines even
when absolute seconds do not.
"""
