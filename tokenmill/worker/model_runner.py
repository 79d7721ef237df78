"""The model runner: runs one step of the model over the persistent batch. It orchestrates; each job has
its own file:

    input_batch.py      the persistent batch and the scheduler's differences applied to it
    step_inputs.py      the staged input buffers and the step's AttentionMetadata
    sampling_inputs.py  the step's SamplingMetadata
    kv_cache.py         the paged KV cache and its host tier
    cuda_graphs.py      decode and mixed-step CUDA graphs
    memory.py, warm_up.py   start-up: KV sizing, GEMM tuning, warm-up steps
    step_outputs.py     prompt logprobs, and sampled tokens into ModelRunnerOutput

A step, without waiting for the device until its end:

    execute_model(SchedulerOutput) -> StepInfo      differences applied, host-tier copies queued, inputs
                                                    staged, forward pass queued (a CUDA graph when one fits);
                                                    logits only at each request's last scheduled row
    sample_tokens(grammar_bitmask)                  sampling of that step queued, and the copy of its tokens
                                                    to the host (the engine fills a grammar bitmask between)
    finish_step() -> ModelRunnerOutput              the oldest sampled step: waits for its tokens, records them

With async scheduling the next step is executed before the previous one is finished: its tokens still
in flight are fed to it on the device.

Speculative decoding (n-gram, draft model, EAGLE, MTP): finish_step() proposes each request's drafts from its
tokens so far and returns them; the scheduler sends them back with the request's next step, whose logits cover the
next token and every draft, and sample_tokens() verifies them with the rejection sampler (accepted drafts plus one
token). With async scheduling the next step is scheduled before those drafts are verified, with placeholder
drafts: execute_model() first collects the step in flight (waits for its tokens, records them and proposes;
finish_step() later returns that output), then resumes each request from its true length and puts the new
proposals in the placeholders' place (_place_drafts). The device waits for the host while a step's inputs are
prepared, but the scheduling, the update and the output processing of the engine overlap its work. An EAGLE or
MTP head also reads the target's hidden states of each step's rows, handed over after the forward pass (such a
target's steps replay the mixed-step graphs, which return them; the decode graphs return logits only).

Pipeline stages (micro-batches in flight, each of other requests): every stage executes each step, the
hidden states passing from stage to stage; sample_tokens() on the last stage samples, waits for the tokens
and returns the step's output at once (to the engine, which sends the tokens back in the scheduler's next
output for the request); on the other stages it does nothing.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from tokenmill.attention.backend import AttentionMetadata, default_backend_name, get_backend
from tokenmill.config import EngineConfig
from tokenmill.core.interface import DRAFT_PLACEHOLDER, ModelRunnerOutput, SchedulerOutput, TokenLogprobs
from tokenmill.core.kv_cache_manager import cdiv
from tokenmill.distributed.parallel_state import is_last_stage
from tokenmill.forward_context import set_forward_context
from tokenmill.layers.attention import Attention
from tokenmill.layers.sampler import Sampler, SamplerOutput, SamplingMetadata, gather_logprobs
from tokenmill.loader.model_loader import load_model
from tokenmill.metrics import step_timer
from tokenmill.source import ModelSource
from tokenmill.spec_decode.draft_model import DraftModelProposer, load_draft_model
from tokenmill.spec_decode.eagle import EagleProposer, load_eagle_head
from tokenmill.spec_decode.mtp import load_mtp_head
from tokenmill.spec_decode.ngram import NgramProposer
from tokenmill.spec_decode.rejection_sampler import RejectionSampler
from tokenmill.worker.cuda_graphs import CudaGraphs, capture_sizes, mixed_capture_sizes, mixed_num_reqs
from tokenmill.worker.input_batch import CachedRequestState, InputBatch, update_states
from tokenmill.worker.kv_cache import KVCache
from tokenmill.worker.sampling_inputs import SamplingInputs
from tokenmill.worker.step_inputs import StepInputs, made_up_metadata
from tokenmill.worker.step_outputs import collect_sampled, compute_prompt_logprobs


@dataclass
class StepInfo:
    """What the engine learns of an executed step (plain data, the same on every rank)."""

    req_ids: list[str]  # the scheduled requests, in batch order
    samples: np.ndarray  # [num_reqs] bool: the request's sample is a next token (not a prompt chunk's)


@dataclass
class _Launched:
    """A step whose device work is queued: what sampling and finishing it need."""

    info: StepInfo
    prompt_logprobs: dict[str, list[TokenLogprobs]]
    logits: torch.Tensor | None  # [num_reqs, vocab] until sampled
    sampling_metadata: SamplingMetadata | None
    host: list[torch.Tensor] | None = None  # sampled ids (+ logprob ids, logprobs, ranks), copying to the host
    event: torch.cuda.Event | None = None  # recorded after those copies were queued
    sampler_output: SamplerOutput | None = None  # keeps the device tensors alive until the copies finish
    num_drafts: np.ndarray | None = None  # [num_reqs] speculative drafts verified by this step, if any
    draft_token_ids: torch.Tensor | None = None  # [sum(num_drafts)] on the device
    num_emitted: torch.Tensor | None = None  # [num_reqs] tokens per row of the verified sampled_token_ids (host)


class ModelRunner:
    def __init__(self, config: EngineConfig, source: ModelSource, device: torch.device, dtype: torch.dtype,
                 kv_cache_dtype: torch.dtype | None = None) -> None:
        """kv_cache_dtype: the KV cache's, when not the model's (FP8)."""
        self.config = config
        self.device, self.dtype = device, dtype
        self.block_size = config.cache.block_size
        self.max_model_len = config.scheduler.max_model_len
        self.max_num_reqs = config.scheduler.max_num_seqs
        self.max_num_tokens = config.scheduler.max_num_batched_tokens
        self.vocab_size = source.hf_config.vocab_size
        self.async_scheduling = config.scheduler.async_scheduling
        self.pipelined = config.parallel.pipeline_parallel_size > 1
        self.model = load_model(source, config.model, dtype, device)
        self.kv_cache = KVCache([m for m in self.model.modules() if isinstance(m, Attention)], self.block_size,
                                kv_cache_dtype or dtype, device)
        self.backend = get_backend(config.attention_backend or default_backend_name(device))
        self.sampler = Sampler()
        spec = config.speculative_config
        self.proposer: NgramProposer | DraftModelProposer | None = None
        if spec is not None:
            spec.check_target(config.parallel.tensor_parallel_size, self.max_model_len)
        if spec is not None and spec.method == "ngram":
            self.proposer = NgramProposer(spec.prompt_lookup_min, spec.prompt_lookup_max, spec.num_speculative_tokens,
                                          self.max_model_len)
        elif spec is not None and spec.method in ("eagle", "eagle3", "mtp"):
            head = load_mtp_head(config, source, self.model, device, dtype) if spec.method == "mtp" else \
                load_eagle_head(config, self.model, device, dtype)
            self.proposer = EagleProposer(config, self.model, head, device, self.kv_cache.dtype, self.backend)
        elif spec is not None:
            self.proposer = DraftModelProposer(config, load_draft_model(config, self.vocab_size, device, dtype),
                                               device, self.kv_cache.dtype, self.backend)
        self.rejection_sampler = RejectionSampler()
        self.max_blocks_per_req = cdiv(self.max_model_len, self.block_size)
        self.batch = InputBatch(self.max_num_reqs, self.max_model_len, self.max_blocks_per_req)
        self.states: dict[str, CachedRequestState] = {}
        self.inputs = StepInputs(self.max_num_reqs, self.max_num_tokens, self.max_blocks_per_req, self.block_size,
                                 device)
        self.sampling_inputs = SamplingInputs(self.max_num_reqs, self.vocab_size, device)
        # Recorded once a step's host-to-device input copies are queued: the pinned buffers are refilled
        # only after the device has read them (async scheduling runs a step ahead of the device).
        self.inputs_copied: torch.cuda.Event | None = None
        # The last sampled step's tokens on the device, and each request's row there (async scheduling).
        self.last_sampled: torch.Tensor | None = None
        self.last_sampled_index: dict[str, int] = {}
        use_graphs = device.type == "cuda" and not config.enforce_eager and self.backend.supports_cuda_graphs
        # An EAGLE head reads the target's hidden states of every row, which the decode graphs do not return:
        # its steps, decode-only ones too, replay the mixed graphs, which return them.
        decode_graphs = use_graphs and not isinstance(self.proposer, EagleProposer)
        self.graphs = CudaGraphs("decode", capture_sizes(self.max_num_reqs) if decode_graphs else [])
        self.mixed_graphs = CudaGraphs("mixed", mixed_capture_sizes(self.max_num_tokens) if use_graphs else [])
        self._unsampled: _Launched | None = None
        self._sampled: deque[_Launched] = deque()
        # Speculation with async scheduling: steps collected early (execute_model needs their drafts), for
        # finish_step to return in order, and the last collected step's proposals by request.
        self._finished: deque[ModelRunnerOutput] = deque()
        self._proposed: dict[str, list[int]] = {}
        # Set by calculate_kv_scales: the next step runs eagerly, its attention layers measuring the scales.
        self.kv_scales_pending = False
        # execute_dummy's (metadata, input ids, positions), made at its first call
        self._dummy_inputs: tuple[AttentionMetadata, torch.Tensor, torch.Tensor] | None = None

    def kv_bytes_per_block(self) -> int:
        """A block of the KV pool: the model's layers, and a draft model's."""
        draft = self.proposer.kv_cache.bytes_per_block() if isinstance(self.proposer, DraftModelProposer) else 0
        return self.kv_cache.bytes_per_block() + draft

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.kv_cache.allocate(num_blocks)
        if isinstance(self.proposer, DraftModelProposer):
            self.proposer.kv_cache.allocate(num_blocks)

    def calculate_kv_scales(self) -> None:
        """The FP8 cache's scales from the next step's keys and values (after warm-up, so from real ones)."""
        for layer in self.kv_cache.attn_layers:
            layer.calculate_kv_scales = True
        self.kv_scales_pending = True

    # ---- one step ------------------------------------------------------------------------------

    @torch.inference_mode()
    def execute_model(self, scheduler_output: SchedulerOutput) -> StepInfo:
        """Queues the step's forward pass and returns at once; sample_tokens() queues its sampling."""
        assert self._unsampled is None, "the previous step was not sampled"
        # Async scheduling: this step's drafts come from the step in flight, whose proposals are made now, only
        # for the requests this step gives drafts (the draft policy may have paused the others).
        if self.proposer is not None and self._sampled:
            drafting = set(scheduler_output.scheduled_spec_decode_tokens)
            while self._sampled:
                self._finished.append(self._collect(self._sampled.popleft(), drafting))
        update_states(self.batch, self.states, scheduler_output, self.device)
        if isinstance(self.proposer, DraftModelProposer):
            for req_id in scheduler_output.finished_req_ids | scheduler_output.preempted_req_ids:
                self.proposer.forget(req_id)
        spec_tokens, num_scheduled_tokens = self._place_drafts(scheduler_output)
        if scheduler_output.swap_out or scheduler_output.swap_in:
            self.kv_cache.copy_blocks(scheduler_output.swap_out, scheduler_output.swap_in)
        if scheduler_output.total_num_scheduled_tokens == 0:
            self._unsampled = _Launched(StepInfo([], np.zeros(0, dtype=bool)), {}, None, None)
            return self._unsampled.info
        batch = self.batch
        rows = np.array(sorted(batch.index[r] for r in num_scheduled_tokens), dtype=np.int64)
        num_scheduled = np.array([num_scheduled_tokens[batch.req_ids[r]] for r in rows], dtype=np.int64)
        if num_scheduled.max() > 1 and (num_scheduled == 1).any():  # one-token requests first (num_decodes)
            order = np.argsort(num_scheduled > 1, kind="stable")
            rows, num_scheduled = rows[order], num_scheduled[order]
        num_reqs, num_tokens = len(rows), int(num_scheduled.sum())
        num_drafts = None
        if spec_tokens:
            num_drafts = np.array([len(spec_tokens.get(batch.req_ids[r], ())) for r in rows], dtype=np.int64)
        # Graphs cover steps where every row computes one token that is not a prompt position whose
        # logprob is still to report.
        decode_only = num_tokens == num_reqs and bool(
            (batch.num_computed_tokens[rows] >= batch.num_prompt_tokens[rows] - 1).all())
        graph_size = self.graphs.padded_size(num_reqs) if decode_only and not self.kv_scales_pending else None
        mixed_size = None if graph_size is not None or self.kv_scales_pending \
            else self.mixed_graphs.padded_size(num_tokens)
        self.kv_scales_pending = False
        if graph_size is not None:
            padded_reqs = padded_tokens = graph_size
        elif mixed_size is not None:
            padded_reqs, padded_tokens = mixed_num_reqs(mixed_size, self.max_num_reqs), mixed_size
        else:
            padded_reqs, padded_tokens = num_reqs, num_tokens
        with step_timer.phase("prepare"):
            if self.inputs_copied is not None:
                self.inputs_copied.synchronize()
            # With speculation every token is on the host by now (the step in flight was collected above).
            in_flight = None if self.proposer is not None else self.last_sampled
            attn_metadata = self.inputs.prepare(batch, rows, num_scheduled, padded_reqs, padded_tokens,
                                                in_flight, self.last_sampled_index)
            sampling_metadata = self.sampling_inputs.build(batch, rows)
            if graph_size is None:
                logits_indices = self.inputs.stage_logits_indices(num_reqs, num_drafts)
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
                    if isinstance(self.proposer, EagleProposer):  # (hidden states, the head's features)
                        hidden_states, features = hidden_states
                        # the graph's output buffers are overwritten by its next replay
                        self._keep_hidden(rows, num_scheduled, features[:num_tokens].clone())
                else:
                    logits_rows, logits_metadata = (None, None) if num_drafts is not None else \
                        self._logits_only(rows, attn_metadata, logits_indices)
                    with set_forward_context(attn_metadata, self.backend, logits_rows, logits_metadata):
                        hidden_states = self.model(self.inputs.input_ids.gpu[:num_tokens],
                                                   self.inputs.positions.gpu[:num_tokens])
                    if isinstance(self.proposer, EagleProposer):
                        self._keep_hidden(rows, num_scheduled, self.proposer.features(hidden_states))
                if hidden_states is None:  # a pipeline stage before the last: the last samples
                    logits = None
                else:
                    if logits_rows is None:
                        prompt_logprobs = compute_prompt_logprobs(self.model, batch, rows, num_scheduled,
                                                                  hidden_states, self.device)
                        hidden_states = hidden_states[logits_indices]
                    logits = self.model.compute_logits(hidden_states)
        samples = batch.num_computed_tokens[rows] + num_scheduled >= batch.num_tokens[rows]
        self._unsampled = _Launched(StepInfo([batch.req_ids[r] for r in rows], samples), prompt_logprobs, logits,
                                    sampling_metadata)
        if num_drafts is not None:
            self._unsampled.num_drafts = num_drafts
            draft_ids = [t for r in rows for t in spec_tokens.get(batch.req_ids[r], ())]
            self._unsampled.draft_token_ids = torch.tensor(draft_ids, dtype=torch.int64).to(self.device,
                                                                                            non_blocking=True)
        return self._unsampled.info

    @torch.inference_mode()
    def execute_dummy(self) -> None:
        """A forward pass of one made-up token that reads block 0 and writes no slot: the step of a core with
        nothing scheduled while the other cores' steps need the experts it holds. Its inputs are made once."""
        if self._dummy_inputs is None:
            metadata, positions = made_up_metadata([1], [1], torch.zeros(1, 1, dtype=torch.int32),
                                                   torch.full((1,), -1, dtype=torch.int64), self.max_model_len,
                                                   self.device)
            self._dummy_inputs = (metadata, torch.zeros(1, dtype=torch.int64, device=self.device), positions)
        metadata, input_ids, positions = self._dummy_inputs
        with set_forward_context(metadata, self.backend):
            self.model(input_ids, positions)

    def _place_drafts(self, scheduler_output: SchedulerOutput) -> tuple[dict[str, list[int]], dict[str, int]]:
        """Writes each request's drafts after its last token (where the inputs are read from) and returns them
        with the step's token counts. With async scheduling the scheduler counted the drafts of the step
        collected at this one's start as all accepted: a request resumes from its true length, the token
        that step sampled last (every token is on the host now), and its placeholder drafts become the
        proposals of that step, as many as fit the slots reserved."""
        spec_tokens, num_scheduled_tokens = {}, scheduler_output.num_scheduled_tokens
        batch = self.batch
        if self.proposer is not None and num_scheduled_tokens:
            rows = np.fromiter((batch.index[r] for r in num_scheduled_tokens), np.int64, len(num_scheduled_tokens))
            batch.num_computed_tokens[rows] = np.minimum(batch.num_computed_tokens[rows], batch.num_tokens[rows] - 1)
        for req_id, drafts in scheduler_output.scheduled_spec_decode_tokens.items():
            row = batch.index[req_id]
            if drafts[0] == DRAFT_PLACEHOLDER:
                if num_scheduled_tokens is scheduler_output.num_scheduled_tokens:
                    num_scheduled_tokens = dict(num_scheduled_tokens)
                drafts = self._proposed.get(req_id, [])[:len(drafts)]
                num_scheduled_tokens[req_id] = 1 + len(drafts)
            if drafts:
                batch.token_ids[row, batch.num_tokens[row]:batch.num_tokens[row] + len(drafts)] = drafts
                spec_tokens[req_id] = drafts
        return spec_tokens, num_scheduled_tokens

    def _keep_hidden(self, rows: np.ndarray, num_scheduled: np.ndarray, features: torch.Tensor) -> None:
        """Hands the EAGLE head what it reads of this step's rows (batch rows `rows`, in order)."""
        batch = self.batch
        self.proposer.keep_hidden([batch.req_ids[r] for r in rows.tolist()], batch.num_computed_tokens[rows],
                                  num_scheduled, features)

    def _logits_only(self, rows: np.ndarray, metadata: AttentionMetadata, logits_indices: torch.Tensor
                     ) -> tuple[torch.Tensor | None, AttentionMetadata | None]:
        """(logits rows, their attention metadata) for a forward pass whose last layer computes only the
        rows that get logits, or (None, None) where other rows are needed too (prompt logprobs) or there
        are no others (every request has one new token)."""
        n = metadata.num_reqs
        if isinstance(self.proposer, EagleProposer) and self.proposer.reads_all_rows:
            return None, None
        if metadata.num_actual_tokens == n or any(
                self.batch.states[r].sampling_params.prompt_logprobs is not None for r in rows.tolist()):
            return None, None
        # In the same order as a decode step (the longest first): the decode launch the CUDA graphs compiled,
        # not a variant compiled on the first prefill.
        order = self.inputs.stage_decode_order(self.inputs.logits_order, n, n)
        return logits_indices, self.inputs.logits_metadata(metadata, order)

    @torch.inference_mode()
    def sample_tokens(self, grammar_bitmask: torch.Tensor | None = None) -> ModelRunnerOutput | None:
        """Queues the sampling of the executed step and the copy of its tokens to the host. A grammar
        bitmask (host, int32, one row per request of the step, all ones for the unconstrained) limits each
        row to its allowed tokens. A pipeline's last stage then finishes the step and returns its output; the
        stages before it have nothing to sample."""
        launched, self._unsampled = self._unsampled, None
        if self.pipelined and not is_last_stage():
            return None
        self._sampled.append(launched)
        if launched.info.req_ids:
            self._sample(launched, grammar_bitmask)
        return self.finish_step() if self.pipelined else None

    def _sample(self, launched: _Launched, grammar_bitmask: torch.Tensor | None) -> None:
        with step_timer.phase("sample"):
            bitmask = None if grammar_bitmask is None else grammar_bitmask.to(self.device, non_blocking=True)
            if launched.num_drafts is not None:
                out = self._verify_drafts(launched, bitmask)
            else:
                out = self.sampler(launched.logits, launched.sampling_metadata, bitmask)
            launched.logits = launched.sampling_metadata = None
            if self.async_scheduling:  # the next step may need these before the host has them
                self.last_sampled = out.sampled_token_ids
                req_ids = launched.info.req_ids
                self.last_sampled_index = {req_ids[i]: i for i in np.nonzero(launched.info.samples)[0].tolist()}
            host = [out.sampled_token_ids]
            if launched.num_emitted is not None:
                launched.num_emitted = launched.num_emitted.to("cpu", non_blocking=True)
            if out.logprobs is not None:
                host += [out.logprob_token_ids, out.logprobs, out.sampled_ranks]
            launched.host = [t.to("cpu", non_blocking=True) for t in host]
            launched.sampler_output = out
            if self.device.type == "cuda":
                launched.event = torch.cuda.Event()
                launched.event.record()

    def _verify_drafts(self, launched: _Launched, bitmask: torch.Tensor | None) -> SamplerOutput:
        """The rejection sampler over the step's logits rows (each request's next token and its drafts):
        sampled_token_ids becomes [num_reqs, 1 + most drafts] (the accepted drafts, the token after them, then
        -1; launched.num_emitted counts them), and with logprobs those of every row's emitted token."""
        num_drafts, meta = launched.num_drafts, launched.sampling_metadata
        logits = launched.logits.float()
        if bitmask is not None:  # a grammar's rows (never drafting) onto their logits rows
            import xgrammar as xgr

            xgr.apply_token_bitmask_inplace(logits, bitmask[torch.from_numpy(np.repeat(
                np.arange(len(num_drafts)), num_drafts + 1)).to(self.device)])
        raw_logprobs = torch.log_softmax(logits, dim=-1) if meta.max_num_logprobs is not None else None
        states = [self.states[req_id] for req_id in launched.info.req_ids]
        min_tokens_left = {i: states[i].sampling_params.min_tokens - len(states[i].output_token_ids)
                           for i, _ in meta.min_tokens_masks}
        draft_probs = None
        if isinstance(self.proposer, DraftModelProposer) and not meta.all_greedy:
            # the draft's q of each verified draft (zeros for greedy requests, which do not read them)
            parts = []
            for req_id, n in zip(launched.info.req_ids, num_drafts.tolist()):
                q = self.proposer.probs.pop(req_id, None)
                parts.append(q[:n] if q is not None else logits.new_zeros(n, logits.shape[-1]))
            draft_probs = torch.cat(parts)
        result = self.rejection_sampler(logits, launched.draft_token_ids, num_drafts.tolist(), draft_probs, meta,
                                        min_tokens_left)
        out = SamplerOutput(result.token_ids)
        if raw_logprobs is not None:  # row j of request i: the token emitted j-th (any past the last)
            emitted = result.token_ids[result.layout.request_of_row, result.layout.position_of_row].clamp(min=0)
            out.logprob_token_ids, out.logprobs, out.sampled_ranks = gather_logprobs(
                raw_logprobs, emitted, meta.max_num_logprobs)
        launched.num_emitted = result.num_tokens
        return out

    def finish_step(self) -> ModelRunnerOutput:
        """The oldest sampled step's output (see _collect), collected now or already by execute_model."""
        return self._finished.popleft() if self._finished else self._collect(self._sampled.popleft())

    def _collect(self, launched: _Launched, drafting: set[str] | None = None) -> ModelRunnerOutput:
        """Waits for a sampled step's tokens and records them in the batch (rows may have moved since);
        requests whose prompt is not yet fully computed discard their sample. With speculative decoding, then
        proposes each request's drafts for its next step (only for those in `drafting`, when the next step is
        already scheduled)."""
        if not launched.info.req_ids:
            return ModelRunnerOutput([], [], [])
        host = launched.host
        with step_timer.phase("wait"):
            if launched.event is not None:
                launched.event.synchronize()
            if launched.num_emitted is None:
                sampled = [[token_id] for token_id in host[0].tolist()]
            else:
                sampled = [row[:n] for row, n in zip(host[0].tolist(), launched.num_emitted.tolist())]
        with step_timer.phase("collect"):
            logprob_lists = [t.tolist() for t in host[1:]] if len(host) > 1 else None
            starts = None if launched.num_drafts is None else \
                (np.cumsum(launched.num_drafts + 1) - launched.num_drafts - 1).tolist()
            output = collect_sampled(self.batch, self.states, launched.info.req_ids, launched.info.samples, sampled,
                                     logprob_lists, launched.prompt_logprobs, record=not self.pipelined,
                                     logprob_starts=starts)
            if self.proposer is not None:
                output.num_draft_tokens = launched.num_drafts.tolist() if launched.num_drafts is not None \
                    else [0] * len(launched.info.req_ids)
        if self.proposer is not None:
            with step_timer.phase("propose"):
                output.spec_token_ids = self._propose(output, drafting)
                self._proposed = dict(zip(output.req_ids, output.spec_token_ids))
        return output

    def _propose(self, output: ModelRunnerOutput, drafting: set[str] | None = None) -> list[list[int]]:
        """Drafts for the requests that just sampled, from their tokens so far (none for a grammar-constrained
        request, whose drafts the scheduler would drop, nor while a request still reports prompt logprobs, nor
        for one outside `drafting` if given: a draft model or head catches up on its tokens when it drafts
        again)."""
        batch = self.batch
        rows, positions = [], []
        for i, (req_id, tokens) in enumerate(zip(output.req_ids, output.sampled_token_ids)):
            if drafting is not None and req_id not in drafting:
                continue
            row = batch.index.get(req_id)
            params = batch.states[row].sampling_params if row is not None else None
            if tokens and params is not None and params.prompt_logprobs is None and params.structured_outputs is None:
                rows.append(row)
                positions.append(i)
            elif tokens and isinstance(self.proposer, DraftModelProposer):  # what it kept for the request
                self.proposer.forget(req_id)
        proposals = [[] for _ in output.req_ids]
        if not rows:
            return proposals
        if isinstance(self.proposer, DraftModelProposer):
            found = self.proposer.propose(batch, rows, self.sampling_inputs.build(batch, np.array(rows)))
        else:
            drafts, counts = self.proposer.propose(batch.token_ids[:batch.num_reqs],
                                                   batch.num_tokens[:batch.num_reqs])
            found = [drafts[row, :counts[row]].tolist() for row in rows]
        for i, drafts_of_row in zip(positions, found):
            proposals[i] = drafts_of_row
        return proposals
