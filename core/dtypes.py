"""The dtype names users pick (node combos, job specs, job files) and the torch dtypes they mean."""

from __future__ import annotations

import torch

TORCH_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES: tuple[str, ...] = tuple(TORCH_DTYPES)
