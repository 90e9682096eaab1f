"""infer.generate: the static-cache generator against transformers' own greedy decoding,
speculative decoding, compile counts, sampling and streaming (CPU, tiny models)."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter
from transformers import AutoModelForCausalLM, AutoTokenizer

from infer.generate import Generator
from infer.sampling import SamplingParams, choose_tokens


def lively(model_dir, seed=0, layers=None):
    """The tiny random Llama with large weights: its greedy output varies from token to token
    (at the default init scale it repeats one token), so equality tests mean something."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 1.0 if "embed" in name else 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return lively(tiny_model_dir)


PROMPTS = [[1, 500, 600], [7, 8, 9, 10, 11, 12, 13, 14, 15], [42] * 5 + [99, 100]]


def hf_greedy(model, ids, n):
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         pad_token_id=0, eos_token_id=None)
    return out[0, len(ids):].tolist()


def test_static_cache_greedy_equals_dynamic_cache_greedy(model, tok):
    gen = Generator(model, tok, max_batch_size=4, max_seq_len=96)
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    batched = gen.generate(PROMPTS, params)  # left-padded together into one bucket
    for ids, result in zip(PROMPTS, batched):
        expected = hf_greedy(model, ids, 20)
        assert result.token_ids == expected
        assert result.finish_reason == "length" and result.prompt_tokens == len(ids)
    # The cache is reused: a second call (one prompt, batch bucket 1) gives the same tokens.
    again = gen.generate([PROMPTS[1]], params)[0]
    assert again.token_ids == batched[1].token_ids
    assert len(set(again.token_ids)) > 5  # not a degenerate repeat-one-token model


def test_speculative_assistant_and_prompt_lookup_equal_plain_greedy(model, tok, tiny_model_dir):
    prompt = [5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7]  # repeats, so lookup has something to propose
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    plain = Generator(model, tok, max_batch_size=1, max_seq_len=96).generate([prompt], params)[0].token_ids

    same = Generator(model, tok, max_batch_size=1, max_seq_len=96, assistant_model=model, num_assistant_tokens=4)
    assert same.generate([prompt], params)[0].token_ids == plain
    assert same.last_stats.accepted == same.last_stats.drafted > 0  # identical assistant: all accepted

    other = lively(tiny_model_dir, seed=1)  # disagrees often: exercises rejection + cache rollback
    weak = Generator(model, tok, max_batch_size=1, max_seq_len=96, assistant_model=other, num_assistant_tokens=3)
    assert weak.generate([prompt], params)[0].token_ids == plain
    assert weak.last_stats.accepted < weak.last_stats.drafted

    # Prompt lookup proposes what followed the latest earlier occurrence of the output's last
    # n-gram; a prompt that already contains its own continuation gives it matches.
    quoting = prompt + plain[:8] + prompt
    expected = hf_greedy(model, quoting, 24)
    lookup = Generator(model, tok, max_batch_size=1, max_seq_len=96, prompt_lookup=3)
    assert lookup.generate([quoting], params)[0].token_ids == expected
    assert lookup.last_stats.drafted > 0


def test_decode_step_compiles_once_for_every_prompt_length_and_batch(model, tok):
    counter = CompileCounter()
    gen = Generator(model, tok, max_batch_size=4, max_seq_len=64, compile=counter)
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    first = gen.generate([list(range(3, 8))], params)  # one row: the batch-1 step
    assert counter.frame_count == 1
    second = gen.generate([list(range(3, 23))], params)  # another prompt length: prefill is eager
    assert counter.frame_count == 1
    gen.generate([list(range(3, 8)), [9, 10], [11, 12, 13]], params)  # rows [0, 4): a symbolic batch
    compiled = counter.frame_count
    assert compiled == 2
    both = gen.generate([list(range(3, 8)), list(range(3, 23))], params)  # rows [0, 2)
    assert counter.frame_count == compiled
    eager = Generator(model, tok, max_batch_size=4, max_seq_len=64)
    assert first[0].token_ids == eager.generate([list(range(3, 8))], params)[0].token_ids == both[0].token_ids
    assert second[0].token_ids == eager.generate([list(range(3, 23))], params)[0].token_ids == both[1].token_ids


