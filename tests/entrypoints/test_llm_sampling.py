"""LLM.generate sampling features on a tiny random Llama, checked against HF transformers or by definition."""

from __future__ import annotations

import pytest
import torch
import transformers

from tokenmill import LLM, SamplingParams

PROMPTS = [[5, 17, 300, 42, 1000, 7, 7, 88], list(range(200, 237)), [9000, 12, 13]]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model_dir, dtype="float32", kv_cache_memory_bytes=32 << 20, max_model_len=512, seed=0)


@pytest.fixture(scope="module")
def hf_model(model_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def token_prompts(prompts):
    return [{"prompt_token_ids": p} for p in prompts]


def greedy(llm, prompts=PROMPTS, **kwargs):
    params = SamplingParams(temperature=0.0, ignore_eos=True, **{"max_tokens": 24, **kwargs})
    return llm.generate(token_prompts(prompts), params, use_tqdm=False)


def test_seeded_sampling_is_independent_of_batch(llm, assert_pool_free):
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate(token_prompts(PROMPTS[:1]), params, use_tqdm=False)[0].outputs[0].token_ids
    others = SamplingParams(temperature=0.7, max_tokens=20, ignore_eos=True)
    batch = llm.generate(token_prompts(PROMPTS[1:] + PROMPTS[:1]), [others, others, params], use_tqdm=False)
    assert batch[2].outputs[0].token_ids == alone
    again = llm.generate(token_prompts(PROMPTS[:1]), params, use_tqdm=False)[0].outputs[0].token_ids
    assert again == alone
    unseeded = [llm.generate(token_prompts(PROMPTS[:1]), SamplingParams(temperature=1.0, max_tokens=16,
                                                                        ignore_eos=True), use_tqdm=False)
                [0].outputs[0].token_ids for _ in range(2)]
    assert unseeded[0] != unseeded[1]
    assert_pool_free(llm)


def test_n_samples_share_prompt_blocks(llm, assert_pool_free):
    engine = llm.llm_engine
    prompt = list(range(300, 340))  # 40 tokens: 2 full blocks of 16 shared
    engine.add_request("shared", {"prompt_token_ids": prompt},
                       SamplingParams(n=4, temperature=1.0, max_tokens=8, seed=7, ignore_eos=True))
    engine.step()
    kv = engine.core.scheduler.kv
    tables = [kv.req_to_blocks[f"{i}_shared"] for i in range(4)]
    first_blocks = {tuple(b.block_id for b in t[:2]) for t in tables}
    assert len(first_blocks) == 1  # every sample's first two blocks are the same physical blocks
    assert all(t[0].ref_cnt == 4 for t in tables)
    assert len({t[2].block_id for t in tables}) == 4  # the partial last block is private
    outputs = []
    while engine.has_unfinished_requests():
        outputs.extend(o for o in engine.step() if o.finished)
    assert len(outputs) == 1 and len(outputs[0].outputs) == 4
    assert [c.index for c in outputs[0].outputs] == [0, 1, 2, 3]
    assert all(len(c.token_ids) == 8 for c in outputs[0].outputs)
    assert len({tuple(c.token_ids) for c in outputs[0].outputs}) > 1
    assert_pool_free(llm)


def test_stop_strings_truncate_text(llm, assert_pool_free):
    base = greedy(llm, PROMPTS[:1], max_tokens=32)[0].outputs[0]
    text = base.text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    index = text.find(stop)
    out = greedy(llm, PROMPTS[:1], max_tokens=32, stop=[stop, "never-appears-xyz"])[0].outputs[0]
    assert out.text == text[:index]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    kept = greedy(llm, PROMPTS[:1], max_tokens=32, stop=stop, include_stop_str_in_output=True)[0].outputs[0]
    assert kept.text == text[:index + len(stop)]
    assert_pool_free(llm)


def test_stop_token_ids_min_and_max_tokens(llm, assert_pool_free):
    base = greedy(llm, PROMPTS[:1], max_tokens=24)[0].outputs[0]
    assert len(base.token_ids) == 24 and base.finish_reason == "length"
    stop_id = base.token_ids[5]
    first = base.token_ids.index(stop_id)
    out = greedy(llm, PROMPTS[:1], stop_token_ids=[stop_id])[0].outputs[0]
    assert out.token_ids == base.token_ids[:first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    held = greedy(llm, PROMPTS[:1], stop_token_ids=[stop_id], min_tokens=first + 3)[0].outputs[0]
    assert len(held.token_ids) >= first + 3
    assert stop_id not in held.token_ids[:first + 2]
    assert_pool_free(llm)


def test_logprobs_match_hf(llm, hf_model, assert_pool_free):
    outputs = greedy(llm, max_tokens=12, logprobs=5, prompt_logprobs=3)
    for prompt, output in zip(PROMPTS, outputs):
        completion = output.outputs[0]
        ids = torch.tensor([prompt + completion.token_ids])
        with torch.no_grad():
            ref = torch.log_softmax(hf_model(ids).logits[0].double(), dim=-1)
        assert len(completion.logprobs) == len(completion.token_ids)
        for step, (token_id, position) in enumerate(zip(completion.token_ids, completion.logprobs)):
            row = ref[len(prompt) - 1 + step]
            assert next(iter(position)) == token_id
            assert abs(position[token_id].logprob - row[token_id].item()) < 1e-4
            top_values, top_ids = row.topk(5)
            assert set(position) >= set(top_ids.tolist())
            for tid, value in zip(top_ids.tolist(), top_values.tolist()):
                assert abs(position[tid].logprob - value) < 1e-4
        assert abs(completion.cumulative_logprob - sum(p[t].logprob for t, p in
                                                         zip(completion.token_ids, completion.logprobs))) < 1e-6
        prompt_lp = output.prompt_logprobs
        assert len(prompt_lp) == len(prompt) and prompt_lp[0] is None
        for pos in range(1, len(prompt)):
            entry = prompt_lp[pos]
            assert abs(entry[prompt[pos]].logprob - ref[pos - 1, prompt[pos]].item()) < 1e-4
            assert entry[prompt[pos]].rank == int((ref[pos - 1] > ref[pos - 1, prompt[pos]]).sum()) + 1
    assert_pool_free(llm)


def test_repetition_penalty_matches_hf(llm, hf_model):
    prompt = PROMPTS[0]
    ref = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                            max_new_tokens=16, do_sample=False, repetition_penalty=1.8, eos_token_id=None,
                            pad_token_id=0)[0, len(prompt):].tolist()
    out = greedy(llm, [prompt], max_tokens=16, repetition_penalty=1.8)[0].outputs[0].token_ids
    assert out == ref


def test_logit_bias_forces_a_token(llm):
    out = greedy(llm, PROMPTS[:2], max_tokens=6, logit_bias={1234: 100.0})
    assert all(o.outputs[0].token_ids == [1234] * 6 for o in out)


def test_text_prompts_and_chat(llm, smol_tokenizer):
    outputs = llm.generate(["Hello there", "A longer prompt about the weather"],
                           SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)
    assert outputs[0].prompt_token_ids == smol_tokenizer.encode("Hello there")
    assert outputs[0].prompt == "Hello there"
    chat = llm.chat([{"role": "user", "content": "Hi!"}], SamplingParams(temperature=0, max_tokens=4,
                                                                         ignore_eos=True), use_tqdm=False)
    expected = smol_tokenizer.apply_chat_template([{"role": "user", "content": "Hi!"}], tokenize=False,
                                                  add_generation_prompt=True)
    assert chat[0].prompt == expected
    assert len(chat[0].outputs[0].token_ids) == 4


@pytest.mark.parametrize("kwargs, field", [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"n": 0}, "n"), ({"max_tokens": 0}, "max_tokens"), ({"top_k": -3}, "top_k"), ({"min_p": 2}, "min_p"),
    ({"presence_penalty": 3}, "presence_penalty"), ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"logprobs": -1}, "logprobs"), ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ({"temperature": float("nan")}, "temperature"), ({"stop": [""]}, "stop"), ({"seed": 2**64}, "seed"),
])
def test_invalid_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_invalid_requests_leave_the_engine_clean(llm, assert_pool_free):
    with pytest.raises(ValueError, match="maximum model length"):
        llm.generate([{"prompt_token_ids": [1] * 600}], use_tqdm=False)
    with pytest.raises(ValueError, match="prompt token ids"):
        llm.generate([{"prompt_token_ids": [1, 10**7]}], use_tqdm=False)
    with pytest.raises(ValueError, match="logit_bias"):
        llm.generate(["hi"], SamplingParams(logit_bias={10**7: 1.0}), use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        llm.generate([{"prompt_token_ids": []}], use_tqdm=False)
    assert_pool_free(llm)
