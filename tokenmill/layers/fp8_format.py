"""The e4m3 format every FP8 path shares (weights, activations, the KV cache), without importing Triton: the
CPU path reads these too."""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
# The smallest scale: a row of zeros quantizes to zeros instead of dividing by zero.
MIN_SCALE = 1e-12
