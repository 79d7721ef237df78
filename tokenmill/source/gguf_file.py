"""GGUF files (llama.cpp's single-file format): the header, tensor bytes decoded to numpy arrays, and the
HF config and HF tokenizer the file describes. Torch-free: the frontend reads config and tokenizer from
here; `loader/gguf.py` turns the tensors into the model's weights.

Supported architectures: llama (Llama 2/3, SmolLM2, Mistral), qwen2, qwen3. The header is parsed here (the
`gguf` package's reader takes ~8 s on a 49k-token vocabulary, this one well under a second), so config and
weights load without the `gguf` package; it is imported lazily only to dequantize types we do not decode
ourselves and, through transformers, to convert the tokenizer (once: the result is cached on disk).

File layout (little-endian, GGUF v2/v3)::

    "GGUF" | u32 version | u64 num_tensors | u64 num_kv
    num_kv      x (string key, u32 value_type, value)          hyper-parameters, tokenizer, chat template
    num_tensors x (string name, u32 n_dims, u64 dims[n_dims], u32 ggml_type, u64 offset)
    zero padding up to `general.alignment` (default 32)
    tensor data, each at data_start + offset

`dims` are innermost first: dims [in, out] is a row-major [out, in] matrix, i.e. already HF's Linear layout.

Quantized blocks decoded here (value = per element; d, m are fp16)::

    Q8_0  [d | 32 x int8 q]                 q * d
    Q4_0  [d | 16 bytes]                    (q - 8) * d      low nibbles are elements 0..15, high 16..31
    Q4_1  [d | m | 16 bytes]                q * d + m        same nibble order
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import logging
import math
import mmap
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # transformers is imported lazily: it costs seconds
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")
_CONFIG_CLASS_NAMES = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config"}
_HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

# ---------------------------------------------------------------------------------------------------------
# Header parsing
# ---------------------------------------------------------------------------------------------------------

_GGUF_MAGIC = b"GGUF"
_STRING, _ARRAY = 8, 9
_LENGTH = struct.Struct("<Q")
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                   12: "<d"}
_NUMPY_DTYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8",
                 11: "<i8", 12: "<f8"}


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    ggml_type: int
    shape: tuple[int, ...]  # torch order (outermost first), i.e. GGUF dims reversed
    offset: int  # absolute byte offset in the file


class _Cursor:
    """Sequential little-endian reads over a buffer (the mmapped file)."""

    def __init__(self, buffer: mmap.mmap) -> None:
        self.buffer, self.pos = buffer, 0

    def unpack(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.buffer, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.unpack("<Q")
        text = self.buffer[self.pos:self.pos + length].decode("utf-8", errors="replace")
        self.pos += length
        return text

    def strings(self, count: int) -> list[str]:
        """`count` strings in a row (a tokenizer's 49k tokens and merges): one tight loop, not a call each."""
        buffer, pos, unpack_length, items = self.buffer, self.pos, _LENGTH.unpack_from, []
        for _ in range(count):
            (length,) = unpack_length(buffer, pos)
            pos += 8
            items.append(buffer[pos:pos + length].decode("utf-8", errors="replace"))
            pos += length
        self.pos = pos
        return items

    def value(self, value_type: int) -> Any:
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            item_type, count = self.unpack("<I"), self.unpack("<Q")
            if item_type in _NUMPY_DTYPES:
                items = np.frombuffer(self.buffer, dtype=_NUMPY_DTYPES[item_type], count=count, offset=self.pos)
                self.pos += items.nbytes
                return items.tolist()
            if item_type == _STRING:
                return self.strings(count)
            return [self.value(item_type) for _ in range(count)]
        if value_type not in _SCALAR_FORMATS:
            raise ValueError(f"unknown GGUF metadata value type {value_type} at byte {self.pos}")
        return self.unpack(_SCALAR_FORMATS[value_type])


class GGUFFile:
    """Metadata and tensor directory of one GGUF file; tensor bytes are read on demand through a memory map."""

    def __init__(self, path: str) -> None:
        self.path = path
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
            cursor = _Cursor(buffer)
            if buffer[:4] != _GGUF_MAGIC:
                raise ValueError(f"{path} is not a GGUF file (magic {bytes(buffer[:4])!r})")
            cursor.pos = 4
            version = cursor.unpack("<I")
            if version not in (2, 3):
                raise ValueError(f"{path}: GGUF version {version} is not supported (2 and 3 are; big-endian files "
                                 "read as a huge version number)")
            num_tensors, num_kv = cursor.unpack("<Q"), cursor.unpack("<Q")
            self.metadata: dict[str, Any] = {}
            for _ in range(num_kv):
                key = cursor.string()
                self.metadata[key] = cursor.value(cursor.unpack("<I"))
            infos = []
            for _ in range(num_tensors):
                name = cursor.string()
                dims = [cursor.unpack("<Q") for _ in range(cursor.unpack("<I"))]
                infos.append((name, dims, cursor.unpack("<I"), cursor.unpack("<Q")))
            alignment = int(self.metadata.get("general.alignment", 32))
            data_start = -(-cursor.pos // alignment) * alignment
        self.tensors: dict[str, GGUFTensorInfo] = {
            name: GGUFTensorInfo(name, ggml_type, tuple(reversed(dims)), data_start + offset)
            for name, dims, ggml_type, offset in infos
        }
        self._data: np.memmap | None = None

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture"))

    def raw(self, info: GGUFTensorInfo) -> np.ndarray:
        """The tensor's bytes, a read-only uint8 view of the memory-mapped file."""
        if self._data is None:
            self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        num_bytes = _num_bytes(info.ggml_type, info.shape, info.name)
        return self._data[info.offset:info.offset + num_bytes]

    def load(self, info: GGUFTensorInfo) -> np.ndarray:
        """The tensor dequantized to a new float32 array of `info.shape`."""
        return dequantize(self.raw(info), info.ggml_type, info.shape, info.name)


# ---------------------------------------------------------------------------------------------------------
# Dequantization
# ---------------------------------------------------------------------------------------------------------

GGML_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q4_K": 12, "Q5_K": 13,
              "Q6_K": 14, "BF16": 30}
_GGML_TYPE_NAMES = {type_id: name for name, type_id in GGML_TYPES.items()}
# type id -> (elements per block, bytes per block)
_BLOCK_SIZES = {0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 12: (256, 144),
                13: (256, 176), 14: (256, 210), 30: (1, 2)}


def _blocks(raw: np.ndarray, type_size: int, num_scales: int) -> tuple[np.ndarray, np.ndarray]:
    """Bytes -> (the fp16 scales as float32 [num_blocks, num_scales], the quant bytes [num_blocks, rest])."""
    blocks = raw.reshape(-1, type_size)
    scales = np.ascontiguousarray(blocks[:, :2 * num_scales]).view(np.float16).astype(np.float32)
    return scales, blocks[:, 2 * num_scales:]


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """[num_blocks, 16] bytes -> [num_blocks, 32] values 0..15 as float32: low nibbles first, then high ones."""
    values = np.empty((packed.shape[0], 2 * packed.shape[1]), dtype=np.uint8)
    np.bitwise_and(packed, 0x0F, out=values[:, :packed.shape[1]])
    np.right_shift(packed, 4, out=values[:, packed.shape[1]:])
    return values.astype(np.float32)


def _dequantize_q8_0(raw: np.ndarray) -> np.ndarray:
    scales, qs = _blocks(raw, 34, 1)
    values = np.ascontiguousarray(qs).view(np.int8).astype(np.float32)
    values *= scales
    return values


def _dequantize_q4_0(raw: np.ndarray) -> np.ndarray:
    scales, qs = _blocks(raw, 18, 1)
    values = _nibbles(qs)
    values -= 8
    values *= scales
    return values


def _dequantize_q4_1(raw: np.ndarray) -> np.ndarray:
    scales, qs = _blocks(raw, 20, 2)
    values = _nibbles(qs)
    values *= scales[:, :1]  # d
    values += scales[:, 1:]  # m
    return values


# Vectorized numpy, which on CPU beats the same ops in torch here by 3-10x (small uint8 ops).
_DEQUANTIZERS: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    0: lambda raw: raw.view(np.float32).copy(),
    1: lambda raw: raw.view(np.float16).astype(np.float32),
    30: lambda raw: (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32),
    2: _dequantize_q4_0,
    3: _dequantize_q4_1,
    8: _dequantize_q8_0,
}


