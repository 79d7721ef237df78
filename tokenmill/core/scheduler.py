"""The unified scheduler: each step hands out a token budget as {request_id: num_tokens}.

There are no prefill and decode phases. A request has `num_tokens` (prompt + output so far) and
`num_computed_tokens`; each step it gets up to the difference, limited by the budget. A long prompt
thus runs in chunks over several steps, mixed with other requests' decodes in the same batch.

Order of a step:
  1. running requests, oldest first; when blocks run out, the newest running request is preempted
     (blocks freed, state reset, back to the front of the waiting queue) until the allocation fits;
  2. if nothing was preempted, waiting requests in FCFS order, each after a prefix-cache lookup,
     while the budget, `max_num_seqs` and free blocks allow.

Speculative decoding: a decoding request's drafts (proposed by the runner from its last step) are scheduled
after its next token, within the budget, max_tokens and max_model_len; their slots are allocated like any
others, and the rejected ones are rolled back from num_computed_tokens when the step's tokens come in (their
blocks stay with the request; prefix caching hashes only tokens the request has, never drafts). The draft
policy (spec_decode/draft_policy.py) may give a request no drafts this step.

Async scheduling with speculation: a request whose previous step is still in flight is scheduled as if all
of that step's drafts will be accepted. Its tokens in flight (num_output_placeholders) count 1 + drafts, and
its next step gets DRAFT_PLACEHOLDERs (slots for up to k drafts, within the limits above counted with the
tokens in flight) that the runner fills with the drafts proposed after that step. When the step's tokens come
in, num_computed_tokens steps back over its rejected drafts, missing ones counted as rejected, and the
placeholders over everything the step could have emitted; the next step, already scheduled, starts where
the runner finds the request's true length:

    step n scheduled    computed c          -> c + 1 + k        in flight 1 + k   (all assumed accepted)
    step n+1 scheduled  computed c + 1 + k  -> c + 2 + 2k       in flight 2 + 2k  (k placeholders)
    step n's a drafts accepted              -> c + 2 + k + a    in flight 1 + k, tokens + 1 + a

Pipeline micro-batches (max_concurrent_batches > 1): several steps are in flight at once, so a step skips
the requests of the steps still in flight (`busy` until their results are in), preempts none of them, and
takes at most its share of the unfinished requests, so that the next step has some too.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from tokenmill.config import SchedulerConfig
from tokenmill.core.interface import (
    DRAFT_PLACEHOLDER,
    CachedRequestData,
    EngineCoreOutput,
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
    SchedulerStats,
)
from tokenmill.core.kv_cache_manager import KVCacheManager
from tokenmill.core.request import Request, RequestStatus
from tokenmill.spec_decode.draft_policy import DraftPolicy
from tokenmill.spec_decode.metrics import SpecDecodingStats


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache_manager: KVCacheManager) -> None:
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_model_len = config.max_model_len
        self.enable_chunked_prefill = config.enable_chunked_prefill
        self.async_scheduling = config.async_scheduling
        self.max_concurrent_batches = config.max_concurrent_batches
        self.busy: set[str] = set()  # requests of the steps in flight (pipeline micro-batches only)
        self.num_lookahead_slots = config.num_lookahead_slots
        self.num_speculative_tokens = config.num_speculative_tokens
        self.spec_stats = SpecDecodingStats(config.num_speculative_tokens) if config.num_speculative_tokens else None
        self.draft_policy = DraftPolicy(config.num_speculative_tokens, config.spec_disable_by_batch_size,
                                        config.spec_disable_by_acceptance_rate)
        self.kv = kv_cache_manager
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.finished_req_ids: set[str] = set()  # to tell the runner next step
        self.num_preemptions = 0
        self.num_sync_only_requests = 0  # requests that async scheduling cannot run ahead of
        self.num_structured_requests = 0  # requests with a grammar: the bitmask pass is skipped without any
        self.unreported: list[EngineCoreOutput] = []  # requests the scheduler itself ended, to report

    # ---- requests in and out -------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        if request.num_prompt_tokens > self.max_model_len:
            raise ValueError(f"prompt of {request.num_prompt_tokens} tokens is longer than "
                             f"max_model_len={self.max_model_len}")
        if not self.enable_chunked_prefill and request.num_prompt_tokens > self.max_num_batched_tokens:
            raise ValueError(f"prompt of {request.num_prompt_tokens} tokens exceeds max_num_batched_tokens="
                             f"{self.max_num_batched_tokens} and chunked prefill is off")
        self.requests[request.request_id] = request
        self.waiting.append(request)
        self.num_sync_only_requests += request.needs_sync_scheduling
        self.num_structured_requests += request.structured is not None

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> list[Request]:
        """Ends requests from outside (abort, or a stop string the frontend found)."""
        finished = []
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None or request.is_finished:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            request.status = status
            self._free(request)
            finished.append(request)
        return finished

    def _free(self, request: Request) -> None:
        self.num_sync_only_requests -= request.needs_sync_scheduling
        self.num_structured_requests -= request.structured is not None
        self.kv.free(request)
        self.draft_policy.forget(request.request_id)
        del self.requests[request.request_id]
        self.finished_req_ids.add(request.request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def has_work_for_a_step(self) -> bool:
        """Pipeline micro-batches: whether a step now could schedule a request or has news for the runners."""
        return (bool(self.waiting) or bool(self.finished_req_ids) or bool(self.unreported)
                or len(self.busy) < len(self.running))

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.requests)

    # ---- one step ------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        num_scheduled: dict[str, int] = {}
        new_reqs: list[NewRequestData] = []
        cached_reqs: list[CachedRequestData] = []
        preempted_ids: set[str] = set()
        spec_tokens: dict[str, list[int]] = {}
        pipelined = self.max_concurrent_batches > 1
        max_reqs = -(-len(self.requests) // self.max_concurrent_batches)  # a micro-batch's share

        num_running = len(self.running)
        index = 0
        while index < len(self.running) and budget > 0 and len(num_scheduled) < max_reqs:
            request = self.running[index]
            if request.request_id in self.busy:
                index += 1
                continue
            num_new = min(request.num_tokens + request.num_output_placeholders - request.num_computed_tokens, budget)
            if request.num_output_placeholders and (
                    request.num_output_tokens + request.num_output_placeholders >= request.max_tokens
                    or request.num_tokens + request.num_output_placeholders >= self.max_model_len):
                num_new = 0  # its last token is already in flight: it finishes when that comes back
            if num_new <= 0:
                index += 1
                continue
            drafts, request.spec_token_ids = request.spec_token_ids, []
            if num_new == 1 and self.num_speculative_tokens:  # drafts follow the next token, the sequence's last
                drafts = self._drafts(request, drafts, budget, num_running)
                num_new += len(drafts)
            else:
                drafts = []
            while True:
                new_blocks = self.kv.allocate_slots(request, num_new + self._lookahead(request, num_new))
                if new_blocks is not None:
                    break
                # Running requests are visited oldest first, so the newest one is never scheduled yet;
                # one in flight is not preempted (its step is writing its blocks).
                victim = next((r for r in reversed(self.running) if r.request_id not in self.busy), None)
                if victim is None:
                    break
                self.running.remove(victim)
                self._preempt(victim)
                preempted_ids.add(victim.request_id)
                if victim is request:
                    break
            if new_blocks is None:
                break
            num_scheduled[request.request_id] = num_new
            if drafts:
                spec_tokens[request.request_id] = drafts
            budget -= num_new
            cached = CachedRequestData(request.request_id, [b.block_id for b in new_blocks],
                                       request.num_computed_tokens)
            if pipelined:
                cached.new_token_ids = request.output_token_ids[request.num_output_tokens_sent:]
                request.num_output_tokens_sent = request.num_output_tokens
            cached_reqs.append(cached)
            index += 1

        compiling: list[Request] = []  # skipped for now, back to their place after the loop
        while (self.waiting and budget > 0 and not preempted_ids and len(self.running) < self.max_num_seqs
               and len(num_scheduled) < max_reqs):
            request = self.waiting[0]
            if request.num_output_placeholders:
                break  # preempted with a token in flight: admitted once its value is known
            if request.structured is not None and not request.structured.ready:
                compiling.append(self.waiting.popleft())  # its grammar is still compiling
                continue
            if request.structured is not None and request.structured.error:
                self.waiting.popleft()
                request.status = RequestStatus.FINISHED_ABORTED
                self._free(request)
                self.unreported.append(EngineCoreOutput(request.request_id, [], finish_reason="abort",
                                                        stop_reason=request.structured.error))
                continue
            computed_blocks, host_hit_ids, num_hit_tokens = [], [], 0
            if request.num_computed_tokens == 0:
                computed_blocks, host_hit_ids, num_hit_tokens = self.kv.get_computed_blocks(request)
            num_new = request.num_tokens - request.num_computed_tokens - num_hit_tokens
            if num_new > budget:
                if not self.enable_chunked_prefill:
                    break
                num_new = budget
            lookahead = self._lookahead(request, num_hit_tokens + num_new)
            if self.kv.allocate_slots(request, num_new + lookahead, computed_blocks, host_hit_ids) is None:
                break
            self.waiting.popleft()
            if request.num_computed_tokens == 0:
                self.kv.record_prefix_lookup(request.num_tokens, num_hit_tokens,
                                             len(host_hit_ids) * self.kv.block_size)
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_hit_tokens
            request.num_computed_tokens += num_hit_tokens
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            num_scheduled[request.request_id] = num_new
            budget -= num_new
            new_reqs.append(NewRequestData(
                request.request_id, request.prompt_token_ids, list(request.output_token_ids),
                request.sampling_params, self.kv.block_ids(request.request_id), request.num_computed_tokens))
            request.num_output_tokens_sent = request.num_output_tokens

        self.waiting.extendleft(reversed(compiling))
        for request_id, num_new in num_scheduled.items():
            request = self.requests[request_id]
            request.num_computed_tokens += num_new
            if self.async_scheduling and request.num_computed_tokens >= request.num_tokens + \
                    request.num_output_placeholders:
                request.num_output_placeholders += 1 + len(spec_tokens.get(request_id, ()))
        if pipelined:
            self.busy.update(num_scheduled)
        output = SchedulerOutput(new_reqs, cached_reqs, num_scheduled, sum(num_scheduled.values()),
                                 preempted_ids, self.finished_req_ids, *self.kv.take_block_copies(), spec_tokens)
        self.finished_req_ids = set()
        return output

    def _drafts(self, request: Request, proposed: list[int], budget: int, num_running: int) -> list[int]:
        """The drafts a decoding request verifies after its next token: those proposed after its last step, or
        placeholders while that step is in flight; none where the draft policy says so."""
        in_flight = request.num_output_placeholders
        if in_flight and request.structured is None:
            proposed = [DRAFT_PLACEHOLDER] * self.num_speculative_tokens
        room = min(budget, request.max_tokens - request.num_output_tokens - in_flight,
                   self.max_model_len - request.num_tokens - in_flight) - 1
        num_drafts = min(room, self.draft_policy.num_drafts(request.request_id, num_running))
        return proposed[:max(0, num_drafts)]

    def _lookahead(self, request: Request, num_new: int) -> int:
        """Slots past the step's `num_new` tokens for a draft model's guesses, within max_model_len."""
        room = self.max_model_len - request.num_computed_tokens - num_new
        return max(0, min(self.num_lookahead_slots, room))

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        request.spec_token_ids = []  # a draft model's probabilities for them are gone with the blocks
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    # ---- results -------------------------------------------------------------------------------

    def update_from_output(self, scheduler_output: SchedulerOutput,
                           runner_output: ModelRunnerOutput) -> list[EngineCoreOutput]:
        outputs, self.unreported = self.unreported, []
        self.busy.difference_update(scheduler_output.num_scheduled_tokens)
        spec_tokens = scheduler_output.scheduled_spec_decode_tokens
        if spec_tokens:
            self._roll_back_rejected(spec_tokens, runner_output)
        for i, request_id in enumerate(runner_output.req_ids):
            request = self.requests.get(request_id)
            if request is None:  # aborted while the step ran
                continue
            new_token_ids = runner_output.sampled_token_ids[i]
            if runner_output.spec_token_ids is not None and request.structured is None:
                request.spec_token_ids = runner_output.spec_token_ids[i]
            prompt_logprobs = runner_output.prompt_logprobs.get(request_id)
            if not new_token_ids and prompt_logprobs is None:
                continue  # a prompt chunk that produced nothing to report
            if new_token_ids and request.num_output_placeholders:  # all the step could have emitted
                request.num_output_placeholders -= 1 + len(spec_tokens.get(request_id, ()))
            queue = self.running if request.status == RequestStatus.RUNNING else self.waiting
            for num_kept, token_id in enumerate(new_token_ids, 1):
                request.append_output_token(token_id)
                if self._check_stop(request, token_id):
                    new_token_ids = new_token_ids[:num_kept]  # accepted drafts after a stop are not the output's
                    break
            logprobs = runner_output.logprobs[i]
            if logprobs is not None:
                logprobs = logprobs[:len(new_token_ids)]
            outputs.append(EngineCoreOutput(
                request_id, new_token_ids,
                new_logprobs=logprobs if logprobs is not None and new_token_ids else None,
                new_prompt_logprobs=prompt_logprobs,
                finish_reason=request.status.finish_reason, stop_reason=request.stop_reason,
                num_cached_tokens=max(request.num_cached_tokens, 0)))
            if request.is_finished:
                queue.remove(request)
                self._free(request)
        return outputs

    def _roll_back_rejected(self, spec_tokens: dict[str, list[int]], runner_output: ModelRunnerOutput) -> None:
        """Rejected drafts were computed but are not the sequence's: num_computed_tokens steps back over them
        (their KV slots are overwritten by the tokens that take their places), unless the request was
        preempted since (async scheduling). Placeholders the runner had no draft for count as rejected."""
        num_drafts, num_accepted = [], []
        for i, request_id in enumerate(runner_output.req_ids):
            drafts = spec_tokens.get(request_id)
            request = self.requests.get(request_id)
            if drafts is None or request is None or not runner_output.sampled_token_ids[i]:
                continue
            accepted = len(runner_output.sampled_token_ids[i]) - 1
            if request.status == RequestStatus.RUNNING:
                request.num_computed_tokens -= len(drafts) - accepted
            verified = len(drafts) if runner_output.num_draft_tokens is None else runner_output.num_draft_tokens[i]
            num_drafts.append(verified)
            num_accepted.append(accepted)
            self.draft_policy.observe(request_id, verified, accepted)
        self.spec_stats.observe(num_drafts, num_accepted)

    def _check_stop(self, request: Request, token_id: int) -> bool:
        params = request.sampling_params
        if request.structured is not None and request.structured.terminated:
            request.status = RequestStatus.FINISHED_STOPPED
            return True
        if request.num_output_tokens >= params.min_tokens and token_id in params.all_stop_token_ids:
            request.status = RequestStatus.FINISHED_STOPPED
            request.stop_reason = token_id if token_id in params.stop_token_ids else None
        elif request.num_output_tokens >= request.max_tokens or request.num_tokens >= self.max_model_len:
            request.status = RequestStatus.FINISHED_LENGTH_CAPPED
        return request.is_finished

    def needs_sync_scheduling(self) -> bool:
        return self.num_sync_only_requests > 0

    def stats(self) -> SchedulerStats:
        stats = SchedulerStats(len(self.running), len(self.waiting), self.kv.usage, self.num_preemptions,
                               self.kv.prefix_stats.queries, self.kv.prefix_stats.hits,
                               self.kv.prefix_stats.host_hits)
        if self.spec_stats is not None:
            spec = self.spec_stats
            stats.spec_decode_num_drafts, stats.spec_decode_num_draft_tokens = spec.num_drafts, spec.num_draft_tokens
            stats.spec_decode_num_accepted_tokens = spec.num_accepted_tokens
            stats.spec_decode_num_accepted_tokens_per_pos = tuple(spec.num_accepted_tokens_per_pos)
        return stats

    def check_integrity(self) -> None:
        self.kv.check_integrity()
        for request in self.running:
            assert request.status == RequestStatus.RUNNING, request
        for request in self.waiting:
            assert request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED), request
        assert len(self.running) + len(self.waiting) == len(self.requests)
