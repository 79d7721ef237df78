"""Weights from a GGUF file (source/gguf_file.py parses it): llama.cpp tensor names mapped to HF ones,
each tensor dequantized to the model's dtype, in HF shapes ([out, in] for Linear); or, when the model keeps
GGUF weights quantized (layers/quantization/gguf.py), the linear layers' tensors as the file's blocks."""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from tqdm import tqdm

from tokenmill.layers.quantization.gguf import GGUFBlocks, GGUFQuantConfig
from tokenmill.loader.base import CheckpointLoader
from tokenmill.source.gguf_file import GGUFTensorInfo, check_architecture, open_gguf

# Tensors decoded ahead of the one being copied into the model, by this many threads.
DECODE_AHEAD, DECODE_THREADS = 4, 2

_GLOBAL_TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_MODULE_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_LINEAR_WEIGHT = re.compile(r"blk\.\d+\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight")
_CONFIG_ONLY_TENSORS = {"rope_freqs.weight"}  # folded into config.rope_parameters


def hf_tensor_name(gguf_name: str) -> str:
    """llama.cpp tensor name -> HF name: `blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`."""
    if gguf_name in _GLOBAL_TENSOR_NAMES:
        return _GLOBAL_TENSOR_NAMES[gguf_name]
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    if match is None or match.group(2) not in _LAYER_MODULE_NAMES:
        raise ValueError(f"GGUF tensor {gguf_name!r} has no HF counterpart in the llama/qwen2/qwen3 layout")
    layer, module, kind = match.groups()
    return f"model.layers.{layer}.{_LAYER_MODULE_NAMES[module]}.{kind}"


def _unpermute_rope_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation for its interleaved rope (convert_hf_to_gguf.py, LlamaModel.permute).

    Per head, llama.cpp's row r = 2 * i + j holds HF row j * head_dim / 2 + i (rotate-half layout).
    """
    rows = weight.shape[0]
    return (weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
            .transpose(1, 2).reshape(weight.shape))


class GGUFLoader(CheckpointLoader):
    source_formats = ("gguf",)
    keep_quantized = False  # yield the linear layers' quantized tensors as GGUFBlocks

    def load(self, model: torch.nn.Module, dtype: torch.dtype, seed: int) -> None:
        self.keep_quantized = isinstance(getattr(model, "quant_config", None), GGUFQuantConfig)
        super().load(model, dtype, seed)

    def weights(self, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor | GGUFBlocks]]:
        """`lm_head.weight` is yielded only when the file has `output.weight` (else embeddings are tied). For
        the llama architecture the q/k projection rows are put back in HF order (blocks hold whole rows, so
        kept blocks are reordered the same way); qwen2/qwen3 files are not permuted by llama.cpp. The next few
        tensors are decoded in threads while the model copies in the current one (numpy and torch release
        the GIL)."""
        gguf_file = open_gguf(self.source.path)
        architecture = check_architecture(gguf_file)
        num_heads = gguf_file.metadata[f"{architecture}.attention.head_count"]
        num_kv_heads = gguf_file.metadata.get(f"{architecture}.attention.head_count_kv", num_heads)

        def decode(info: GGUFTensorInfo) -> torch.Tensor | GGUFBlocks:
            kept = self.keep_quantized and _LINEAR_WEIGHT.fullmatch(info.name) is not None
            if kept:  # rows of blocks
                weight = torch.from_numpy(gguf_file.raw(info).copy()).view(info.shape[0], -1)
            else:
                weight = torch.from_numpy(gguf_file.load(info))
            if architecture == "llama" and ".attn_q." in info.name:
                weight = _unpermute_rope_rows(weight, num_heads)
            elif architecture == "llama" and ".attn_k." in info.name:
                weight = _unpermute_rope_rows(weight, num_kv_heads)
            return GGUFBlocks(info.ggml_type, weight, info.shape[1]).unpack() if kept else weight.to(dtype)

        infos = [info for info in gguf_file.tensors.values() if info.name not in _CONFIG_ONLY_TENSORS]
        with ThreadPoolExecutor(max_workers=DECODE_THREADS, thread_name_prefix="gguf-decode") as pool:
            pending: deque[tuple[str, Future]] = deque()
            for info in tqdm(infos, desc="Loading GGUF weights", unit="tensor"):
                pending.append((hf_tensor_name(info.name), pool.submit(decode, info)))
                if len(pending) > DECODE_AHEAD:
                    name, weight = pending.popleft()
                    yield name, weight.result()
            while pending:
                name, weight = pending.popleft()
                yield name, weight.result()