def ggml_type_name(ggml_type: int) -> str:
    if ggml_type in _GGML_TYPE_NAMES:
        return _GGML_TYPE_NAMES[ggml_type]
    try:
        import gguf

        return gguf.GGMLQuantizationType(ggml_type).name
    except (ImportError, ValueError):
        return f"GGML type {ggml_type}"


def block_size(ggml_type: int, tensor_name: str = "tensor") -> tuple[int, int]:
    """(weights per block, bytes per block) of a GGML type."""
    if ggml_type in _BLOCK_SIZES:
        return _BLOCK_SIZES[ggml_type]
    try:
        import gguf

        return tuple(gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)])
    except ImportError:
        raise ValueError(f"tensor {tensor_name!r} is {ggml_type_name(ggml_type)}, which tokenmill decodes only "
                         "through the `gguf` package: pip install gguf") from None
    except (KeyError, ValueError):
        raise ValueError(f"tensor {tensor_name!r} has unknown GGML type id {ggml_type}") from None


def _num_bytes(ggml_type: int, shape: Sequence[int], tensor_name: str) -> int:
    weights, type_size = block_size(ggml_type, tensor_name)
    row_size = shape[-1] if shape else 1
    if row_size % weights:
        raise ValueError(f"tensor {tensor_name!r}: row size {row_size} is not a multiple of the "
                         f"{ggml_type_name(ggml_type)} block size {weights}")
    return math.prod(shape) // weights * type_size