def test_compiled_prefill_is_two_graphs_for_every_prompt_shape_and_matches_eager(model, tok):
    counter = CompileCounter()
    gen = Generator(model, tok, max_batch_size=4, max_seq_len=64, compile=counter, compile_prefill=True)
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)
    prompts = [[7], list(range(3, 8)), list(range(3, 23)), [9, 10], [11, 12, 13]]
    compiled = [gen.generate([p], params)[0].token_ids for p in prompts]  # one row at a time
    compiled.append(gen.generate(prompts[1:], params))  # several rows, mixed lengths
    compiled.append(gen.generate(prompts[:3], params))
    # decode: the batch-1 step and the batched step; prefill: one row, several rows
    assert counter.frame_count == 4
    eager = Generator(model, tok, max_batch_size=4, max_seq_len=64)
    expected = [eager.generate([p], params)[0].token_ids for p in prompts]
    assert compiled[:5] == expected
    assert [r.token_ids for r in compiled[5]] == expected[1:]
    assert [r.token_ids for r in compiled[6]] == expected[:3]
    # the transformers forward (fused=False) traces whole too, when asked for
    hf = Generator(model, tok, max_batch_size=4, max_seq_len=64, compile=CompileCounter(), compile_prefill=True,
                   fused=False)
    assert [r.token_ids for r in hf.generate(prompts[1:], params)] == expected[1:]


def test_sampling_is_seeded_and_top_k_1_is_greedy(model, tok):
    gen = Generator(model, tok, max_batch_size=2, max_seq_len=64)
    sampled = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.95, seed=3, ignore_eos=True)
    a = gen.generate([PROMPTS[0]], sampled)[0].token_ids
    assert gen.generate([PROMPTS[0]], sampled)[0].token_ids == a
    seeds = {tuple(gen.generate([PROMPTS[0]], SamplingParams(max_new_tokens=12, temperature=1.0, seed=s, ignore_eos=True))[0].token_ids) for s in range(4)}
    assert len(seeds) > 1
    greedy = gen.generate([PROMPTS[0]], SamplingParams(max_new_tokens=12, ignore_eos=True))[0].token_ids
    top1 = gen.generate([PROMPTS[0]], SamplingParams(max_new_tokens=12, temperature=1.5, top_k=1, seed=0, ignore_eos=True))
    assert top1[0].token_ids == greedy
    # Mixed batch: a greedy row next to a sampled row stays greedy.
    mixed = gen.generate([PROMPTS[0], PROMPTS[0]], [SamplingParams(max_new_tokens=12, ignore_eos=True), sampled])
    assert mixed[0].token_ids == greedy


def test_repetition_penalty_stops_repeats(tiny_model_dir, tok):
    flat = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()  # repeats one token
    gen = Generator(flat, tok, max_batch_size=1, max_seq_len=64)
    plain = gen.generate([[1, 2, 3]], SamplingParams(max_new_tokens=10, ignore_eos=True))[0].token_ids
    assert len(set(plain)) < 4
    penalised = gen.generate([[1, 2, 3]], SamplingParams(max_new_tokens=10, repetition_penalty=1e4, ignore_eos=True))[0].token_ids
    assert len(set(penalised)) == 10 and not {1, 2, 3} & set(penalised)


def test_choose_tokens_truncation():
    logits = torch.tensor([[0.0, 5.0, 4.9, -3.0]]).repeat(200, 1)
    t = torch.full((200,), 1.0)
    ones = torch.ones(200)
    top2 = choose_tokens(logits, sampling=True, temperature=t, top_k=torch.full((200,), 2), top_p=ones, penalty=ones)
    assert set(top2.tolist()) == {1, 2}
    nucleus = choose_tokens(logits, sampling=True, temperature=t, top_k=torch.zeros(200, dtype=torch.long), top_p=torch.full((200,), 0.3), penalty=ones)
    assert set(nucleus.tolist()) == {1}


