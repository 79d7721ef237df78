"""GGUF weights kept quantized (`quantization="gguf"`: the default for a GGUF file on the CPU, asked for on a GPU).

llama.cpp's 4-bit types are, once unpacked, 4-bit integers q in 0..15 with one scale and one offset per 32
weights, which is exactly the operand of PyTorch's packed CPU kernel `_weight_int4pack_mm_for_cpu`
(w = (q - 8) * scale + zero, 32-wide groups along the input dimension):

    Q4_0  [d | 16 bytes of nibbles]                          w = (q - 8) * d        scale d,      zero 0
    Q4_1  [d | m | 16 bytes]                                 w = q * d + m          scale d,      zero m + 8 d
    Q4_K  256 weights: [d | dmin | 12 bytes of 6-bit (sc, m) for 8 sub-blocks | 128 bytes]
                                                             w = q * d sc - dmin m  scale d sc,   zero 8 d sc - dmin m

So a linear layer's weights load as the file's blocks (GGUFBlocks), stay 4-bit in memory (a quarter of
bfloat16's bytes), and multiply without ever being dequantized, through the device's 4-bit kernel (int4.py; the
same layout runs our Triton GEMM on a GPU). On the CPU the LM head runs in int8 with its top logits recomputed
exactly (Int8HeadMethod). A layer whose tensors include another type (Q5_K, Q6_K, Q8_0, F16) is dequantized to
the model's dtype at load and runs as a plain layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.layers.quantization import int4
from tokenmill.layers.quantization.base import LinearMethod, QuantizationConfig, WeightLoader
from tokenmill.layers.quantization.int4_cpu import ACTIVATION_DTYPE
from tokenmill.source.gguf_file import GGML_TYPES, block_size, dequantize

GROUP_SIZE = 32  # weights per scale and zero of GGUF's 4-bit types (Q4_K's sub-blocks)
INT4_TYPES = {GGML_TYPES["Q4_0"], GGML_TYPES["Q4_1"], GGML_TYPES["Q4_K"]}  # kept 4-bit


@dataclass
class GGUFBlocks:
    """A tensor as the file stores it: `data` [rows, bytes per row] of `ggml_type` blocks, `cols` weights a row;
    `int4`, once `unpack()` ran (the loader does it in its decoding threads): unpack_int4's three tensors."""

    ggml_type: int
    data: torch.Tensor
    cols: int
    int4: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.data.shape[0], self.cols

    def unpack(self) -> GGUFBlocks:
        if self.int4 is None and self.ggml_type in INT4_TYPES:
            self.int4 = unpack_int4(self)
        return self

    def narrow(self, row_start: int, rows: int, col_start: int, cols: int) -> GGUFBlocks:
        """Rows row_start.. and columns col_start.. (whole blocks: col_start and cols multiples of the block)."""
        block, nbytes = block_size(self.ggml_type)
        if col_start % block or cols % block:
            raise ValueError(f"a tensor-parallel shard of columns {col_start}..{col_start + cols} does not fall on "
                             f"the {block}-weight blocks of its GGUF type")
        data = self.data.narrow(0, row_start, rows).narrow(1, col_start // block * nbytes, cols // block * nbytes)
        int4 = None
        if self.int4 is not None:
            q, scale, zero = (t.narrow(0, row_start, rows) for t in self.int4)
            groups = (col_start // GROUP_SIZE, cols // GROUP_SIZE)
            int4 = (q.narrow(1, col_start, cols), scale.narrow(1, *groups), zero.narrow(1, *groups))
        return GGUFBlocks(self.ggml_type, data, cols, int4)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        raw = self.data.contiguous().numpy().reshape(-1)
        return torch.from_numpy(dequantize(raw, self.ggml_type, self.shape, "weight")).to(dtype)


def _halves(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 at byte `start` of each block, as float32 [num_blocks, 1]."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """[..., n] bytes -> [..., 2n] values: the low nibbles, then the high ones."""
    return torch.cat([packed & 0x0F, packed >> 4], dim=-1)


def unpack_int4(blocks: GGUFBlocks) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 4-bit GGUF tensor [N, K] -> (q uint8 [N, K] in 0..15, scale and zero float32 [N, K / 32]) with
    w = (q - 8) * scale + zero, group by group of 32 along K."""
    nbytes = block_size(blocks.ggml_type)[1]
    rows, cols = blocks.shape
    raw = blocks.data.contiguous().view(-1, nbytes)
    if blocks.ggml_type == GGML_TYPES["Q4_K"]:
        d, dmin = _halves(raw, 0), _halves(raw, 2)
        s = raw[:, 4:16].int()
        sc = torch.cat([s[:, 0:4] & 63, (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)], dim=1)
        mn = torch.cat([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], dim=1)
        q = _nibbles(raw[:, 16:].reshape(-1, 4, 32))  # chunk c of 64 weights: low nibbles, then high
        scale, zero = d * sc, -(dmin * mn)
    else:
        d = _halves(raw, 0)
        q4_1 = blocks.ggml_type == GGML_TYPES["Q4_1"]
        q = _nibbles(raw[:, 4 if q4_1 else 2:])
        scale, zero = d, (_halves(raw, 2) if q4_1 else -8 * d)
    zero = zero + 8 * scale
    groups = cols // GROUP_SIZE
    return q.reshape(rows, cols), scale.reshape(rows, groups), zero.reshape(rows, groups)


class GGUFLinearMethod(LinearMethod):
    """One layer's GGUF weights: its shards (q, k and v, or gate and up, each this rank's rows and columns) are
    gathered as they load, then packed for the int4 kernel, or dequantized if any is of another type."""

    def __init__(self) -> None:
        self.kernel: int4.Kernel | None = None  # with layer.int4_weight; None: layer.weight, dequantized

    def create_weights(self, layer: nn.Module, input_size_per_partition: int, output_size_per_partition: int,
                       params_dtype: torch.dtype, weight_loader: WeightLoader) -> None:
        self.params_dtype = params_dtype
        self.shape = (output_size_per_partition, input_size_per_partition)
        self.parts: list[tuple[int, GGUFBlocks | torch.Tensor]] = []  # (first row in the layer, rows)

        def load(param: nn.Parameter, loaded: GGUFBlocks | torch.Tensor, shard_id: Any = None) -> None:
            offset, size, start = layer.output_shard(shard_id)
            col_start, cols = layer.input_shard()
            if loaded.shape[1] != layer.input_size or start + size > loaded.shape[0]:
                raise ValueError(f"shape mismatch loading {layer.prefix} (shard {shard_id!r}): checkpoint "
                                 f"{tuple(loaded.shape)}, layer input {layer.input_size}")
            if isinstance(loaded, GGUFBlocks):
                part = loaded.narrow(start, size, col_start, cols)
            else:
                part = loaded.narrow(0, start, size).narrow(1, col_start, cols).to(params_dtype)
            self.parts.append((offset, part))

        # Empty until process_weights_after_loading: the rows arrive as blocks, not as a matrix to copy into.
        layer.weight = nn.Parameter(torch.empty(0, dtype=params_dtype), requires_grad=False)
        layer.weight.weight_loader = load

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        parts = [part for _, part in sorted(self.parts, key=lambda item: item[0])]
        rows = sum(part.shape[0] for part in parts)
        if rows != self.shape[0]:
            raise ValueError(f"{layer.prefix}: the checkpoint filled {rows} of its {self.shape[0]} rows")
        self.parts = []
        device = layer.weight.device  # the blocks were read on the CPU
        if all(isinstance(part, GGUFBlocks) and part.ggml_type in INT4_TYPES for part in parts):
            q, scale, zero = (torch.cat(t).to(device) for t in zip(*(part.unpack().int4 for part in parts)))
            packed = int4.pack(q, scale, zero, GROUP_SIZE, self.params_dtype)
            if packed is not None:
                layer.int4_weight, self.kernel = packed
                return
        dense = [part.dequantize(self.params_dtype) if isinstance(part, GGUFBlocks) else part for part in parts]
        layer.weight = nn.Parameter(torch.cat(dense).to(device), requires_grad=False)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.kernel is not None:
            return self.kernel(x, layer.int4_weight, bias)
        return F.linear(x, layer.weight, bias)


class Int8HeadMethod(LinearMethod):
    """The LM head (most often the tied embedding, the largest matrix of a small model): every logit from int8
    weights with one scale per row through `_weight_int8pack_mm` (5x faster than float32 at batch 1), then the
    `EXACT_TOP` largest recomputed in the model's dtype from the float weight, which the embedding keeps for its
    lookups. The kernel's bfloat16 logits alone cost a quarter of the greedy tokens against float32; with the
    top ones exact, greedy choices equal a float head's, and only tokens far down the distribution keep the
    approximation (an error of about 0.05 on their logits)."""

    EXACT_TOP = 64

    def __init__(self) -> None:
        self.int8 = False  # on the CPU; elsewhere the head multiplies in the model's dtype

    def create_weights(self, layer: nn.Module, input_size_per_partition: int, output_size_per_partition: int,
                       params_dtype: torch.dtype, weight_loader: WeightLoader) -> None:
        """The head's weight is the embedding's parameter (layers/vocab_embedding.py)."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if layer.weight.device.type != "cpu":
            return
        self.int8 = True
        weight = layer.weight.data.float()
        scale = weight.abs().amax(dim=1).clamp_min(1e-12) / 127
        layer.int8_weight = (weight / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
        layer.int8_scale = scale.to(ACTIVATION_DTYPE)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if not self.int8:
            return F.linear(x, layer.weight)
        x2 = x.reshape(-1, x.shape[-1])
        logits = torch._weight_int8pack_mm(x2.to(ACTIVATION_DTYPE).contiguous(), layer.int8_weight,
                                           layer.int8_scale).to(x.dtype)
        top = logits.topk(min(self.EXACT_TOP, logits.shape[-1]), dim=-1).indices
        logits.scatter_(1, top, torch.einsum("mh,mkh->mk", x2, layer.weight[top]))
        return logits.reshape(*x.shape[:-1], logits.shape[-1])


class GGUFQuantConfig(QuantizationConfig):
    """The weights of a GGUF file as the file quantizes them (no `quantization_config`: the tensor types say)."""

    name = "gguf"

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> GGUFQuantConfig:
        return cls()

    def get_linear_method(self, layer: nn.Module, prefix: str) -> LinearMethod:
        return GGUFLinearMethod()

    def get_lm_head_method(self) -> LinearMethod | None:
        return Int8HeadMethod()