def dequantize(raw: np.ndarray | bytes, ggml_type: int, shape: Sequence[int], tensor_name: str = "?") -> np.ndarray:
    """Bytes of one GGML tensor -> a new float32 array of `shape` (torch order: rows of blocks, row last).

    F32, F16, BF16, Q8_0, Q4_0 and Q4_1 are decoded here; other types go through `gguf.quants.dequantize`
    when the `gguf` package has them, else ValueError naming type and tensor.
    """
    shape = tuple(shape)
    raw = np.frombuffer(raw, dtype=np.uint8) if isinstance(raw, (bytes, bytearray)) else raw.reshape(-1)
    expected = _num_bytes(ggml_type, shape, tensor_name)
    if raw.dtype != np.uint8 or raw.size != expected:
        raise ValueError(f"tensor {tensor_name!r}: expected {expected} uint8 bytes for {ggml_type_name(ggml_type)} "
                         f"{list(shape)}, got {raw.size} {raw.dtype}")
    if ggml_type in _DEQUANTIZERS:
        values = _DEQUANTIZERS[ggml_type](raw)
    else:
        values = _dequantize_with_gguf(raw, ggml_type, shape, tensor_name)
    return values.reshape(shape)


def _dequantize_with_gguf(raw: np.ndarray, ggml_type: int, shape: tuple[int, ...], tensor_name: str) -> np.ndarray:
    import gguf

    weights, type_size = block_size(ggml_type, tensor_name)
    rows = raw.reshape(*shape[:-1], shape[-1] // weights * type_size)
    try:
        values = gguf.quants.dequantize(rows, gguf.GGMLQuantizationType(ggml_type))
    except NotImplementedError:
        raise ValueError(f"tensor {tensor_name!r} is {ggml_type_name(ggml_type)}, which neither tokenmill nor the "
                         "installed `gguf` package can dequantize") from None
    return np.array(values, dtype=np.float32)  # a copy: never alias the file map


# ---------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------

_SPLIT_FILE = re.compile(r"-\d{5}-of-\d{5}\.gguf$", re.IGNORECASE)


def find_gguf_file(path: str) -> str | None:
    """The GGUF file that `path` names: the file itself, or the only `*.gguf` in the directory `path`.

    Returns None when `path` is neither (missing, another kind of file, a directory without GGUF). A directory
    holding several GGUF files is ambiguous and raises ValueError listing them: name the file instead. Split
    GGUFs (`*-00001-of-00003.gguf`) are refused; merge them with `llama-gguf-split --merge` first.
    """
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(path):
        candidates = sorted(name for name in os.listdir(path)
                            if name.lower().endswith(".gguf") and not name.startswith(".")
                            and os.path.isfile(os.path.join(path, name)))
        if not candidates:
            return None
        if len(candidates) > 1:
            raise ValueError(f"{path} holds several GGUF files {candidates}: pass the path of one of them")
        path = os.path.join(path, candidates[0])
    elif not (os.path.isfile(path) and path.lower().endswith(".gguf")):
        return None
    if _SPLIT_FILE.search(path):
        raise ValueError(f"{path} is one part of a split GGUF, which is not supported: merge the parts with "
                         "`llama-gguf-split --merge` first")
    return path


def require_gguf_file(path: str) -> str:
    file_path = find_gguf_file(path)
    if file_path is None:
        raise FileNotFoundError(f"no GGUF file at {path}")
    return file_path


def open_gguf(path: str) -> GGUFFile:
    return GGUFFile(require_gguf_file(path))


def check_architecture(gguf_file: GGUFFile) -> str:
    architecture = gguf_file.architecture
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"GGUF architecture {architecture!r} ({gguf_file.path}) is not supported; supported: "
                         f"{list(SUPPORTED_ARCHITECTURES)}")
    return architecture


