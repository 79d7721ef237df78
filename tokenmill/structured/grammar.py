"""A request's grammar, torch-free: parsing a structured-outputs spec (the frontend validates with it),
the per-request state the scheduler and the engine core read, and which of a step's rows and tokens
concern grammars. The compiling, accepting and mask filling is manager.py's, in the engine core.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from tokenmill.core.interface import ModelRunnerOutput
from tokenmill.sampling_params import StructuredOutputsParams

if TYPE_CHECKING:
    from tokenmill.core.request import Request


def parse_grammar(kind: str, spec: str) -> Any:
    """The xgrammar Grammar of a structured-outputs spec (params.key): json, json_object, regex, choice
    or grammar (EBNF)."""
    import xgrammar as xgr

    if kind == "json":
        return xgr.Grammar.from_json_schema(spec)
    if kind == "json_object":
        return xgr.Grammar.builtin_json_grammar()
    if kind == "regex":
        return xgr.Grammar.from_regex(spec)
    if kind == "choice":
        return xgr.Grammar.from_ebnf("root ::= " + " | ".join(json.dumps(c) for c in json.loads(spec)))
    return xgr.Grammar.from_ebnf(spec)


def validate(params: StructuredOutputsParams) -> None:
    """Parses the spec into a grammar (milliseconds, no tokenizer) and raises ValueError naming the
    problem; for the frontend, before any compute. The costly compile runs later, off the step loop."""
    kind, spec = params.key
    try:
        parse_grammar(kind, spec)
    except Exception as exc:  # xgrammar raises RuntimeError with its own messages
        message = str(exc).split(": ", 1)[-1] if "] " in str(exc) else str(exc)
        raise ValueError(f"invalid structured_outputs.{kind}: {message}") from exc


class StructuredRequest:
    """A request's grammar (compiling, then compiled) and its matcher."""

    def __init__(self, future: Future, after_token_ids: list[int] | None = None) -> None:
        self.future = future
        self.matcher: Any | None = None
        self.error: str | None = None  # the compile failed: the request ends instead of running
        self.after_token_ids = after_token_ids or []
        self.active = not self.after_token_ids  # constraining yet (false while the model is reasoning)
        self.terminated = False  # the grammar has accepted its end: the request is complete

    def observe(self, output_token_ids: list[int], token_id: int) -> None:
        """Activates the grammar once the output (output_token_ids, then token_id) ends with
        `after_token_ids`; its next token is the first constrained one."""
        n = len(self.after_token_ids)
        if (output_token_ids[max(0, len(output_token_ids) - n + 1):] + [token_id])[-n:] == self.after_token_ids:
            self.active = True

    @property
    def ready(self) -> bool:
        """The compile has finished, successfully (a matcher) or not (an error)."""
        if self.matcher is None and self.error is None and self.future.done():
            if self.future.exception() is not None:
                self.error = f"the grammar could not be compiled: {self.future.exception()}"
            else:
                import xgrammar as xgr

                self.matcher = xgr.GrammarMatcher(self.future.result())
        return self.matcher is not None or self.error is not None


def tokens_to_accept(requests: Mapping[str, Request], runner_output: ModelRunnerOutput
                     ) -> tuple[list[StructuredRequest], list[int]]:
    """(grammars, tokens): a step's sampled tokens that advance grammars, each with its request's grammar
    (which repeats if it sampled several), to accept before the scheduler's update. A grammar still waiting
    for its start marker (reasoning) only watches the tokens go by."""
    grammars, tokens = [], []
    for request_id, new_token_ids in zip(runner_output.req_ids, runner_output.sampled_token_ids):
        request = requests.get(request_id)
        if request is None or request.structured is None or request.is_finished or not new_token_ids:
            continue
        structured = request.structured
        for token_id in new_token_ids:
            if structured.active:
                grammars.append(structured)
                tokens.append(token_id)
            else:
                structured.observe(request.output_token_ids, token_id)
    return grammars, tokens


def constrained_rows(requests: Mapping[str, Request], req_ids: Sequence[str], samples: Sequence[bool]
                     ) -> tuple[list[int], list[StructuredRequest]]:
    """(rows, grammars): the rows of a launched step whose next token a grammar constrains, with their
    grammars; rows that only compute a prompt chunk (samples[i] false), requests that ended since the step
    was scheduled and grammars known to have terminated are left out."""
    rows, grammars = [], []
    for i, request_id in enumerate(req_ids):
        request = requests.get(request_id)
        if samples[i] and request is not None and request.structured is not None and request.structured.active \
                and not request.is_finished and not request.structured.terminated:
            rows.append(i)
            grammars.append(request.structured)
    return rows, grammars
