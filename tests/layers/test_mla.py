"""Multi-head latent attention: the absorbed path over the latent cache (torch backend in float64, the Triton
kernel in float32/bfloat16 under the interpreter) against the expanded per-head K/V computation in float64,
and the latent cache's size."""

from __future__ import annotations

import copy

import pytest
import torch

from tokenmill.attention.backend import get_backend
from tokenmill.forward_context import set_forward_context
from tokenmill.layers.attention import Attention
from tokenmill.layers.fp8_format import FP8_DTYPE
from tokenmill.layers.mla import MLAAttention
from tokenmill.layers.rotary import RotaryEmbedding
from tokenmill.worker.kv_cache import KVCache
from tokenmill.worker.step_inputs import made_up_metadata

NUM_HEADS, LATENT, ROPE, NOPE, V_DIM = 20, 32, 8, 16, 12  # 20 heads: two head tiles of the kernel, one partial
BLOCK_SIZE = 4
SCALE = (NOPE + ROPE) ** -0.5
# Two decodes (one over a long prefix, one a request's first token), a chunk over a cached prefix, a prompt.
Q_LENS, SEQ_LENS = [1, 1, 5, 3], [9, 1, 13, 3]


class Step:
    """One step's inputs in float64: a shuffled block table over a cache whose cached prefix holds random
    latents and whose unused slots hold large numbers (read by mistake, they would swamp the result)."""

    def __init__(self, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        blocks = [-(-s // BLOCK_SIZE) for s in SEQ_LENS]
        order = torch.randperm(2 * sum(blocks) + 1, generator=gen)
        self.cache = torch.full((1, len(order), BLOCK_SIZE, 1, LATENT + ROPE), 1e3, dtype=torch.float64)
        self.block_table = torch.zeros(len(SEQ_LENS), max(blocks) + 1, dtype=torch.int32)
        slots, start = [], 0
        for i, (q_len, seq_len, n) in enumerate(zip(Q_LENS, SEQ_LENS, blocks)):
            self.block_table[i, :n] = order[start:start + n]
            start += n
            flat = (self.block_table[i].long()[:, None] * BLOCK_SIZE + torch.arange(BLOCK_SIZE)).flatten()
            self.cache.view(-1, LATENT + ROPE)[flat[:seq_len - q_len]] = torch.randn(
                seq_len - q_len, LATENT + ROPE, generator=gen, dtype=torch.float64)
            slots.append(flat[seq_len - q_len:seq_len])
        self.slot_mapping = torch.cat(slots)
        num_tokens = sum(Q_LENS)
        self.q = torch.randn(num_tokens, NUM_HEADS, NOPE + ROPE, generator=gen, dtype=torch.float64)
        self.latent = torch.randn(num_tokens, LATENT, generator=gen, dtype=torch.float64)
        self.k_pe = torch.randn(num_tokens, ROPE, generator=gen, dtype=torch.float64)
        self.kv_b = torch.randn(NUM_HEADS * (NOPE + V_DIM), LATENT, generator=gen, dtype=torch.float64) / LATENT**0.5
        self.rotary = RotaryEmbedding(ROPE, 64, 10000.0, interleaved=True).double()

    def layer_output(self, dtype: torch.dtype, backend: str) -> torch.Tensor:
        """The layer's output on the CPU, or through Triton on the GPU when there is one (else interpreted)."""
        device = torch.device("cuda" if backend == "triton" and torch.cuda.is_available() else "cpu")
        layer = MLAAttention(NUM_HEADS, LATENT, NOPE, ROPE, V_DIM, SCALE, copy.deepcopy(self.rotary)).to(device)
        layer.kv_cache = self.cache.to(device, dtype)
        metadata, positions = made_up_metadata(Q_LENS, SEQ_LENS, self.block_table, self.slot_mapping, 64, device)
        with set_forward_context(metadata, get_backend(backend)):
            return layer(positions, *(t.to(device, dtype) for t in (self.q, self.latent, self.k_pe, self.kv_b))
                         ).double().cpu()

    def expanded_reference(self) -> torch.Tensor:
        """Per-head keys [W_UK c | k_pe] and values W_UV c for every position, plain causal softmax."""
        w_uk, w_uv = self.kv_b.view(NUM_HEADS, NOPE + V_DIM, LATENT).split([NOPE, V_DIM], dim=1)
        out, start = [], 0
        for i, (q_len, seq_len) in enumerate(zip(Q_LENS, SEQ_LENS)):
            positions = torch.arange(seq_len - q_len, seq_len)
            q_pe, k_pe_new = self.rotary(positions, self.q[start:start + q_len, :, NOPE:],
                                         self.k_pe[start:start + q_len, None])
            flat = (self.block_table[i].long()[:, None] * BLOCK_SIZE + torch.arange(BLOCK_SIZE)).flatten()
            cached = self.cache.view(-1, LATENT + ROPE)[flat[:seq_len - q_len]]
            latents = torch.cat([cached[:, :LATENT], self.latent[start:start + q_len]])
            k_pe = torch.cat([cached[:, LATENT:], k_pe_new[:, 0]])
            keys = torch.cat([torch.einsum("hnl,sl->shn", w_uk, latents),
                              k_pe[:, None].expand(-1, NUM_HEADS, -1)], dim=-1)
            values = torch.einsum("hvl,sl->shv", w_uv, latents)
            query = torch.cat([self.q[start:start + q_len, :, :NOPE], q_pe], dim=-1)
            scores = torch.einsum("qhd,shd->hqs", query, keys) * SCALE
            scores = scores.masked_fill(torch.arange(seq_len)[None, :] > positions[:, None], float("-inf"))
            out.append(torch.einsum("hqs,shv->qhv", scores.softmax(-1), values).reshape(q_len, -1))
            start += q_len
        return torch.cat(out)


def absorbed_only(monkeypatch) -> None:
    """Every token through the absorbed path, as a CUDA graph's replay computes it (eager steps expand prompts)."""
    monkeypatch.setattr(MLAAttention, "_expands_prompts", staticmethod(lambda ctx, metadata: False))


@pytest.mark.parametrize("path", ["absorbed", "expanded prompts", "expanded up to 8 keys"])
def test_both_paths_match_expanded_attention_in_float64(path, monkeypatch):
    """The absorbed path (every token), and the eager steps' mix: the first requests (one token each, decodes)
    absorbed, the others expanded through kv_b_proj, over a prefix or not; a prompt over a context longer than
    EXPANDED_MAX_CONTEXT absorbed on its own (here the chunk over 13 keys, beside an expanded prompt)."""
    if path == "absorbed":
        absorbed_only(monkeypatch)
    if path == "expanded up to 8 keys":
        monkeypatch.setattr("tokenmill.layers.mla.EXPANDED_MAX_CONTEXT", 8)
    step = Step()
    torch.testing.assert_close(step.layer_output(torch.float64, "torch"), step.expanded_reference(),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_latent_kernel_matches_expanded_attention(dtype, monkeypatch):
    absorbed_only(monkeypatch)
    step = Step(seed=1)
    out, ref = step.layer_output(dtype, "triton"), step.expanded_reference()
    err = ((out - ref).norm() / ref.norm()).item()
    assert err < (1e-5 if dtype == torch.float32 else 2e-2), err


def test_latent_cache_holds_more_tokens_per_byte():
    """DeepSeek-V3's sizes: a latent block holds a token in kv_lora_rank + rope values (576) per layer, where a
    per-head cache of the same attention would hold 2 x 128 heads x 192."""
    rotary = RotaryEmbedding(64, 16, 10000.0, interleaved=True)
    mla = KVCache([MLAAttention(128, 512, 128, 64, 128, 1.0, rotary) for _ in range(2)], 16, torch.bfloat16,
                  torch.device("cpu"))
    per_head = KVCache([Attention(128, 128, 192, 1.0, rotary) for _ in range(2)], 16, torch.bfloat16,
                       torch.device("cpu"))
    assert mla.bytes_per_block() == 2 * 16 * 576 * 2
    assert per_head.bytes_per_block() == 2 * 2 * 16 * 128 * 192 * 2
    assert per_head.bytes_per_block() // mla.bytes_per_block() == 85
    mla.allocate(3)
    assert mla.pool.shape == (2, 1, 3, 16, 1, 576)
    assert mla.attn_layers[1].kv_cache.shape == (1, 3, 16, 1, 576)


def test_fp8_latent_cache_is_refused():
    layer = MLAAttention(4, 32, 16, 8, 12, 1.0, RotaryEmbedding(8, 16, 10000.0, interleaved=True))
    with pytest.raises(ValueError, match="kv_cache_dtype='fp8' is not supported with MLA"):
        KVCache([layer], 16, FP8_DTYPE, torch.device("cpu"))