# ---------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------

_REQUIRED = object()


class GGUFConfig:
    """The HF config a GGUF file describes: the attributes a transformers LlamaConfig / Qwen2Config /
    Qwen3Config would have, without importing transformers (seconds of every start-up). Also sets
    `architectures` (e.g. ["LlamaForCausalLM"]), which HF's own GGUF config leaves empty. Picklable, so the
    engine core's process receives it as it is; `to_transformers()` builds transformers' own config."""

    def __init__(self, model_type: str, **fields: Any) -> None:
        self.model_type = model_type
        self.__dict__.update(fields)

    def to_transformers(self) -> PretrainedConfig:
        import transformers

        config_class = getattr(transformers, _CONFIG_CLASS_NAMES[self.model_type])
        kwargs = {key: value for key, value in vars(self).items() if key != "model_type"}
        if "rope_parameters" not in inspect.signature(config_class.__init__).parameters:  # transformers < 5
            rope = kwargs.pop("rope_parameters")
            kwargs["rope_theta"] = rope["rope_theta"]
            scaling = {key: value for key, value in rope.items() if key != "rope_theta"}
            kwargs["rope_scaling"] = scaling if scaling["rope_type"] != "default" else None
        return config_class(**kwargs)

    def __repr__(self) -> str:
        return f"GGUFConfig({vars(self)})"


