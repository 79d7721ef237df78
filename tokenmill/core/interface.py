"""Plain-data messages between the scheduler, the model runner and the frontend (no tensors)."""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.sampling_params import SamplingParams

# Async scheduling with speculation: the drafts of a request whose previous step is still in flight are not
# known when its next step is scheduled; the scheduler sends this many placeholders, slots reserved for them,
# and the runner puts in their place the drafts proposed after that step (up to as many).
DRAFT_PLACEHOLDER = -1

# One position's logprobs: token ids and logprobs, the sampled (or prompt) token first, then the
# top-k in descending order; and the rank of the first token among all tokens (1 = most likely).
TokenLogprobs = tuple[list[int], list[float], int]


@dataclass
class EngineCoreRequest:
    """What the frontend sends the engine core: tokenized and validated."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float | None = None


@dataclass
class NewRequestData:
    """A request the runner has not seen, or one resumed after preemption, sent in full."""

    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # non-empty only when resumed after preemption
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int


@dataclass
class CachedRequestData:
    """A request the runner already holds: only what changed."""

    req_id: str
    new_block_ids: list[int]
    num_computed_tokens: int
    # Pipeline micro-batches: the tokens sampled since the runners last saw the request (the last stage
    # samples, and the first embeds them); otherwise the runners record their own samples.
    new_token_ids: list[int] = field(default_factory=list)


@dataclass
class SchedulerOutput:
    scheduled_new_reqs: list[NewRequestData]
    scheduled_cached_reqs: list[CachedRequestData]
    num_scheduled_tokens: dict[str, int]  # req_id -> tokens to compute this step
    total_num_scheduled_tokens: int
    preempted_req_ids: set[str]  # the runner drops their rows and blocks, keeps their state
    finished_req_ids: set[str]  # the runner forgets them entirely
    # KV host tier, done before the forward pass in this order: (device block, host block) copies out
    # of blocks the pool evicted, then (host block, device block) copies in of prefix hits found there.
    swap_out: list[tuple[int, int]] = field(default_factory=list)
    swap_in: list[tuple[int, int]] = field(default_factory=list)
    # Speculative decoding: the draft tokens each request verifies after its next token (counted in
    # num_scheduled_tokens, as 1 + len(drafts)), or DRAFT_PLACEHOLDERs.
    scheduled_spec_decode_tokens: dict[str, list[int]] = field(default_factory=dict)

    @classmethod
    def make_empty(cls) -> SchedulerOutput:
        return cls([], [], {}, 0, set(), set())


@dataclass
class ModelRunnerOutput:
    req_ids: list[str]  # the scheduled requests, in batch order
    # [num_reqs][0 ..]: empty while a prompt is still being chunked; one token, or with drafts the accepted
    # ones and the token after them
    sampled_token_ids: list[list[int]]
    logprobs: list[list[TokenLogprobs] | None]  # [num_reqs], for requests that asked: one per sampled token
    prompt_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)  # new prompt positions
    spec_token_ids: list[list[int]] | None = None  # [num_reqs]: drafts proposed for each request's next step
    num_draft_tokens: list[int] | None = None  # [num_reqs]: drafts each row verified (with speculation)


@dataclass
class EngineCoreOutput:
    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None = None
    new_prompt_logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class SchedulerStats:
    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    kv_cache_usage: float = 0.0
    num_preemptions: int = 0  # cumulative
    prefix_cache_queries: int = 0  # cumulative tokens
    prefix_cache_hits: int = 0  # cumulative tokens
    prefix_cache_host_hits: int = 0  # cumulative tokens, of the hits, copied back from the host tier
    # Speculative decoding, cumulative: requests x steps that verified drafts, drafts verified, drafts accepted,
    # and accepted drafts by position (one per speculative token)
    spec_decode_num_drafts: int = 0
    spec_decode_num_draft_tokens: int = 0
    spec_decode_num_accepted_tokens: int = 0
    spec_decode_num_accepted_tokens_per_pos: tuple[int, ...] = ()
