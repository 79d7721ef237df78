"""GGUF weights kept quantized (`quantization="gguf"`: the default for a GGUF file on the CPU, asked for on a GPU).

Every llama.cpp type kept here is, once unpacked, integer codes q with one scale and one zero per block of 32
(16 for Q6_K) weights along the input, w = q * scale + zero (d, m, dmin fp16; sc, mn the K-quants' 6-bit
sub-block scales and mins, Q6_K's int8 ones):

    type  block                                                   q                 scale   zero
    Q4_0  [d | 16 bytes of nibbles]                               nibble - 8        d       0
    Q4_1  [d | m | 16 bytes]                                      nibble - 8        d       m + 8 d
    Q4_K  256: [d | dmin | 12 bytes of (sc, mn) x 8 | 128 bytes]  nibble - 8        d sc    8 d sc - dmin mn
    Q5_0  [d | 4 bytes of fifth bits | 16 bytes]                  5 bits - 16       d       0
    Q5_1  [d | m | 4 bytes | 16 bytes]                            5 bits            d       m
    Q5_K  256: [d | dmin | 12 bytes | 32 bytes of fifth bits | 128 bytes]
                                                                  5 bits            d sc    -dmin mn
    Q6_K  256: [128 bytes of low nibbles | 64 bytes of 2-bit highs | 16 x int8 sc | d]
                                                                  6 bits - 32       d sc    0
    Q8_0  [d | 32 x int8]                                         the int8          d       0

So a linear layer's weights load as the file's blocks (GGUFBlocks), are unpacked to codes (int8), scales and
zeros in the loader's threads, and multiply without ever being dequantized into memory. A layer all of whose
tensors are 4-bit types packs into the device's 4-bit kernel (int4.py: PyTorch's packed CPU kernel, our Triton
GEMM on a GPU), a quarter of bfloat16's bytes; a layer with any 5-, 6- or 8-bit tensor keeps int8 codes with
per-block scales (block_int8.py; a layer mixing Q6_K's 16-weight blocks with 32-weight ones repeats the latter's
scales), half of bfloat16's bytes. On the CPU the LM head runs in int8 with its top logits recomputed exactly
(Int8HeadMethod). A layer with a float tensor (F16, BF16, F32) or another type is dequantized to the model's
dtype at load and runs as a plain layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.layers.quantization import block_int8, int4
from tokenmill.layers.quantization.base import LinearMethod, QuantizationConfig, WeightLoader
from tokenmill.layers.quantization.int4_cpu import ACTIVATION_DTYPE
from tokenmill.source.gguf_file import GGML_TYPES, block_size, dequantize, ggml_type_name

INT4_TYPES = {GGML_TYPES[name] for name in ("Q4_0", "Q4_1", "Q4_K")}  # kept 4-bit
# type -> weights per scale and zero: the types kept quantized
CODE_GROUPS = {**{ggml_type: 32 for ggml_type in INT4_TYPES},
               **{GGML_TYPES[name]: 32 for name in ("Q5_0", "Q5_1", "Q5_K", "Q8_0")}, GGML_TYPES["Q6_K"]: 16}
INT4_GROUP = 32

Codes = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # q int8 [N, K], scale and zero float32 [N, K / group]


@dataclass
class GGUFBlocks:
    """A tensor as the file stores it: `data` [rows, bytes per row] of `ggml_type` blocks, `cols` weights a row;
    `codes`, once `unpack()` ran (the loader does it in its decoding threads): unpack_codes' three tensors."""

    ggml_type: int
    data: torch.Tensor
    cols: int
    codes: Codes | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.data.shape[0], self.cols

    @property
    def group(self) -> int:
        return CODE_GROUPS[self.ggml_type]

    def unpack(self) -> GGUFBlocks:
        if self.codes is None and self.ggml_type in CODE_GROUPS:
            self.codes = unpack_codes(self)
        return self

    def narrow(self, row_start: int, rows: int, col_start: int, cols: int) -> GGUFBlocks:
        """Rows row_start.. and columns col_start.. (whole blocks: col_start and cols multiples of the block)."""
        block, nbytes = block_size(self.ggml_type)
        if col_start % block or cols % block:
            raise ValueError(f"a tensor-parallel shard of columns {col_start}..{col_start + cols} does not fall on "
                             f"the {block}-weight blocks of its GGUF type")
        data = self.data.narrow(0, row_start, rows).narrow(1, col_start // block * nbytes, cols // block * nbytes)
        codes = None
        if self.codes is not None:
            q, scale, zero = (t.narrow(0, row_start, rows) for t in self.codes)
            groups = (col_start // self.group, cols // self.group)
            codes = (q.narrow(1, col_start, cols), scale.narrow(1, *groups), zero.narrow(1, *groups))
        return GGUFBlocks(self.ggml_type, data, cols, codes)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        raw = self.data.contiguous().numpy().reshape(-1)
        return torch.from_numpy(dequantize(raw, self.ggml_type, self.shape, "weight")).to(dtype)


def _halves(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 at byte `start` of each block, as float32 [num_blocks, 1]."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """[..., n] bytes -> [..., 2n] values: the low nibbles, then the high ones."""
    return torch.cat([packed & 0x0F, packed >> 4], dim=-1)


def _bits(packed: torch.Tensor, width: int) -> torch.Tensor:
    """[..., n] bytes -> [..., 8 / width, n]: field j of every byte (bits j * width..), lowest first."""
    shifts = torch.arange(0, 8, width, dtype=torch.uint8).view(-1, 1)
    return (packed.unsqueeze(-2) >> shifts) & ((1 << width) - 1)


def _k_scales(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The K-quants' 12 bytes -> 8 6-bit sub-block scales and 8 mins, [num_blocks, 8] each."""
    s = packed.int()
    sc = torch.cat([s[:, 0:4] & 63, (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)], dim=1)
    mn = torch.cat([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], dim=1)
    return sc, mn


def _unpack_blocks(ggml_type: int, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[num_blocks, bytes] -> q (any integer dtype) [num_blocks, weights], scale and zero [num_blocks, groups]."""
    name = ggml_type_name(ggml_type)
    if name in ("Q4_K", "Q5_K"):
        d, dmin = _halves(raw, 0), _halves(raw, 2)
        sc, mn = _k_scales(raw[:, 4:16])
        q = _nibbles(raw[:, -128:].reshape(-1, 4, 32))  # chunk c of 64 weights: low nibbles, then high
        if name == "Q5_K":  # sub-block j's fifth bits: bit j of the 32 bytes
            return q.int() | (_bits(raw[:, 16:48], 1).reshape(-1, 4, 64).int() << 4), d * sc, -(dmin * mn)
        return q.int() - 8, d * sc, 8 * d * sc - dmin * mn
    if name == "Q6_K":  # each half of 128: 64 bytes of nibbles, 32 of 2-bit fields, fields j for weights 32 j..
        low = _nibbles(raw[:, :128].reshape(-1, 2, 64)).int()
        high = _bits(raw[:, 128:192].reshape(-1, 2, 32), 2).reshape(-1, 2, 128).int()
        scale = _halves(raw, 208) * raw[:, 192:208].view(torch.int8).float()
        return (low | (high << 4)) - 32, scale, torch.zeros_like(scale)
    d = _halves(raw, 0)
    if name == "Q8_0":
        return raw[:, 2:].view(torch.int8), d, torch.zeros_like(d)
    if name in ("Q5_0", "Q5_1"):
        offset = 2 if name == "Q5_0" else 4
        q = _nibbles(raw[:, offset + 4:]).int() | (_bits(raw[:, offset:offset + 4], 1).transpose(1, 2).reshape(
            -1, 32).int() << 4)  # the fifth bits: bit j of the little-endian u32 for weight j
        return (q - 16, d, torch.zeros_like(d)) if name == "Q5_0" else (q, d, _halves(raw, 2))
    q = _nibbles(raw[:, 2 if name == "Q4_0" else 4:]).int() - 8
    return (q, d, torch.zeros_like(d)) if name == "Q4_0" else (q, d, _halves(raw, 2) + 8 * d)


def unpack_codes(blocks: GGUFBlocks) -> Codes:
    """A kept GGUF tensor [N, K] -> (q int8 [N, K], scale and zero float32 [N, K / group]) with
    w = q * scale + zero, block by block of `group` along K (see the table above)."""
    rows, cols = blocks.shape
    raw = blocks.data.contiguous().view(-1, block_size(blocks.ggml_type)[1])
    q, scale, zero = _unpack_blocks(blocks.ggml_type, raw)
    groups = cols // blocks.group
    return q.to(torch.int8).reshape(rows, cols), scale.reshape(rows, groups), zero.reshape(rows, groups)


class GGUFLinearMethod(LinearMethod):
    """One layer's GGUF weights: its shards (q, k and v, or gate and up, each this rank's rows and columns) are
    gathered as they load, then packed for the int4 or the block-int8 kernel, or dequantized if any is of a type
    neither keeps."""

    def __init__(self) -> None:
        self.kernel: int4.Kernel | None = None  # with layer.quantized_weight; None: layer.weight, dequantized

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
        if all(isinstance(part, GGUFBlocks) and part.ggml_type in CODE_GROUPS for part in parts):
            packed = self._pack([part.unpack() for part in parts], device)
            if packed is not None:
                layer.quantized_weight, self.kernel = packed
                return
        dense = [part.dequantize(self.params_dtype) if isinstance(part, GGUFBlocks) else part for part in parts]
        layer.weight = nn.Parameter(torch.cat(dense).to(device), requires_grad=False)

    def _pack(self, parts: list[GGUFBlocks], device: torch.device) -> tuple[Any, int4.Kernel] | None:
        """The 4-bit kernel's layout where every part is 4-bit and the kernel takes it, else block int8's, its
        block the parts' smallest."""
        group = min(part.group for part in parts)
        q, scale, zero = (torch.cat(t).to(device) for t in zip(*(
            (part.codes[0], *(t.repeat_interleave(part.group // group, 1) for t in part.codes[1:]))
            for part in parts)))
        if all(part.ggml_type in INT4_TYPES for part in parts):
            packed = int4.pack((q + 8).to(torch.uint8), scale, zero, INT4_GROUP, self.params_dtype)
            if packed is not None:
                return packed
        return block_int8.pack(q, scale, zero, group, self.params_dtype)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.kernel is not None:
            return self.kernel(x, layer.quantized_weight, bias)
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