def load_gguf_config(path: str) -> GGUFConfig:
    """The config of the GGUF file at `path` (see GGUFConfig)."""
    gguf_file = open_gguf(path)
    architecture = check_architecture(gguf_file)
    metadata = gguf_file.metadata

    def hparam(key: str, default: Any = _REQUIRED) -> Any:
        value = metadata.get(f"{architecture}.{key}", default)
        if value is _REQUIRED:
            raise ValueError(f"{gguf_file.path}: GGUF metadata lacks {architecture}.{key}")
        return value

    hidden_size = hparam("embedding_length")
    num_heads = hparam("attention.head_count")
    head_dim = hparam("attention.key_length", hidden_size // num_heads)
    vocab_size = hparam("vocab_size", None) or len(metadata.get("tokenizer.ggml.tokens", ()))
    fields: dict[str, Any] = dict(
        architectures=[_HF_ARCHITECTURES[architecture]],
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hparam("feed_forward_length"),
        num_hidden_layers=hparam("block_count"),
        num_attention_heads=num_heads,
        num_key_value_heads=hparam("attention.head_count_kv", num_heads),
        head_dim=head_dim,
        rms_norm_eps=hparam("attention.layer_norm_rms_epsilon"),
        max_position_embeddings=hparam("context_length"),
        tie_word_embeddings="output.weight" not in gguf_file.tensors,
        bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=metadata.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=metadata.get("tokenizer.ggml.padding_token_id"),
    )
    if architecture != "qwen2":  # Qwen2 always has q/k/v biases; Llama and Qwen3 declare them
        fields["attention_bias"] = "blk.0.attn_q.bias" in gguf_file.tensors
    fields["rope_parameters"] = _rope_parameters(gguf_file, architecture, head_dim, fields["max_position_embeddings"])
    return GGUFConfig(architecture, **fields)


def _rope_parameters(gguf_file: GGUFFile, architecture: str, head_dim: int, max_position: int) -> dict[str, Any]:
    """transformers-5 `rope_parameters`: {"rope_type", "rope_theta", plus the scaling type's fields}.

    llama.cpp stores linear/yarn scaling as `{arch}.rope.scaling.*` keys, but Llama 3.1-style ("llama3") scaling
    only as a `rope_freqs.weight` tensor of per-frequency divisors, from which the parameters are recovered.
    """
    metadata = gguf_file.metadata

    def key(name: str) -> Any:
        return metadata.get(f"{architecture}.rope.scaling.{name}")

    params: dict[str, Any] = {"rope_type": "default",
                              "rope_theta": float(metadata.get(f"{architecture}.rope.freq_base", 10000.0))}
    scaling_type = key("type") or "none"
    factor = key("factor")
    original_max_position = int(key("original_context_length") or max_position)
    if scaling_type == "linear" and factor and factor != 1.0:
        params.update(rope_type="linear", factor=float(factor))
    elif scaling_type == "yarn":
        params.update(rope_type="yarn", factor=float(factor), original_max_position_embeddings=original_max_position)
        for gguf_name, hf_name in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            if key(gguf_name) is not None:
                params[hf_name] = float(key(gguf_name))
    elif scaling_type == "llama3":  # not written by llama.cpp, but unambiguous when present
        params.update(rope_type="llama3", factor=float(factor), original_max_position_embeddings=original_max_position,
                      low_freq_factor=float(key("low_freq_factor") or 1.0),
                      high_freq_factor=float(key("high_freq_factor") or 4.0))
    elif scaling_type not in ("none", "linear"):
        raise ValueError(f"{gguf_file.path}: rope scaling type {scaling_type!r} is not supported "
                         "(supported: none, linear, yarn, llama3)")
    rope_freqs = gguf_file.tensors.get("rope_freqs.weight")
    if architecture == "llama" and rope_freqs is not None and params["rope_type"] == "default":
        rope_factors = gguf_file.load(rope_freqs).astype(np.float64)
        params.update(llama3_rope_parameters(rope_factors, params["rope_theta"], head_dim))
    return params


def _llama3_factors(wavelengths: np.ndarray, factor: float, low_freq_factor: float, high_freq_factor: float,
                    original_max_position: int) -> np.ndarray:
    """llama.cpp's per-frequency divisors for llama3 rope scaling (convert_hf_to_gguf.py, LlamaModel)."""
    smooth = (original_max_position / wavelengths - low_freq_factor) / (high_freq_factor - low_freq_factor)
    medium = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelengths < original_max_position / high_freq_factor, 1.0,
                    np.where(wavelengths > original_max_position / low_freq_factor, factor, medium))


def llama3_rope_parameters(rope_factors: np.ndarray, rope_theta: float, head_dim: int) -> dict[str, Any]:
    """Recover llama3 rope scaling {factor, low/high_freq_factor, original_max_position_embeddings} from divisors.

    The divisors fix only the ratios original_max_position : low : high, so low_freq_factor is taken as 1 (every
    Llama 3.x checkpoint's value); the rest follows from a least-squares fit over the smoothed frequencies and is
    checked by recomputing the divisors. Returns {} when all divisors are 1.
    """
    rope_factors = np.asarray(rope_factors, dtype=np.float64)
    wavelengths = 2 * math.pi * rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if rope_factors.shape != wavelengths.shape:
        raise ValueError(f"rope_freqs.weight has {rope_factors.size} entries, expected head_dim / 2 = "
                         f"{wavelengths.size}")
    factor = float(f"{rope_factors.max():.6g}")
    if factor <= 1.0:
        return {}
    # smooth: 1 for untouched (high) frequencies, 0 for fully scaled (low) ones
    smooth = (1 / rope_factors - 1 / factor) / (1 - 1 / factor)
    medium = (smooth > 1e-4) & (smooth < 1 - 1e-4)
    if medium.sum() >= 2:
        # smooth = (original / wavelength - 1) / (high - 1)  <=>  original / wavelength - (high - 1) * smooth = 1
        lhs = np.stack([1 / wavelengths[medium], -smooth[medium]], axis=1)
        (original, high_minus_one), *_ = np.linalg.lstsq(lhs, np.ones(int(medium.sum())), rcond=None)
        original_max_position, high_freq_factor = int(round(original)), float(f"{1 + high_minus_one:.4g}")
    else:  # too few smoothed frequencies to fit: try Llama 3.1's values
        original_max_position, high_freq_factor = 8192, 4.0
    params = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": high_freq_factor,
              "original_max_position_embeddings": original_max_position}
    expected = _llama3_factors(wavelengths, factor, 1.0, high_freq_factor, original_max_position)
    if not np.allclose(expected, rope_factors, rtol=1e-3):
        raise ValueError(f"rope_freqs.weight does not match llama3 rope scaling (best fit {params})")
    return params


