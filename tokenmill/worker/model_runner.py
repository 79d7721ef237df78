"""The model runner: holds the model, the KV cache and the persistent batch; runs one step.

launch_step(SchedulerOutput) -> PendingStep, without waiting for the device:
  1. apply the scheduler's differences to the persistent batch (finished, preempted, new, new blocks)
     and do the step's host-tier block copies
  2. build this step's flat inputs with numpy over the batch rows into pinned buffers: token ids,
     positions, slots, query_start_loc, seq_lens, block table; tokens still in flight from the
     previous step (async scheduling) are filled in on the device
  3. forward under the attention context (a CUDA graph for decode-only batches); logits only at each
     request's last scheduled token; sample; queue the copy of the sampled tokens to the host
finish_step(PendingStep) -> ModelRunnerOutput: wait for that copy and record the tokens; requests
whose prompt is not yet fully computed discard their sample.
launch_step(sample=False) queues the forward pass only; sample() then queues the rest (the engine core
fills a grammar bitmask in between).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from tokenmill.attention.backend import AttentionMetadata, default_backend_name, get_backend
from tokenmill.config import EngineConfig
from tokenmill.core.interface import ModelRunnerOutput, SchedulerOutput, TokenLogprobs
from tokenmill.core.kv_cache_manager import cdiv
from tokenmill.forward_context import set_forward_context
from tokenmill.layers import cublaslt
from tokenmill.layers.attention import Attention
from tokenmill.layers.linear import ColumnParallelLinear, RowParallelLinear
from tokenmill.layers.sampler import Sampler, SamplerOutput, SamplingMetadata, gather_logprobs
from tokenmill.layers.vocab_embedding import ParallelLMHead
from tokenmill.loader import ModelSource, config_dtype, load_model
from tokenmill.metrics import step_timer
from tokenmill.worker.buffers import StagedBuffer
from tokenmill.worker.cuda_graphs import CudaGraphs, capture_sizes, mixed_capture_sizes
from tokenmill.worker.input_batch import CachedRequestState, InputBatch

logger = logging.getLogger(__name__)

# The cached prefix of warm_up's long-prefix steps: long enough that a short step over it splits its keys.
WARM_UP_PREFIX = 4096


@dataclass
class PendingStep:
    """A launched step: what the host needs to finish it once the device is done."""

    req_ids: list[str]  # scheduled requests, in batch order at launch
    done: np.ndarray  # [num_reqs] bool: the request's sample is a real next token (not a prompt chunk)
    host: list[torch.Tensor] | None  # sampled ids (+ logprob ids, logprobs, ranks), copying to the host
    event: torch.cuda.Event | None  # recorded after the copies were queued
    prompt_logprobs: dict[str, list[TokenLogprobs]]
    sampler_output: SamplerOutput | None  # keeps the device tensors alive until the copies finish
    # Set while the sampling is still to be queued (launch_step(sample=False), then sample()).
    logits: torch.Tensor | None = None
    sampling_metadata: SamplingMetadata | None = None


class ModelRunner:
    def __init__(self, config: EngineConfig, source: ModelSource) -> None:
        self.config = config
        self.device = config.resolve_device()
        self.dtype = config.model.resolve_dtype(config_dtype(source.hf_config), self.device)
        self.block_size = config.cache.block_size
        self.max_model_len = config.scheduler.max_model_len
        self.max_num_reqs = config.scheduler.max_num_seqs
        self.max_num_tokens = config.scheduler.max_num_batched_tokens
        self.vocab_size = source.hf_config.vocab_size
        # GPU memory in use before this engine allocates anything (other processes, our CUDA context).
        self.initial_gpu_used = (lambda free, total: total - free)(*torch.cuda.mem_get_info()) \
            if self.device.type == "cuda" else 0
        started = time.perf_counter()
        self.model = load_model(source, config.model.load_format, self.dtype, self.device,
                                self.max_model_len, config.model.seed)
        logger.info("model loaded in %.1f s (%s, %s)", time.perf_counter() - started, self.dtype, self.device)
        self.attn_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.backend = get_backend(config.attention_backend or default_backend_name(self.device))
        self.sampler = Sampler()
        self.max_blocks_per_req = cdiv(self.max_model_len, self.block_size)
        self.batch = InputBatch(self.max_num_reqs, self.max_model_len, self.max_blocks_per_req)
        self.requests: dict[str, CachedRequestState] = {}
        num_rows = max(self.max_num_tokens, self.max_num_reqs)
        self.input_ids = StagedBuffer(num_rows, torch.int64, self.device)
        self.positions = StagedBuffer(num_rows, torch.int64, self.device)
        self.slot_mapping = StagedBuffer(num_rows, torch.int64, self.device)
        self.seq_lens = StagedBuffer(self.max_num_reqs, torch.int32, self.device)
        self.query_start_loc = StagedBuffer(self.max_num_reqs + 1, torch.int32, self.device)
        self.logits_indices = StagedBuffer(self.max_num_reqs, torch.int64, self.device)
        self.decode_order = StagedBuffer(self.max_num_reqs, torch.int32, self.device)
        self.logits_order = StagedBuffer(self.max_num_reqs, torch.int32, self.device)  # (_logits_only's own)
        self.in_flight_dst = StagedBuffer(self.max_num_reqs, torch.int64, self.device)
        self.in_flight_src = StagedBuffer(self.max_num_reqs, torch.int64, self.device)
        self.sampling_buffers = {name: StagedBuffer(self.max_num_reqs, dtype, self.device) for name, dtype in (
            ("temperature", torch.float32), ("top_p", torch.float32), ("top_k", torch.int64),
            ("min_p", torch.float32))}
        # Recorded once a step's host-to-device input copies are queued: the pinned buffers are refilled
        # only after the device has read them (async scheduling runs a step ahead of the device).
        self.inputs_copied: torch.cuda.Event | None = None
        self.last_sampled: torch.Tensor | None = None
        self.last_sampled_index: dict[str, int] = {}
        self.block_table = StagedBuffer((self.max_num_reqs, self.max_blocks_per_req), torch.int32, self.device)
        self._arange = np.arange(num_rows + 1, dtype=np.int64)
        # query_start_loc of one query row per request (the logits rows' attention in the last layer)
        self.one_row_each = torch.arange(self.max_num_reqs + 1, dtype=torch.int32)
        self.one_row_each_gpu = self.one_row_each.to(self.device)
        use_graphs = self.device.type == "cuda" and not config.enforce_eager and self.backend.supports_cuda_graphs
        self.graphs = CudaGraphs("decode", capture_sizes(self.max_num_reqs) if use_graphs else [])
        self.mixed_graphs = CudaGraphs("mixed", mixed_capture_sizes(self.max_num_tokens) if use_graphs else [])

    # ---- KV cache ------------------------------------------------------------------------------

    def kv_bytes_per_block(self) -> int:
        layer = self.attn_layers[0]
        per_layer = 2 * self.block_size * layer.num_kv_heads * layer.head_dim * self.dtype.itemsize
        return per_layer * len(self.attn_layers)

    def initialize_kv_cache(self, num_blocks: int) -> None:
        layer = self.attn_layers[0]
        # Zeroed once: padded key slots must hold finite numbers, since masked scores times NaN are NaN.
        cache = torch.zeros(len(self.attn_layers), 2, num_blocks, self.block_size, layer.num_kv_heads,
                            layer.head_dim, dtype=self.dtype, device=self.device)
        self.kv_cache = cache
        for attn, kv_cache in zip(self.attn_layers, cache.unbind(0)):
            attn.kv_cache = kv_cache

    def initialize_host_cache(self, num_blocks: int) -> None:
        """The host tier's storage: [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim], pinned, so
        each block (all layers) is one contiguous range that one asynchronous copy moves."""
        shape = (num_blocks, self.kv_cache.shape[0], 2, *self.kv_cache.shape[3:])
        self.host_kv_cache = torch.zeros(shape, dtype=self.dtype, pin_memory=self.device.type == "cuda")
        self.offload_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.offloads: list[tuple[torch.cuda.Event, set[int]]] = []  # copies out in flight: (done, host ids)

    @torch.inference_mode()
    def copy_blocks(self, swap_out: list[tuple[int, int]], swap_in: list[tuple[int, int]]) -> None:
        """Evicted device blocks to the host tier, then host-tier hits back to the device, without waiting.

        Out: the blocks are gathered on the compute stream, ahead of the forward pass that may overwrite
        them, into a staging buffer that a side stream copies to the host while compute goes on. In: a
        copy that reads a host block still being written by such a copy waits for it, then the blocks are
        scattered on the compute stream. Runs of consecutive host blocks move in one copy each (pinned)."""
        cuda = self.device.type == "cuda"
        if cuda:
            self.offloads = [(event, ids) for event, ids in self.offloads if not event.query()]
        if swap_out:
            device_ids, host_ids = zip(*swap_out)
            index = torch.tensor(device_ids).to(self.device, non_blocking=True)
            staged = self.kv_cache[:, :, index].permute(2, 0, 1, 3, 4, 5).contiguous()
            with torch.cuda.stream(self.offload_stream) if cuda else contextlib.nullcontext():
                if cuda:
                    self.offload_stream.wait_stream(torch.cuda.current_stream())
                    staged.record_stream(self.offload_stream)
                for start, host_start, length in _runs(host_ids):
                    self.host_kv_cache[host_start:host_start + length].copy_(staged[start:start + length],
                                                                             non_blocking=True)
            if cuda:
                self.offloads.append((self.offload_stream.record_event(), set(host_ids)))
        if swap_in:
            host_ids, device_ids = zip(*swap_in)
            wanted = set(host_ids)
            for event, ids in self.offloads:
                if ids & wanted:
                    torch.cuda.current_stream().wait_event(event)
            staged = torch.empty((len(host_ids), *self.host_kv_cache.shape[1:]), dtype=self.dtype, device=self.device)
            for start, host_start, length in _runs(host_ids):
                staged[start:start + length].copy_(self.host_kv_cache[host_start:host_start + length],
                                                   non_blocking=True)
            index = torch.tensor(device_ids).to(self.device, non_blocking=True)
            self.kv_cache[:, :, index] = staged.permute(1, 2, 0, 3, 4, 5)

    @torch.inference_mode()
    def profile_run(self) -> None:
        """A worst-case step for memory profiling: max_num_batched_tokens prompt tokens, then
        max_num_seqs rows of logits through the sampler with every filter on."""
        num_tokens, bs = self.max_num_tokens, self.block_size
        # As many requests of at most max_model_len tokens as the budget holds.
        seq_lens = [min(self.max_model_len, num_tokens - start) for start in range(0, num_tokens, self.max_model_len)]
        blocks_per_seq = [cdiv(n, bs) for n in seq_lens]
        num_blocks = sum(blocks_per_seq)
        layer = self.attn_layers[0]
        scratch = torch.zeros(2, num_blocks, bs, layer.num_kv_heads, layer.head_dim, dtype=self.dtype,
                              device=self.device)
        for attn in self.attn_layers:
            attn.kv_cache = scratch
        block_table = torch.zeros(len(seq_lens), max(blocks_per_seq), dtype=torch.int32)
        slots, first_block = [], 0
        for i, (n, nb) in enumerate(zip(seq_lens, blocks_per_seq)):
            block_table[i, :nb] = torch.arange(first_block, first_block + nb)
            slots.append(torch.arange(n) + first_block * bs)
            first_block += nb
        metadata, positions = self._dummy_metadata(seq_lens, seq_lens, block_table, torch.cat(slots))
        input_ids = torch.randint(0, self.vocab_size, (num_tokens,), device=self.device)
        with set_forward_context(metadata, self.backend):
            hidden_states = self.model(input_ids, positions)
        num_rows = min(self.max_num_reqs, num_tokens)
        logits = self.model.compute_logits(hidden_states[:num_rows])
        ones = torch.ones(num_rows, device=self.device)
        self.sampler(logits, SamplingMetadata(
            temperature=ones, top_p=ones * 0.9, top_k=torch.full((num_rows,), 50, device=self.device),
            min_p=ones * 0.05, all_greedy=False, max_num_logprobs=20))
        for attn in self.attn_layers:
            attn.kv_cache = torch.empty(0)
        del scratch, hidden_states, logits

    def _dummy_metadata(self, q_lens: list[int], seq_lens: list[int], block_table: torch.Tensor,
                        slot_mapping: torch.Tensor) -> tuple[AttentionMetadata, torch.Tensor]:
        """(metadata, positions) of a made-up step: request i computes its last q_lens[i] of seq_lens[i]
        tokens; block_table and slot_mapping on the host. Its leading one-token requests, if longer ones
        follow, are the step's num_decodes."""
        assert all(0 < q <= s <= self.max_model_len for q, s in zip(q_lens, seq_lens)), (q_lens, seq_lens)
        qsl = torch.tensor([0] + np.cumsum(q_lens).tolist(), dtype=torch.int32)
        lens = torch.tensor(seq_lens, dtype=torch.int32)
        max_query_len = max(q_lens)
        num_decodes = next(i for i, q in enumerate(q_lens) if q > 1) if max_query_len > 1 else 0
        metadata = AttentionMetadata(
            num_actual_tokens=int(qsl[-1]), num_reqs=len(seq_lens), max_query_len=max_query_len,
            max_seq_len=max(seq_lens), query_start_loc=qsl.to(self.device), seq_lens=lens.to(self.device),
            block_table=block_table.to(self.device), slot_mapping=slot_mapping.to(self.device),
            query_start_loc_cpu=qsl, seq_lens_cpu=lens, num_decodes=num_decodes,
            decode_order=torch.arange(num_decodes, dtype=torch.int32, device=self.device) if num_decodes else None)
        positions = torch.cat([torch.arange(s - q, s) for q, s in zip(q_lens, seq_lens)]).to(self.device)
        return metadata, positions

    @torch.inference_mode()
    def warm_up(self) -> float:
        """Runs once each kernel variant that serving may launch and start-up has not (the CUDA graphs
        cover decode), so that none is compiled in the middle of serving, where a Triton compile stalls
        every request for about a second. Prefill-shaped steps at each power-of-two query length: alone
        over a short and over a long (WARM_UP_PREFIX) cached prefix, and many at once after a one-token
        request, each with only the logits rows in the last layer as in a real step; one fresh prompt as
        long as a step allows; the sampler with no filters. Needs the KV cache: reads its block 0, writes
        nothing. Returns seconds taken."""
        started = time.perf_counter()
        steps: list[tuple[list[int], list[int]]] = []  # (q_lens, seq_lens)
        q = 2
        while q <= min(self.max_num_tokens, self.max_model_len):
            steps.append(([q], [min(self.max_model_len, q + self.block_size)]))
            steps.append(([q], [min(self.max_model_len, q + WARM_UP_PREFIX)]))
            n = min(self.max_num_reqs - 1, (self.max_num_tokens - 1) // q)
            if n > 0:
                steps.append(([1] + [q] * n, [min(self.max_model_len, WARM_UP_PREFIX)]
                              + [min(self.max_model_len, q + self.block_size)] * n))
            q *= 2
        longest = min(self.max_num_tokens, self.max_model_len)
        steps.append(([longest], [longest]))
        for q_lens, seq_lens in steps:
            num_tokens, num_reqs = sum(q_lens), len(q_lens)
            block_table = torch.zeros(num_reqs, self.max_blocks_per_req, dtype=torch.int32)
            metadata, positions = self._dummy_metadata(q_lens, seq_lens, block_table,
                                                       torch.full((num_tokens,), -1, dtype=torch.int64))
            logits_rows = metadata.query_start_loc[1:].long() - 1
            logits_metadata = self._logits_metadata(
                metadata, torch.arange(num_reqs, dtype=torch.int32, device=self.device))
            input_ids = torch.zeros(num_tokens, dtype=torch.int64, device=self.device)
            with set_forward_context(metadata, self.backend, logits_rows, logits_metadata):
                hidden_states = self.model(input_ids, positions)
        logits = self.model.compute_logits(hidden_states)
        self.sampler(logits, SamplingMetadata(temperature=torch.ones(len(logits), device=self.device), top_p=None,
                                              top_k=None, min_p=None, all_greedy=False))
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    @torch.inference_mode()
    def capture_cuda_graphs(self) -> float:
        """Captures the decode and mixed-step graphs over the static buffers (needs the KV cache); returns
        seconds taken. The buffers hold the padding layout while capturing: every request empty, every
        token in none."""
        if not self.graphs.sizes and not self.mixed_graphs.sizes:
            return 0.0
        size = max(self.graphs.max_size, self.mixed_graphs.max_size)
        self.input_ids.gpu[:size].zero_()
        self.positions.gpu[:size].zero_()
        self.slot_mapping.gpu[:size].fill_(-1)
        self.seq_lens.gpu.zero_()
        self.query_start_loc.gpu.zero_()
        self.block_table.gpu.zero_()
        self.decode_order.gpu.copy_(torch.arange(self.max_num_reqs, dtype=torch.int32))

        def forward(num_tokens: int, num_reqs: int, max_query_len: int) -> torch.Tensor:
            metadata = AttentionMetadata(
                num_actual_tokens=num_tokens, num_reqs=num_reqs, max_query_len=max_query_len,
                max_seq_len=self.max_model_len, query_start_loc=self.query_start_loc.gpu[:num_reqs + 1],
                seq_lens=self.seq_lens.gpu[:num_reqs], block_table=self.block_table.gpu[:num_reqs],
                slot_mapping=self.slot_mapping.gpu[:num_tokens],
                query_start_loc_cpu=self.query_start_loc.cpu[:num_reqs + 1], seq_lens_cpu=self.seq_lens.cpu[:num_reqs],
                decode_order=self.decode_order.gpu[:num_tokens] if max_query_len == 1 else None)
            with set_forward_context(metadata, self.backend):
                return self.model(self.input_ids.gpu[:num_tokens], self.positions.gpu[:num_tokens])

        seconds = 0.0
        if self.graphs.sizes:
            seconds += self.graphs.capture(lambda n: self.model.compute_logits(forward(n, n, 1)))
        if self.mixed_graphs.sizes:
            seconds += self.mixed_graphs.capture(lambda n: forward(n, self._mixed_num_reqs(n), n), pool=self.graphs.pool)
        return seconds

    @torch.inference_mode()
    def tune_gemms(self) -> None:
        """Times cuBLASLt's algorithms against F.linear for the products the CUDA graphs will run (every
        graph size, every weight shape) and for a full prefill chunk (max_num_batched_tokens rows, the
        layers' weights); `linear()` then runs the winners (layers/cublaslt.py). Before the KV cache is
        sized, so its scratch memory is free again by then. TOKENMILL_GEMM_TUNING=0 turns it off."""
        if not self.graphs.sizes or os.environ.get("TOKENMILL_GEMM_TUNING", "1") == "0":
            return
        weights = self._linear_weights()
        layers = {shape: w for shape, w in weights.items() if w[0] is not self.model.lm_head.weight}
        try:
            cublaslt.tune(weights, [s for s in self.graphs.sizes + self.mixed_graphs.sizes if s > 1])
            cublaslt.tune(layers, [self.max_num_tokens], reps=3, screen=False)
        except (RuntimeError, OSError) as e:  # no usable cuBLASLt: every product stays on F.linear
            cublaslt.clear_plans()
            logger.warning("GEMM tuning skipped: %s", e)
        torch.cuda.empty_cache()

    def _linear_weights(self) -> dict[tuple[int, int], list[torch.Tensor]]:
        """The weights that go through `linear()` without a bias, by shape (the GEMMs cublaslt.tune plans)."""
        shapes: dict[tuple[int, int], list[torch.Tensor]] = {}
        for module in self.model.modules():
            if isinstance(module, (ColumnParallelLinear, RowParallelLinear, ParallelLMHead)) \
                    and getattr(module, "bias", None) is None:
                shapes.setdefault(tuple(module.weight.shape), []).append(module.weight)
        return shapes

    def _mixed_num_reqs(self, num_tokens: int) -> int:
        """Request rows of a mixed-step graph of num_tokens tokens: every request has at least one."""
        return min(num_tokens, self.max_num_reqs)

    # ---- one step ------------------------------------------------------------------------------

    @torch.inference_mode()
    def launch_step(self, scheduler_output: SchedulerOutput, sample: bool = True) -> PendingStep:
        """Queues the step's device work and the copy of its sampled tokens to the host; returns at once.
        With sample=False only the forward pass is queued; sample() queues the rest once the grammar
        bitmask is known.

        Tokens still in flight from the previous step (async scheduling) are fed from the device."""
        self._update_states(scheduler_output)
        if scheduler_output.swap_out or scheduler_output.swap_in:
            self.copy_blocks(scheduler_output.swap_out, scheduler_output.swap_in)
        if scheduler_output.total_num_scheduled_tokens == 0:
            return PendingStep([], np.zeros(0, dtype=bool), None, None, {}, None)
        batch = self.batch
        rows = np.array(sorted(batch.index[r] for r in scheduler_output.num_scheduled_tokens), dtype=np.int64)
        num_scheduled = np.array([scheduler_output.num_scheduled_tokens[batch.req_ids[r]] for r in rows],
                                 dtype=np.int64)
        if num_scheduled.max() > 1 and (num_scheduled == 1).any():  # one-token requests first (num_decodes)
            order = np.argsort(num_scheduled > 1, kind="stable")
            rows, num_scheduled = rows[order], num_scheduled[order]
        num_reqs, num_tokens = len(rows), int(num_scheduled.sum())
        # Graphs cover steps where every row computes one token that is not a prompt position whose
        # logprob is still to report.
        decode_only = num_tokens == num_reqs and bool(
            (batch.num_computed_tokens[rows] >= batch.num_prompt_tokens[rows] - 1).all())
        graph_size = self.graphs.padded_size(num_reqs) if decode_only else None
        mixed_size = None if decode_only else self.mixed_graphs.padded_size(num_tokens)
        if graph_size is not None:
            padded_reqs = padded_tokens = graph_size
        elif mixed_size is not None:
            padded_reqs, padded_tokens = self._mixed_num_reqs(mixed_size), mixed_size
        else:
            padded_reqs, padded_tokens = num_reqs, num_tokens
        with step_timer.phase("prepare"):
            if self.inputs_copied is not None:
                self.inputs_copied.synchronize()
            attn_metadata = self._prepare_inputs(rows, num_scheduled, padded_reqs, padded_tokens)
            sampling_metadata = self._sampling_metadata(rows)
            if graph_size is None:
                self.logits_indices.np[:num_reqs] = self.query_start_loc.np[1:num_reqs + 1] - 1
                logits_indices = self.logits_indices.to_device(num_reqs)
            if self.device.type == "cuda":
                self.inputs_copied = torch.cuda.Event()
                self.inputs_copied.record()
        launch = "launch_graph" if graph_size is not None else "launch_mixed_graph" if mixed_size else "launch_eager"
        with step_timer.phase(launch):
            prompt_logprobs = {}
            if graph_size is not None:
                logits = self.graphs.replay(graph_size)[:num_reqs]
            else:
                logits_rows, logits_metadata = None, None
                if mixed_size is not None:
                    hidden_states = self.mixed_graphs.replay(mixed_size)
                else:
                    logits_rows, logits_metadata = self._logits_only(rows, attn_metadata, logits_indices)
                    with set_forward_context(attn_metadata, self.backend, logits_rows, logits_metadata):
                        hidden_states = self.model(self.input_ids.gpu[:num_tokens], self.positions.gpu[:num_tokens])
                if logits_rows is None:
                    prompt_logprobs = self._prompt_logprobs(rows, num_scheduled, hidden_states)
                    hidden_states = hidden_states[logits_indices]
                logits = self.model.compute_logits(hidden_states)
        done = batch.num_computed_tokens[rows] + num_scheduled >= batch.num_tokens[rows]
        pending = PendingStep([batch.req_ids[r] for r in rows], done, None, None, prompt_logprobs, None, logits,
                              sampling_metadata)
        if sample:
            self.sample(pending)
        return pending

    @torch.inference_mode()
    def sample(self, pending: PendingStep, grammar_bitmask: torch.Tensor | None = None) -> None:
        """Queues a launched step's sampling and the copy of the sampled tokens to the host. A grammar
        bitmask (host, int32, one row per request of the step, all ones for the unconstrained) limits
        each row to its allowed tokens."""
        if pending.logits is None:
            return
        with step_timer.phase("sample"):
            bitmask = None if grammar_bitmask is None else grammar_bitmask.to(self.device, non_blocking=True)
            out = self.sampler(pending.logits, pending.sampling_metadata, bitmask)
            pending.logits = pending.sampling_metadata = None
            if self.config.scheduler.async_scheduling:  # the next step may need these before the host has them
                self.last_sampled = out.sampled_token_ids
                self.last_sampled_index = {pending.req_ids[i]: i for i in np.nonzero(pending.done)[0].tolist()}
            host = [out.sampled_token_ids]
            if out.logprobs is not None:
                host += [out.logprob_token_ids, out.logprobs, out.sampled_ranks]
            pending.host = [t.to("cpu", non_blocking=True) for t in host]
            pending.sampler_output = out
            if self.device.type == "cuda":
                pending.event = torch.cuda.Event()
                pending.event.record()

    def finish_step(self, pending: PendingStep) -> ModelRunnerOutput:
        """Waits for a launched step's tokens and records them in the batch (rows may have moved since)."""
        if not pending.req_ids:
            return ModelRunnerOutput([], [], [])
        with step_timer.phase("wait"):
            if pending.event is not None:
                pending.event.synchronize()
            sampled = pending.host[0].tolist()
        with step_timer.phase("collect"):
            return self._collect(pending, sampled)

    def _update_states(self, so: SchedulerOutput) -> None:
        batch = self.batch
        for req_id in so.finished_req_ids:
            self.requests.pop(req_id, None)
            if req_id in batch.index:
                batch.remove(req_id)
        for req_id in so.preempted_req_ids:
            if req_id in batch.index:
                batch.remove(req_id)
        for new in so.scheduled_new_reqs:
            state = self.requests.get(new.req_id)
            if state is None:
                params = new.sampling_params
                generator = None
                if params.seed is not None:
                    generator = torch.Generator(device=self.device).manual_seed(params.seed)
                state = CachedRequestState(new.req_id, new.prompt_token_ids, list(new.output_token_ids), params,
                                           generator)
                self.requests[new.req_id] = state
            state.block_ids = list(new.block_ids)
            state.num_computed_tokens = new.num_computed_tokens
            batch.add(state)
        for cached in so.scheduled_cached_reqs:
            row = batch.index[cached.req_id]
            batch.num_computed_tokens[row] = cached.num_computed_tokens
            if cached.new_block_ids:
                batch.states[row].block_ids.extend(cached.new_block_ids)
                batch.append_blocks(row, cached.new_block_ids)

    def _prepare_inputs(self, rows: np.ndarray, num_scheduled: np.ndarray, padded_reqs: int,
                        padded_tokens: int) -> AttentionMetadata:
        """Fills the staged buffers for this step. Padding (for a graph's size): tokens past the real ones
        belong to no request and write no KV (slot -1); requests past the real ones have no tokens."""
        batch, bs = self.batch, self.block_size
        num_reqs = len(rows)
        cu_num_tokens = np.cumsum(num_scheduled)
        num_tokens = int(cu_num_tokens[-1])
        req_index = np.repeat(rows, num_scheduled)
        positions = self.positions.np[:padded_tokens]
        np.add(batch.num_computed_tokens[req_index], self._arange[:num_tokens]
               - np.repeat(cu_num_tokens - num_scheduled, num_scheduled), out=positions[:num_tokens])
        self.input_ids.np[:num_tokens] = batch.token_ids[req_index, positions[:num_tokens]]
        slots = self.slot_mapping.np
        slots[:num_tokens] = batch.block_table[req_index, positions[:num_tokens] // bs]
        slots[:num_tokens] = slots[:num_tokens] * bs + positions[:num_tokens] % bs
        seq_lens = self.seq_lens.np
        seq_lens[:num_reqs] = batch.num_computed_tokens[rows] + num_scheduled
        query_start_loc = self.query_start_loc.np
        query_start_loc[0] = 0
        query_start_loc[1:num_reqs + 1] = cu_num_tokens
        max_blocks = cdiv(int(seq_lens[:num_reqs].max()), bs)
        self.block_table.np[:num_reqs, :max_blocks] = batch.block_table[rows, :max_blocks]
        pad = slice(num_tokens, padded_tokens)
        positions[pad], self.input_ids.np[pad], slots[pad] = 0, 0, -1
        seq_lens[num_reqs:padded_reqs] = 0
        query_start_loc[num_reqs + 1:padded_reqs + 1] = num_tokens
        input_ids = self.input_ids.to_device(padded_tokens)
        in_flight = np.nonzero(positions[:num_tokens] >= batch.num_tokens[req_index])[0]
        if len(in_flight):  # async scheduling: last step's samples, not yet on the host
            sources = [self.last_sampled_index[batch.req_ids[r]] for r in req_index[in_flight].tolist()]
            self.in_flight_dst.np[:len(in_flight)] = in_flight
            self.in_flight_src.np[:len(in_flight)] = sources
            dst = self.in_flight_dst.to_device(len(in_flight))
            input_ids[dst] = self.last_sampled[self.in_flight_src.to_device(len(in_flight))]
        self.positions.to_device(padded_tokens)
        self.slot_mapping.to_device(padded_tokens)
        self.block_table.to_device(num_reqs)  # the padding requests' rows are never read
        max_query_len = int(num_scheduled.max())
        num_decodes = int((num_scheduled == 1).sum()) if max_query_len > 1 else 0
        if max_query_len == 1:
            decode_order = self._decode_order(self.decode_order, num_reqs, padded_tokens)
        else:  # the one-token requests of a mixed step (they come first) get a decode launch of their own
            decode_order = self._decode_order(self.decode_order, num_decodes, num_decodes) if num_decodes else None
        return AttentionMetadata(
            num_actual_tokens=num_tokens, num_reqs=padded_reqs, max_query_len=max_query_len,
            max_seq_len=int(seq_lens[:num_reqs].max()),
            query_start_loc=self.query_start_loc.to_device(padded_reqs + 1),
            seq_lens=self.seq_lens.to_device(padded_reqs), block_table=self.block_table.gpu[:padded_reqs],
            slot_mapping=self.slot_mapping.gpu[:padded_tokens],
            query_start_loc_cpu=self.query_start_loc.cpu[:padded_reqs + 1], seq_lens_cpu=self.seq_lens.cpu[:padded_reqs],
            num_decodes=num_decodes, decode_order=decode_order)

    def _logits_only(self, rows: np.ndarray, metadata: AttentionMetadata, logits_indices: torch.Tensor
                     ) -> tuple[torch.Tensor | None, AttentionMetadata | None]:
        """(logits rows, their attention metadata) for a forward pass whose last layer computes only the
        rows that get logits, or (None, None) where other rows are needed too (prompt logprobs) or there
        are no others (every request has one new token)."""
        n = metadata.num_reqs
        if metadata.num_actual_tokens == n or any(
                self.batch.states[r].sampling_params.prompt_logprobs is not None for r in rows.tolist()):
            return None, None
        # In the same order as a decode step (the longest first): the decode launch the CUDA graphs compiled,
        # not a variant compiled on the first prefill.
        return logits_indices, self._logits_metadata(metadata, self._decode_order(self.logits_order, n, n))

    def _logits_metadata(self, metadata: AttentionMetadata, decode_order: torch.Tensor) -> AttentionMetadata:
        """The last layer's attention metadata when only the logits rows attend: one query row per request
        (its last token), as in a decode step, over the step's keys."""
        n = metadata.num_reqs
        return AttentionMetadata(
            num_actual_tokens=n, num_reqs=n, max_query_len=1, max_seq_len=metadata.max_seq_len,
            query_start_loc=self.one_row_each_gpu[:n + 1], seq_lens=metadata.seq_lens, block_table=metadata.block_table,
            slot_mapping=metadata.slot_mapping[:n], query_start_loc_cpu=self.one_row_each[:n + 1],
            seq_lens_cpu=metadata.seq_lens_cpu, decode_order=decode_order)

    def _decode_order(self, staged: StagedBuffer, num_reqs: int, padded: int) -> torch.Tensor:
        """AttentionMetadata.decode_order for the first num_reqs staged seq_lens, staged in `staged`: the
        requests by ascending length (the longest start first), then the padding rows up to `padded`."""
        staged.np[:num_reqs] = np.argsort(self.seq_lens.np[:num_reqs], kind="stable")
        staged.np[num_reqs:padded] = self._arange[num_reqs:padded]
        return staged.to_device(padded)

    def _sampling_metadata(self, rows: np.ndarray) -> SamplingMetadata:
        batch = self.batch
        n = len(rows)

        def staged(name: str, values: np.ndarray) -> torch.Tensor:  # pinned, so the copy never syncs
            buffer = self.sampling_buffers[name]
            buffer.np[:n] = values
            return buffer.to_device(n)

        temperature = batch.temperature[rows]
        top_p, min_p, top_k = batch.top_p[rows], batch.min_p[rows], batch.top_k[rows]
        states = [batch.states[r] for r in rows]
        meta = SamplingMetadata(
            temperature=staged("temperature", temperature),
            top_p=staged("top_p", top_p) if (top_p < 1.0).any() else None,
            top_k=staged("top_k", np.where(top_k > 0, top_k, self.vocab_size)) if (top_k > 0).any() else None,
            min_p=staged("min_p", min_p) if (min_p > 0).any() else None,
            all_greedy=bool((temperature == 0).all()), all_random=bool((temperature > 0).all()))
        wants_penalties = False
        for i, state in enumerate(states):
            params = state.sampling_params
            if state.generator is not None:
                meta.generators[i] = state.generator
            if params.logprobs is not None:
                meta.max_num_logprobs = max(meta.max_num_logprobs or 0, params.logprobs)
            if params.logit_bias:
                meta.logit_bias.append((i, list(params.logit_bias), list(params.logit_bias.values())))
            if len(state.output_token_ids) < params.min_tokens and params.all_stop_token_ids:
                meta.min_tokens_masks.append((i, sorted(params.all_stop_token_ids)))
            wants_penalties |= (params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0
                                or params.presence_penalty != 0.0)
        if wants_penalties:
            self._penalty_metadata(meta, rows, states)
        return meta

    def _penalty_metadata(self, meta: SamplingMetadata, rows: np.ndarray, states: list[CachedRequestState]) -> None:
        batch = self.batch
        pad = self.vocab_size
        num_prompt, num_tokens = batch.num_prompt_tokens[rows], batch.num_tokens[rows]
        prompt = np.full((len(rows), max(1, int(num_prompt.max()))), pad, dtype=np.int64)
        output = np.full((len(rows), max(1, int((num_tokens - num_prompt).max()))), pad, dtype=np.int64)
        for i, row in enumerate(rows):
            prompt[i, :num_prompt[i]] = batch.token_ids[row, :num_prompt[i]]
            output[i, :num_tokens[i] - num_prompt[i]] = batch.token_ids[row, num_prompt[i]:num_tokens[i]]
        to = lambda a: torch.from_numpy(a).to(self.device)
        meta.prompt_token_ids, meta.output_token_ids = to(prompt), to(output)
        meta.repetition_penalties = to(batch.repetition_penalty[rows])
        meta.frequency_penalties = to(batch.frequency_penalty[rows])
        meta.presence_penalties = to(batch.presence_penalty[rows])

    def _prompt_logprobs(self, rows: np.ndarray, num_scheduled: np.ndarray,
                         hidden_states: torch.Tensor) -> dict[str, list[TokenLogprobs]]:
        """Logprobs of the prompt tokens whose predecessors are computed this step."""
        batch = self.batch
        result: dict[str, list[TokenLogprobs]] = {}
        start = 0
        for row, count in zip(rows.tolist(), num_scheduled.tolist()):
            state = batch.states[row]
            token_start, start = start, start + count
            k = state.sampling_params.prompt_logprobs
            # positions p in [first, last) predict prompt token p + 1; after a preemption the
            # recomputed positions that were already reported are skipped
            first = max(int(batch.num_computed_tokens[row]), state.num_prompt_logprobs_done)
            last = min(int(batch.num_computed_tokens[row]) + count, int(batch.num_prompt_tokens[row]) - 1)
            if k is None or last <= first:
                continue
            skip = first - int(batch.num_computed_tokens[row])
            logits = self.model.compute_logits(hidden_states[token_start + skip:token_start + skip + last - first])
            targets = torch.from_numpy(batch.token_ids[row, first + 1:last + 1].astype(np.int64)).to(self.device)
            ids, values, ranks = gather_logprobs(torch.log_softmax(logits.float(), dim=-1), targets, k)
            result[state.req_id] = list(zip(ids.tolist(), values.tolist(), ranks.tolist()))
            state.num_prompt_logprobs_done = last
        return result

    def _collect(self, pending: PendingStep, sampled: list[int]) -> ModelRunnerOutput:
        batch = self.batch
        logprob_lists = [t.tolist() for t in pending.host[1:]] if len(pending.host) > 1 else None
        sampled_ids, logprobs = [], []
        for i, req_id in enumerate(pending.req_ids):
            state = self.requests.get(req_id)
            if not pending.done[i] or state is None:  # a prompt chunk, or finished meanwhile
                sampled_ids.append([])
                logprobs.append(None)
                continue
            row = batch.index.get(req_id)
            if row is not None:
                batch.append_token(row, sampled[i])
            else:  # preempted since the launch
                state.output_token_ids.append(sampled[i])
            sampled_ids.append([sampled[i]])
            k = state.sampling_params.logprobs
            if k is not None and logprob_lists is not None:
                ids, values, ranks = logprob_lists
                logprobs.append((ids[i][:1 + k], values[i][:1 + k], ranks[i]))
            else:
                logprobs.append(None)
        return ModelRunnerOutput(pending.req_ids, sampled_ids, logprobs, pending.prompt_logprobs)


def _runs(ids: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """(position, first id, length) of each run of consecutive ids: [5, 6, 7, 2] -> [(0, 5, 3), (3, 2, 1)]."""
    runs: list[tuple[int, int, int]] = []
    for position, block_id in enumerate(ids):
        if runs and runs[-1][1] + runs[-1][2] == block_id:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((position, block_id, 1))
    return runs