def test_eos_and_stop_strings_end_the_output(model, tok):
    gen = Generator(model, tok, max_batch_size=1, max_seq_len=64)
    full = gen.generate([PROMPTS[1]], SamplingParams(max_new_tokens=16, ignore_eos=True))[0]
    gen.eos_ids = {full.token_ids[5]}
    cut = gen.generate([PROMPTS[1]], SamplingParams(max_new_tokens=16))[0]
    first = full.token_ids.index(full.token_ids[5])
    assert cut.token_ids == full.token_ids[:first] and cut.finish_reason == "stop"
    gen.eos_ids = set()
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 4]
    stopped = gen.generate([PROMPTS[1]], SamplingParams(max_new_tokens=16, stop=[stop]))[0]
    assert stopped.text == full.text[: full.text.index(stop)] and stopped.finish_reason == "stop"


def test_steps_queued_ahead_change_no_output(model, tok):
    """CUDA generators queue the next group of steps before reading the current one; here
    (CPU) two groups in flight are forced. Rows that end inside a group, by an end token or
    a stop string, and the call after them come out as without queuing."""
    plain = Generator(model, tok, max_batch_size=2, max_seq_len=64, sync_interval=3)
    queued = Generator(model, tok, max_batch_size=2, max_seq_len=64, sync_interval=3)
    queued.engine.groups_in_flight = 2
    full = plain.generate(PROMPTS[:2], SamplingParams(max_new_tokens=16, ignore_eos=True))
    stop = full[0].text[len(full[0].text) // 2 : len(full[0].text) // 2 + 4]
    for gen in (plain, queued):
        gen.eos_ids = {full[0].token_ids[6], full[1].token_ids[4]}
    calls = [SamplingParams(max_new_tokens=16), SamplingParams(max_new_tokens=16, stop=[stop]),
             SamplingParams(max_new_tokens=16, ignore_eos=True)]
    for params in calls:
        want, got = plain.generate(PROMPTS[:2], params), queued.generate(PROMPTS[:2], params)
        assert [(r.token_ids, r.text, r.finish_reason) for r in got] == [(r.token_ids, r.text, r.finish_reason) for r in want]
    assert [r.token_ids for r in got] == [r.token_ids for r in full]
    ended = queued.generate(PROMPTS[:2], calls[0])
    assert [r.finish_reason for r in ended] == ["stop", "stop"] and len(ended[0].token_ids) <= 6
    assert queued.last_stats.decode_steps < 15  # it stopped reading once both rows had ended


def test_stream_yields_the_same_tokens_and_text(model, tok):
    gen = Generator(model, tok, max_batch_size=2, max_seq_len=64, sync_interval=2)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    results = gen.generate(PROMPTS[:2], params)
    events = list(gen.stream(PROMPTS[:2], params))
    for i, result in enumerate(results):
        mine = [e for e in events if e.index == i]
        assert [t for e in mine for t in e.token_ids] == result.token_ids
        assert "".join(e.text for e in mine) == result.text
        assert mine[-1].finished and mine[-1].finish_reason == "length"
        assert len(mine) >= 6  # the first token, then one event per group of 2 steps


def test_chat_prompts_use_the_template(model, tok):
    gen = Generator(model, tok, max_batch_size=1, max_seq_len=128)
    ids = gen.encode("Hi there")
    text = tok.decode(ids)
    assert "Hi there" in text and text.rstrip().endswith("assistant")
    assert gen.encode([{"role": "user", "content": "Hi there"}]) == ids
    assert gen.encode("Hi there", chat=False) == tok("Hi there").input_ids


def test_bad_requests_say_what_to_change(model, tok):
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        SamplingParams(temperature=-1)
    gen = Generator(model, tok, max_batch_size=1, max_seq_len=32)
    with pytest.raises(ValueError, match="exceeds max_seq_len 32"):
        gen.generate([[1] * 20], SamplingParams(max_new_tokens=20))
    with pytest.raises(TypeError, match="must be a list of prompts"):
        gen.generate("a bare string")
    lookup = Generator(model, tok, max_batch_size=1, max_seq_len=32, prompt_lookup=2)
    with pytest.raises(ValueError, match="repetition_penalty is not supported with speculative"):
        lookup.generate([[1, 2]], SamplingParams(max_new_tokens=4, repetition_penalty=1.2))


def test_fused_decoder_matches_the_transformers_forward(model, tok, tiny_model_dir):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from infer.decoder import FusedDecoder

    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    fused = Generator(model, tok, max_batch_size=4, max_seq_len=96, fused=True)
    plain = Generator(model, tok, max_batch_size=4, max_seq_len=96, fused=False)
    assert isinstance(fused.decoder, FusedDecoder) and plain.decoder is None
    assert [r.token_ids for r in fused.generate(PROMPTS, params)] == [r.token_ids for r in plain.generate(PROMPTS, params)]
    # The original projections became views of the fused weights: model.forward is unchanged.
    attn = model.model.layers[0].self_attn
    assert attn.k_proj.weight.data_ptr() == attn.q_proj.weight.data_ptr() + attn.q_proj.weight.nbytes
    # qwen2: biased q/k/v projections, 2 query heads per KV head.
    torch.manual_seed(0)
    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()
    with torch.no_grad():
        for p in qwen.parameters():
            p.normal_(0, 0.5)
    expected = [hf_greedy(qwen, ids, 12) for ids in PROMPTS]
    gen = Generator(qwen, tok, max_batch_size=4, max_seq_len=64, fused=True)
    assert [r.token_ids for r in gen.generate(PROMPTS, SamplingParams(max_new_tokens=12, ignore_eos=True))] == expected


def test_chunked_argmax_equals_argmax_including_ties():
    from infer.sampling import argmax

    torch.manual_seed(0)
    for vocab in (100, 4097, 49152, 128256):  # below the chunking threshold, ragged and exact chunks
        logits = torch.randn(3, vocab)
        logits[1, 7] = logits[1, vocab - 1] = 50.0  # a tie: the lowest index wins, as in argmax
        logits[2] = 0.0  # all equal
        assert torch.equal(argmax(logits), logits.argmax(dim=-1)), vocab


def test_more_prompts_than_rows_join_as_rows_free_and_match_alone(model, tok):
    """Continuous batching: 7 prompts of mixed lengths and output budgets through 2 cache
    rows; each sequence takes a row when one frees and gives what it gives alone."""
    prompts = [list(range(3, 3 + n)) for n in (4, 11, 6, 2, 9, 5, 14)]
    budgets = [3, 17, 8, 12, 5, 20, 9]
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in budgets]
    gen = Generator(model, tok, max_batch_size=2, max_seq_len=64, sync_interval=3)
    together = gen.generate(prompts, params)
    assert [len(r.token_ids) for r in together] == budgets
    for prompt, budget, result in zip(prompts, budgets, together):
        assert result.token_ids == hf_greedy(model, prompt, budget)


