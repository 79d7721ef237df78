"""Dynamic draft length: which requests verify drafts this step. Speculation pays while drafts are accepted
and the step is memory-bound; otherwise each draft is a wasted row of the target's forward pass. Two rules,
both off by default (then every decoding request verifies up to k drafts, as in vLLM without them):

  - disable_by_batch_size (vLLM's key): with more running requests than this, the step verifies no drafts
    (a large batch makes the step compute-bound, where draft rows cost as much as the tokens they may save);
  - disable_by_acceptance_rate: a request drafts while an exponential moving average of its accepted/verified
    drafts stays at or above this rate. Below it, the request decodes plainly, and drafts again for one step
    every PROBE_INTERVAL steps: a probe's acceptance moves the average, so a request whose text turns
    predictable (a repeated passage) resumes speculating.

The average starts at 1 (a new request drafts) and moves by ACCEPTANCE_DECAY of the gap to each verification's
rate: from 1, three fully rejected steps take it to 1/8. Torch-free, kept by the scheduler, fed the counts of
each verification.
"""

from __future__ import annotations

ACCEPTANCE_DECAY = 0.5  # weight of the latest verification in the moving average
PROBE_INTERVAL = 8  # steps between the probes of a request that stopped drafting


class DraftPolicy:
    def __init__(self, num_speculative_tokens: int, disable_by_batch_size: int | None,
                 disable_by_acceptance_rate: float | None) -> None:
        self.k = num_speculative_tokens
        self.max_batch_size = disable_by_batch_size
        self.min_acceptance_rate = disable_by_acceptance_rate
        self.acceptance: dict[str, float] = {}  # request -> moving average of its acceptance rate
        self.steps_paused: dict[str, int] = {}  # request below the rate -> steps since it last drafted

    def num_drafts(self, request_id: str, num_running: int) -> int:
        """The most drafts the request verifies in this step (0 or k), for a step of num_running requests."""
        if self.max_batch_size is not None and num_running > self.max_batch_size:
            return 0
        if self.min_acceptance_rate is None or self.acceptance.get(request_id, 1.0) >= self.min_acceptance_rate:
            return self.k
        paused = self.steps_paused.get(request_id, 0) + 1
        if paused >= PROBE_INTERVAL:
            self.steps_paused[request_id] = 0
            return self.k
        self.steps_paused[request_id] = paused
        return 0

    def observe(self, request_id: str, num_verified: int, num_accepted: int) -> None:
        """A step's verification of the request's drafts."""
        if num_verified and self.min_acceptance_rate is not None:
            average = self.acceptance.get(request_id, 1.0)
            self.acceptance[request_id] = average + ACCEPTANCE_DECAY * (num_accepted / num_verified - average)

    def forget(self, request_id: str) -> None:
        self.acceptance.pop(request_id, None)
        self.steps_paused.pop(request_id, None)
