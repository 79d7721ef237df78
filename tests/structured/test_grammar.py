"""The grammar state the engine core reads beside the scheduler: which rows a grammar constrains and which
sampled tokens advance it (structured/grammar.py), on the CPU with a recording matcher."""

from __future__ import annotations

from concurrent.futures import Future

from tokenmill.config import SchedulerConfig
from tokenmill.core.interface import ModelRunnerOutput
from tokenmill.core.kv_cache_manager import KVCacheManager
from tokenmill.core.request import Request
from tokenmill.core.scheduler import Scheduler
from tokenmill.sampling_params import SamplingParams
from tokenmill.structured import grammar
from tokenmill.structured.grammar import StructuredRequest


class _RecordingMatcher:
    def __init__(self) -> None:
        self.accepted: list[int] = []

    def accept_token(self, token_id: int) -> bool:
        self.accepted.append(token_id)
        return True

    def is_terminated(self) -> bool:
        return False


def test_grammar_applies_only_after_the_reasoning_end_marker():
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_model_len=64, async_scheduling=False),
                          KVCacheManager(16, 4, False))
    request = Request("think", [100, 101, 102], SamplingParams(max_tokens=8), 8, 0.0)
    done = Future()
    done.set_result(None)
    request.structured = StructuredRequest(done, after_token_ids=[5, 6])
    request.structured.matcher = _RecordingMatcher()
    scheduler.add_request(request)
    for token in (1, 5, 2, 5, 6, 7, 8):
        out = scheduler.schedule()
        # masked only once the marker was generated: the token after "5, 6" is the first constrained one
        rows, _ = grammar.constrained_rows(scheduler.requests, list(out.num_scheduled_tokens), [True])
        assert bool(rows) == request.structured.active
        runner_output = ModelRunnerOutput(["think"], [[token]], [None])
        for g, t in zip(*grammar.tokens_to_accept(scheduler.requests, runner_output)):
            g.matcher.accept_token(t)
        scheduler.update_from_output(out, runner_output)
    assert request.structured.matcher.accepted == [7, 8]