def test_long_prompts_are_prefilled_in_chunks_with_the_same_result(model, tok):
    prompt = [(i * 37) % 500 + 3 for i in range(45)]
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    whole = Generator(model, tok, max_batch_size=2, max_seq_len=96).generate([prompt, PROMPTS[0]], params)
    chunked = Generator(model, tok, max_batch_size=2, max_seq_len=96, prefill_chunk=8)
    assert [r.token_ids for r in chunked.generate([prompt, PROMPTS[0]], params)] == [r.token_ids for r in whole]
    assert whole[0].token_ids == hf_greedy(model, prompt, 10)


def test_a_seeded_request_samples_the_same_tokens_whatever_shares_its_batch(model, tok):
    seeded = SamplingParams(max_new_tokens=12, temperature=1.0, seed=2**64 + 11, ignore_eos=True)
    gen = Generator(model, tok, max_batch_size=4, max_seq_len=64)
    alone = gen.generate([PROMPTS[1]], seeded)[0].token_ids
    others = [SamplingParams(max_new_tokens=n, temperature=0.8, top_p=0.9, ignore_eos=True) for n in (3, 15, 7)]
    crowded = gen.generate([PROMPTS[0], PROMPTS[2], PROMPTS[1], PROMPTS[0]], [others[0], others[1], seeded, others[2]])
    assert crowded[2].token_ids == alone
    assert gen.generate([PROMPTS[1]], SamplingParams(max_new_tokens=12, temperature=1.0, seed=11, ignore_eos=True))[0].token_ids == alone


