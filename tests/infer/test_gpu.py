"""GPU-only: the compiled CUDA-graph decode path and the compiled quantized layers.

Runs on the GPU machine (no hub there): models are random Llamas built from a config with
the bench's synthetic word-level tokenizer, so nothing is downloaded.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

SHAPE = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
             intermediate_size=512, vocab_size=4096, tie_word_embeddings=True, rope_theta=10000.0)


@pytest.fixture(scope="module")
def random_model():
    from infer.bench import build_random_model

    model, tok = build_random_model("tiny", torch.float32, torch.device("cuda"), **SHAPE)
    with torch.no_grad():  # large weights: well-separated logits, so argmax is robust to fusion order
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 1.0 if "embed" in name else 0.3)
    return model, tok


def test_cuda_graph_decode_matches_eager_and_does_not_recompile(random_model):
    from torch._dynamo.utils import counters

    from infer.generate import Generator
    from infer.sampling import SamplingParams

    model, tok = random_model
    params = SamplingParams(max_new_tokens=32, ignore_eos=True)
    prompts = [[5, 6, 7, 8, 9], list(range(100, 121))]
    eager = Generator(model, tok, max_batch_size=2, max_seq_len=128, compile=False).generate(prompts, params)
    gen = Generator(model, tok, max_batch_size=2, max_seq_len=128, compile="reduce-overhead")
    assert gen.compile_mode == "reduce-overhead"
    gen.warmup(batch_sizes=(2,), prompt_len=16)
    compiled = gen.generate(prompts, params)
    for e, c in zip(eager, compiled):
        assert c.token_ids == e.token_ids
    graphs = counters["stats"]["unique_graphs"]
    recorded = gen.graph_count
    gen.generate([[9, 9, 9], list(range(200, 226))], params)  # other prompt lengths: prefill is eager
    assert counters["stats"]["unique_graphs"] == graphs
    assert gen.graph_count == recorded == 1  # one CUDA graph (rows [0, 2), greedy), replayed


def test_short_prefills_replay_a_graph_per_rows_and_width_and_match_eager(random_model):
    """First chunks of up to 8 rows and 512 tokens run from CUDA graphs recorded per (rows,
    width rounded up to 64): padded to the bucket, they give eager's tokens; a second batch of
    the same shape replays (no new graph, no recompilation); a longer prompt takes the
    compiled path with symbolic shapes and records nothing."""
    from torch._dynamo.utils import counters

    from infer.generate import Generator
    from infer.sampling import SamplingParams

    model, tok = random_model
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    eager = Generator(model, tok, max_batch_size=4, max_seq_len=1024, compile=False)
    gen = Generator(model, tok, max_batch_size=4, max_seq_len=1024, compile="reduce-overhead")

    def same(batch):
        want = [r.token_ids for r in eager.generate(batch, params)]
        assert [r.token_ids for r in gen.generate(batch, params)] == want

    shapes = [[[5, 6, 7]], [list(range(10, 80))], [[1, 2, 3, 4], list(range(300, 340)), [7, 7, 7]]]
    for batch in shapes:  # buckets (1 row, 64), (1, 128), (3, 64)
        same(batch)
    assert gen.engine.prefill_graph_count == 3
    graphs = counters["stats"]["unique_graphs"]
    for batch in ([[9] * 60], [list(range(20, 85))], [[4] * 10, [5] * 64, list(range(400, 402))]):
        same(batch)
    assert gen.engine.prefill_graph_count == 3 and counters["stats"]["unique_graphs"] == graphs
    same([list(range(1000, 1600))])  # 600 tokens: past the largest bucket
    assert gen.engine.prefill_graph_count == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_later_prompt_chunks_attend_causally_without_a_mask_and_match_one_chunk(random_model, dtype):
    """A prompt longer than the prefill chunk: its later chunks attend through SDPA's
    bottom-right causal bias (the flash kernel in bf16, the memory-efficient one in fp32),
    give the tokens one whole-prompt prefill gives (beside two short prompts), and never
    make the host wait for the GPU (the running streams' tokens would wait with it)."""
    import copy

    from infer.generate import Generator
    from infer.sampling import SamplingParams

    model = copy.deepcopy(random_model[0]).to(dtype)
    tok = random_model[1]
    prompts = [[(i * 37) % 4000 + 3 for i in range(700)], [5, 6, 7], list(range(100, 140))]
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    whole = Generator(model, tok, max_batch_size=4, max_seq_len=1024, compile=False)
    chunked = Generator(model, tok, max_batch_size=4, max_seq_len=1024, compile=False, prefill_chunk=160)
    runner = chunked.engine.runner
    extend, calls = runner.prefill_extend, []

    def without_sync(*args, **kwargs):
        calls.append(args[1])
        torch.cuda.set_sync_debug_mode("error")  # a synchronizing call raises
        try:
            return extend(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    runner.prefill_extend = without_sync
    want = [r.token_ids for r in whole.generate(prompts, params)]
    assert [r.token_ids for r in chunked.generate(prompts, params)] == want
    assert calls == [160, 320, 480, 640]  # the later chunks' starts


def test_steps_queued_ahead_of_the_host_stop_where_a_row_ends(random_model):
    """On CUDA the host reads a group of steps while the next group runs. A row that ends
    inside a group (here at an end-of-sequence token) gets exactly the tokens up to it; the
    steps already queued past it change nothing, for it or for the next call; streaming
    one token per event gives the same tokens."""
    from infer.generate import Generator
    from infer.sampling import SamplingParams

    model, tok = random_model
    gen = Generator(model, tok, max_batch_size=2, max_seq_len=128, compile="reduce-overhead", sync_interval=4)
    prompts = [[5, 6, 7, 8, 9], list(range(100, 121))]
    full = gen.generate(prompts, SamplingParams(max_new_tokens=40, ignore_eos=True))
    end = full[0].token_ids[9]  # the 10th token of the first row: the stop falls inside a group
    first = full[0].token_ids.index(end)
    gen.eos_ids = {end}
    stopped = gen.generate(prompts, SamplingParams(max_new_tokens=40))
    assert stopped[0].token_ids == full[0].token_ids[:first] and stopped[0].finish_reason == "stop"
    want = full[1].token_ids[: full[1].token_ids.index(end)] if end in full[1].token_ids else full[1].token_ids
    assert stopped[1].token_ids == want
    gen.eos_ids = set()
    assert [r.token_ids for r in gen.generate(prompts, SamplingParams(max_new_tokens=40))] == [r.token_ids for r in full]
    one = Generator(model, tok, max_batch_size=2, max_seq_len=128, compile="reduce-overhead", sync_interval=1)
    events = list(one.stream(prompts[:1], SamplingParams(max_new_tokens=40, ignore_eos=True)))
    assert [t for e in events for t in e.token_ids] == full[0].token_ids and len(events) == 40


def test_cuda_graph_sampling_follows_the_seed(random_model):
    from infer.generate import Generator
    from infer.sampling import SamplingParams

    model, tok = random_model
    gen = Generator(model, tok, max_batch_size=1, max_seq_len=96, compile="reduce-overhead")
    prompt = [[5, 6, 7, 8]]

    def sample(seed):
        params = SamplingParams(max_new_tokens=40, temperature=1.5, seed=seed, ignore_eos=True)
        return gen.generate(prompt, params)[0].token_ids

    first = sample(1)
    assert sample(1) == first  # replayed graph, same seed: same tokens
    assert sample(2) != first  # the graph's noise follows the new seed
    assert gen.graph_count == 1


def test_nf4_matvec_equals_dequantized_linear_on_gpu():
    from infer.quantized_layers import NF4Linear

    torch.manual_seed(0)
    n, k = 384, 512
    code = torch.linspace(-1, 1, 16, device="cuda")
    layer = NF4Linear(torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda"),
                      torch.rand(n, k // 64, device="cuda"), code, None, k, n, 64)
    x = torch.randn(1, 1, k, device="cuda", dtype=torch.bfloat16)
    ref = torch.nn.functional.linear(x, layer.dequantize(torch.bfloat16)).float()
    got = torch.compile(layer, dynamic=False)(x).float()
    assert ((got - ref).norm() / ref.norm()) < 1e-2


def test_compiled_nf4_layers_on_gpu(random_model, tmp_path):
    from infer.generate import Generator
    from infer.loading import load, weight_bytes
    from infer.quantized_layers import NF4Linear
    from infer.sampling import SamplingParams

    model, tok = random_model
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    import bitsandbytes.functional as bnb_functional

    q, qtok = load(tmp_path / "m", quant="nf4", dtype="bf16")
    bnb_layer = q.model.layers[0].mlp.down_proj  # not fused with another projection: comparable as is
    expected = bnb_functional.dequantize_4bit(bnb_layer.weight.data, bnb_layer.weight.quant_state).to(torch.bfloat16)
    x = torch.randn(3, SHAPE["intermediate_size"], device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        ref = bnb_layer(x).float()
    stored = weight_bytes(q)
    gen = Generator(q, qtok, max_batch_size=1, max_seq_len=64, compile="reduce-overhead")  # swaps in NF4Linear
    layer = q.model.layers[0].mlp.down_proj
    assert isinstance(layer, NF4Linear)
    assert torch.equal(layer.dequantize(torch.bfloat16), expected)  # bit-identical weights on the GPU
    with torch.no_grad():
        got = layer(x).float()
    assert ((got - ref).norm() / ref.norm()) < 1e-2
    assert weight_bytes(q) < stored * 1.1
    out = gen.generate([[1, 2, 3]], SamplingParams(max_new_tokens=16, ignore_eos=True))[0]
    assert len(out.token_ids) == 16


def test_speculative_on_gpu_equals_plain_greedy(random_model):
    from infer.generate import Generator
    from infer.sampling import SamplingParams

    model, tok = random_model
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    prompt = [3, 4, 5, 6, 3, 4, 5]
    plain = Generator(model, tok, max_batch_size=1, max_seq_len=96, compile=False).generate([prompt], params)[0]
    spec = Generator(model, tok, max_batch_size=1, max_seq_len=96, compile="reduce-overhead",
                     assistant_model=model, num_assistant_tokens=4)
    assert spec.generate([prompt], params)[0].token_ids == plain.token_ids
    assert spec.last_stats.accepted == spec.last_stats.drafted > 0


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_triton_matvec_folds_norm_glu_residual_and_bias():
    import torch.nn.functional as F

    from infer import kernels
    from infer.quantized_layers import NF4Linear

    torch.manual_seed(0)
    dt, n, k = torch.bfloat16, 1000, 576  # n not a multiple of any block; k = 64 * 9
    lin = torch.nn.Linear(k, n, bias=True, device="cuda", dtype=dt)
    gate_up = torch.nn.Linear(k, 2 * n, bias=True, device="cuda", dtype=dt)  # [gate; up]
    x, res = torch.randn(k, device="cuda", dtype=dt), torch.randn(n, device="cuda", dtype=dt)
    norm_w = (1 + 0.1 * torch.randn(k, device="cuda")).to(dt)

    def rms(v):
        h = v.float()
        return norm_w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dt)

    def glu(gu):  # silu(gate) * up, from the layer's [gate; up] outputs
        gate, up = gu.chunk(2, dim=-1)
        return F.silu(gate) * up

    def check(got, want):  # the 16-bit reference computed in float64: both are near it
        exact = want(torch.float64)
        assert torch.isfinite(got).all() and got.shape == exact.shape
        assert _rel(got, exact) < 1e-2
        assert _rel(got, want(None)) < 1e-2

    w64, gu64 = lin.weight.double(), gate_up.weight.double()
    check(kernels.matvec(x, lin, norm=norm_w, eps=1e-5), lambda d: lin(rms(x)) if d is None else F.linear(rms(x).double(), w64, lin.bias.double()))
    check(kernels.matvec(x, lin, residual=res), lambda d: res + lin(x) if d is None else res.double() + F.linear(x.double(), w64, lin.bias.double()))
    check(kernels.matvec(x, gate_up, norm=norm_w, eps=1e-5, glu=True),
          lambda d: glu(gate_up(rms(x))) if d is None else glu(F.linear(rms(x).double(), gu64, gate_up.bias.double())))

    code = torch.linspace(-1, 1, 16, device="cuda")

    def nf4(rows):
        return NF4Linear(torch.randint(0, 256, (rows, k // 2), dtype=torch.uint8, device="cuda"),
                         torch.rand(rows, k // 64, device="cuda"), code, None, k, rows, 64)

    q, q2 = nf4(n), nf4(2 * n)
    # bitsandbytes rounds each dequantized weight to 16 bits; the kernel keeps code * scale in fp32
    deq, deq2 = q.dequantize(dt), q2.dequantize(dt)
    deq64, deq2_64 = q.dequantize(torch.float32).double(), q2.dequantize(torch.float32).double()
    check(kernels.matvec(x, q, norm=norm_w, eps=1e-5), lambda d: F.linear(rms(x), deq) if d is None else F.linear(rms(x).double(), deq64))
    check(kernels.matvec(x, q, residual=res), lambda d: res + F.linear(x, deq) if d is None else res.double() + F.linear(x.double(), deq64))
    check(kernels.matvec(x, q2, norm=norm_w, eps=1e-5, glu=True),
          lambda d: glu(F.linear(rms(x), deq2)) if d is None else glu(F.linear(rms(x).double(), deq2_64)))
    with pytest.raises(ValueError, match="glu"):
        kernels.matvec(x, q2, residual=res, glu=True)


def test_triton_decode_attention_writes_cache_and_matches_reference():
    from infer import kernels

    torch.manual_seed(0)
    dt, b, heads, kv_heads, d, slots = torch.bfloat16, 3, 12, 4, 64, 320
    keys = torch.randn(5, kv_heads, slots, d, device="cuda", dtype=dt)
    values = torch.randn_like(keys)
    keys0, values0 = keys.clone(), values.clone()
    qkv = torch.randn(b, (heads + 2 * kv_heads) * d, device="cuda", dtype=dt)
    lens = torch.tensor([7, 200, 0, 150, 99], device="cuda")  # cached tokens per cache row
    rows = torch.tensor([3, 1, 2], device="cuda")  # query row -> cache row; row 2 sees only its new token
    angle = torch.arange(slots, device="cuda")[:, None].float() * (1e4 ** (-torch.arange(0, d, 2, device="cuda") / d))
    emb = torch.cat([angle, angle], -1)
    cos_table, sin_table = emb.cos().to(dt), emb.sin().to(dt)  # row p: position p
    out = kernels.decode_attention(qkv, cos_table, sin_table, keys, values, lens, rows, heads=heads,
                                   kv_heads=kv_heads, scale=d ** -0.5)
    at = lens[rows]
    cos, sin = cos_table[at], sin_table[at]

    def rotate(t):
        return torch.cat((-t[..., d // 2:], t[..., : d // 2]), -1)

    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], -1)
    q, k, v = q.view(b, heads, d), k.view(b, kv_heads, d), v.view(b, kv_heads, d)
    q = q * cos[:, None] + rotate(q) * sin[:, None]
    k = k * cos[:, None] + rotate(k) * sin[:, None]
    for i in range(b):
        r, s = int(rows[i]), int(at[i])
        assert _rel(keys[r, :, s], k[i]) < 1e-2 and torch.equal(values[r, :, s], v[i])  # the new token, rotary applied
        keys0[r, :, s], values0[r, :, s] = keys[r, :, s], v[i]
    assert torch.equal(keys, keys0) and torch.equal(values, values0)  # and nothing else written
    for i in range(b):
        r, s = int(rows[i]), int(at[i])
        qg = q[i].view(kv_heads, heads // kv_heads, d).double()
        probs = (qg @ keys0[r, :, : s + 1].double().transpose(-1, -2) * d ** -0.5).softmax(-1)
        want = (probs @ values0[r, :, : s + 1].double()).reshape(-1)
        assert _rel(out[i], want) < 1e-2


def test_single_row_kernel_step_gives_the_same_tokens_in_any_cache_row(random_model):
    """With one sequence decoding, the engine runs it through the Triton kernels wherever
    its cache row is: row 3 gives the tokens row 0 gives, bit for bit."""
    import copy

    from infer.runner import ModelRunner
    from infer.sampling import SamplingParams

    model, _ = random_model
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    runner = ModelRunner(bf16, max_batch_size=4, max_seq_len=128, compile="reduce-overhead", kernels="triton")
    assert runner.single_row_kernels
    prompt, greedy = [5, 6, 7, 8, 9, 10], SamplingParams(max_new_tokens=64)
    outputs = []
    for row in (0, 3):
        runner.load(row, prompt, greedy, 0)
        runner.prefill_fresh([row], [prompt], [True], False, False)
        runner.set_active([row], True)
        runner.set_single(row)
        runner.decode_group(8, 1, True, False, False)
        outputs.append(runner.seq[row, len(prompt): len(prompt) + 9].tolist())
        assert int(runner.lens[row]) == len(prompt) + 8
        runner.set_active([row], False)
    assert outputs[0] == outputs[1]
    assert runner.graphs is not None and len(runner.graphs) == 1  # one graph serves every row


def test_kernel_decode_steps_are_as_accurate_as_the_torch_path(random_model):
    """Teacher-forced decode steps: logits through infer.kernels (bf16) and through the same
    decoder's torch path (bf16) against the fp32 model. The kernels keep attention scores in
    fp32 and fuse differently, so they are not bit-equal to the bf16 torch path; they must be
    no further from fp32 than it is."""
    import copy

    from infer.cache import StaticKVCache
    from infer.decoder import FusedDecoder
    from infer.generate import Generator
    from infer.sampling import SamplingParams

    model, tok = random_model
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    decoders = [FusedDecoder(bf16, kernels="triton"), FusedDecoder(bf16, kernels="none"), FusedDecoder(copy.deepcopy(model), kernels="none")]
    assert decoders[0].kernels and not decoders[1].kernels
    slots = 64
    caches = [StaticKVCache(d.model.config, 1, slots, d.model.model.embed_tokens.weight.dtype, "cuda",
                            torch.zeros(1, dtype=torch.long, device="cuda"), torch.zeros(1, dtype=torch.long, device="cuda"))
              for d in decoders]
    key_slots = torch.arange(slots, device="cuda")
    prompt = torch.tensor([[5, 6, 7, 8, 9, 10, 11]], device="cuda")
    n, steps = prompt.shape[1], 24
    errors, agree = [[], []], [0, 0]
    with torch.no_grad():
        for decoder, cache in zip(decoders, caches):  # prefill: several query rows, torch path
            cache.extend(0, 0)
            mask = key_slots[None, None, None, :] <= torch.arange(n, device="cuda")[None, None, :, None]
            logits = decoder(prompt, torch.arange(n, device="cuda")[None], mask, cache)
        token = logits[0, -1].argmax().view(1, 1)
        for step in range(steps):
            slot = n + step
            outs = []
            for decoder, cache in zip(decoders, caches):
                cache.decode()
                cache.lens.fill_(slot)
                mask = (key_slots <= slot)[None, None, None, :]
                outs.append(decoder(token, torch.tensor([[slot]], device="cuda"), mask, cache)[0, -1].float())
            for i in (0, 1):
                errors[i].append(_rel(outs[i], outs[2]))
                agree[i] += int(outs[i].argmax() == outs[2].argmax())
            token = outs[2].argmax().view(1, 1)  # every decoder is fed the fp32 model's choice
    kernel_err, torch_err = max(errors[0]), max(errors[1])
    assert kernel_err <= 1.5 * torch_err + 1e-3, (errors[0], errors[1])
    assert agree[0] >= agree[1] - 2 and agree[0] >= steps * 3 // 4, agree

    gen = Generator(bf16, tok, max_batch_size=1, max_seq_len=128, compile="reduce-overhead", kernels="triton")
    assert gen.decoder.kernels
    out = gen.generate([[5, 6, 7]], SamplingParams(max_new_tokens=32, ignore_eos=True))[0]
    assert len(out.token_ids) == 32 and gen.graph_count == 1


def test_batched_kernel_decode_is_as_accurate_as_the_torch_path(random_model):
    """Several rows of different lengths decode one token each through the row-indirect
    attention kernel (each row reads only its own slots) and through the masked torch path
    (every slot, masked), bf16, against the fp32 model: the kernel path is no further from
    fp32 than the torch path, and the compiled generator gives each prompt the tokens it
    gets alone."""
    import copy

    from infer.cache import StaticKVCache
    from infer.decoder import FusedDecoder
    from infer.generate import Generator
    from infer.sampling import SamplingParams

    model, tok = random_model
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    decoders = [FusedDecoder(bf16, kernels="triton", cache_slots=64), FusedDecoder(bf16, kernels="none"),
                FusedDecoder(copy.deepcopy(model), kernels="none")]
    slots, rows = 64, torch.arange(3, device="cuda")
    key_slots = torch.arange(slots, device="cuda")
    prompts = [[5, 6, 7], list(range(20, 37)), list(range(40, 49))]
    caches = []
    with torch.no_grad():
        for d in decoders:
            lens = torch.zeros(3, dtype=torch.long, device="cuda")
            cache = StaticKVCache(d.model.config, 3, slots, d.model.model.embed_tokens.weight.dtype, "cuda", lens,
                                  torch.zeros(1, dtype=torch.long, device="cuda"))
            for r, p in enumerate(prompts):  # prefill each row on the torch path
                cache.extend(r, 0)
                n = len(p)
                mask = key_slots[None, None, None, :] <= torch.arange(n, device="cuda")[None, None, :, None]
                logits = d(torch.tensor([p], device="cuda"), torch.arange(n, device="cuda")[None], mask, cache)
                lens[r] = n
            caches.append(cache)
        tokens = torch.tensor([[5], [6], [7]], device="cuda")
        errors, agree = [[], []], [0, 0]
        for step in range(16):
            outs = []
            for i, (d, cache) in enumerate(zip(decoders, caches)):
                cache.decode()
                pos = cache.lens.clone()
                if i == 0:
                    out = d(tokens, pos[:, None], None, cache, None, rows)
                else:
                    mask = (key_slots[None, :] <= pos[:, None])[:, None, None, :]
                    out = d(tokens, pos[:, None], mask, cache)
                outs.append(out[:, -1].float())
            for c in caches:
                c.lens += 1
            for i in (0, 1):
                errors[i].append(_rel(outs[i], outs[2]))
                agree[i] += int((outs[i].argmax(-1) == outs[2].argmax(-1)).sum())
            tokens = outs[2].argmax(-1)[:, None]
    assert max(errors[0]) <= 1.5 * max(errors[1]) + 1e-3, (errors[0], errors[1])
    assert agree[0] >= agree[1] - 3 and agree[0] >= 48 * 3 // 4, agree

    gen = Generator(bf16, tok, max_batch_size=4, max_seq_len=128, compile="reduce-overhead", kernels="triton")
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    together = gen.generate(prompts, params)
    alone = [gen.generate([p], params)[0] for p in prompts]  # the single-row kernel step
    same = sum(a == b for t, s in zip(together, alone) for a, b in zip(t.token_ids, s.token_ids))
    assert same >= 3 * 24 * 3 // 4, [(t.token_ids, s.token_ids) for t, s in zip(together, alone)]