# ---------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------

_TOKENIZER_CACHE_FORMAT = 1
_SPECIAL_TOKEN_KEYS = {"bos_token": "tokenizer.ggml.bos_token_id", "eos_token": "tokenizer.ggml.eos_token_id",
                       "unk_token": "tokenizer.ggml.unknown_token_id", "pad_token": "tokenizer.ggml.padding_token_id"}


def tokenizer_cache_dir(path: str) -> str:
    """Where the converted tokenizer of the GGUF at `path` is cached.

    `$TOKENMILL_CACHE_DIR/gguf-tokenizers/<stem>-<hash>` (default root `~/.cache/tokenmill`); the hash covers
    the file's absolute path, size and mtime and the transformers version that converted it.
    """
    stat = os.stat(path)
    transformers_version = importlib.metadata.version("transformers")  # without importing it
    identity = f"{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\0{transformers_version}\0" \
               f"{_TOKENIZER_CACHE_FORMAT}"
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    stem = os.path.splitext(os.path.basename(path))[0]
    root = os.environ.get("TOKENMILL_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "tokenmill")
    return os.path.join(root, "gguf-tokenizers", f"{stem}-{digest}")


def load_gguf_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """The HF fast tokenizer of a GGUF file, with its chat template and bos/eos tokens.

    transformers converts GGUF tokenizers in ~10-15 s, so the result is saved under `tokenizer_cache_dir(path)`
    and later calls load it from there (well under a second: the generic fast tokenizer's class, not
    AutoTokenizer, whose import alone takes seconds).
    """
    from transformers import PreTrainedTokenizerFast

    file_path = require_gguf_file(path)
    cache_dir = tokenizer_cache_dir(file_path)
    if os.path.isdir(cache_dir):
        try:
            return PreTrainedTokenizerFast.from_pretrained(cache_dir)
        except Exception as error:  # a cache written by another version or damaged: convert again
            logger.warning("ignoring unreadable tokenizer cache %s: %s", cache_dir, error)
            shutil.rmtree(cache_dir, ignore_errors=True)
    tokenizer = _convert_tokenizer(file_path)
    _save_atomically(tokenizer, cache_dir)
    return tokenizer


def _convert_tokenizer(file_path: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    directory, name = os.path.split(file_path)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    metadata = GGUFFile(file_path).metadata
    tokens = metadata.get("tokenizer.ggml.tokens", [])
    for attribute, gguf_key in _SPECIAL_TOKEN_KEYS.items():
        token_id = metadata.get(gguf_key)
        if getattr(tokenizer, attribute) is None and token_id is not None and token_id < len(tokens):
            setattr(tokenizer, attribute, tokens[token_id])
    chat_template = metadata.get("tokenizer.chat_template")
    if chat_template and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = chat_template
    return tokenizer


def _save_atomically(tokenizer: PreTrainedTokenizerBase, cache_dir: str) -> None:
    """save_pretrained into a temporary sibling, then rename: readers never see a half-written cache."""
    parent = os.path.dirname(cache_dir)
    try:
        os.makedirs(parent, exist_ok=True)
        temp_dir = tempfile.mkdtemp(prefix=os.path.basename(cache_dir) + ".tmp-", dir=parent)
    except OSError as error:
        logger.warning("cannot cache the GGUF tokenizer in %s: %s", parent, error)
        return
    try:
        tokenizer.save_pretrained(temp_dir)
        os.rename(temp_dir, cache_dir)
    except OSError as error:
        if not os.path.isdir(cache_dir):  # else another process cached it first, which is as good
            logger.warning("cannot cache the GGUF tokenizer in %s: %s", cache_dir, error)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