def test_logprobs_are_the_log_softmax_of_the_model_logits(model, tok):
    gen = Generator(model, tok, max_batch_size=2, max_seq_len=64, max_logprobs=3)
    result = gen.generate([PROMPTS[0]], SamplingParams(max_new_tokens=4, ignore_eos=True, logprobs=3))[0]
    ids = torch.tensor([PROMPTS[0] + result.token_ids])
    with torch.no_grad():
        expected = model(ids).logits[0, len(PROMPTS[0]) - 1 : -1].float().log_softmax(-1)
    for step, (token, logprob, top) in enumerate(result.logprobs):
        assert token == result.token_ids[step] and abs(logprob - expected[step, token].item()) < 1e-4
        values, indices = expected[step].topk(3)
        assert [t for t, _ in top] == indices.tolist()
        assert all(abs(lp - v) < 1e-4 for (_, lp), v in zip(top, values.tolist()))
    with pytest.raises(ValueError, match="logprobs: at most 3"):
        gen.generate([PROMPTS[0]], SamplingParams(max_new_tokens=2, logprobs=5))


def test_first_tokens_go_out_before_the_decode_group_and_running_rows_keep_decoding(model, tok):
    """CPU steps run as they are called: the step that prefills a prompt hands out its first
    token before running a group of `sync_interval` decode steps (which would delay it by
    that many steps), yet prompts joining at every step never stop the running rows for
    more than one step in two."""
    gen = Generator(model, tok, max_batch_size=8, max_seq_len=64, sync_interval=4)
    engine = gen.engine
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    prompts = [PROMPTS[0], *PROMPTS[1:], *PROMPTS[:2], PROMPTS[2]]
    seqs = [engine.new_sequence(p, params) for p in prompts]
    engine.submit(seqs[0])
    events = engine.step()
    assert [len(e.token_ids) for e in events] == [1] and engine.decode_steps == 0
    decoded = []
    for seq in seqs[1:]:  # one prompt joins at every step
        engine.submit(seq)
        before = engine.decode_steps
        engine.step()
        assert len(seq.token_ids) >= 1  # its first token came out of the step that prefilled it
        decoded.append(engine.decode_steps > before)
    assert decoded == [i % 2 == 0 for i in range(len(decoded))]
    while engine.has_work:
        engine.step()
    for seq, prompt in zip(seqs, prompts):
        assert seq.token_ids == hf_greedy(model, prompt, 20)
    engine.step()  # idle, as a server's engine is between requests
    late = engine.new_sequence(PROMPTS[1], params)
    engine.submit(late)
    before = engine.decode_steps
    assert [len(e.token_ids) for e in engine.step()] == [1] and engine.decode_steps == before


def test_prompts_with_a_common_beginning_prefill_it_once_and_match_alone(model, tok):
    """Prompts sharing a long beginning (a template, an instruction): the engine prefills it
    once, copies its KV into each row and prefills the rest of the prompts as one batch; the
    tokens are transformers' greedy tokens of each whole prompt."""
    head = [(i * 53) % 400 + 5 for i in range(20)]
    prompts = [head + tail for tail in ([7, 8, 9], [300], [11, 12, 13, 14, 15, 16], [42, 43])]
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    gen = Generator(model, tok, max_batch_size=3, max_seq_len=64, share_prefix=True)
    calls = []
    real = gen.runner.prefill_shared
    gen.runner.prefill_shared = lambda rows, start, *a: (calls.append((len(rows), start)), real(rows, start, *a))
    results = gen.generate(prompts, params)
    assert calls[0] == (3, len(head))  # the three that took a row first, in one batch
    for prompt, result in zip(prompts, results):
        assert result.token_ids == hf_greedy(model, prompt, 8)
    assert gen.engine.share_prefix(head)  # kept for the next call with the same beginning
