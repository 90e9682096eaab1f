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
    from infer.bench import ARCHS, build_random_model

    ARCHS["gpu-test"] = SHAPE
    model, tok = build_random_model("gpu-test", torch.float32, torch.device("cuda"))
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
    gen = Generator(model, tok, max_batch_size=2, max_seq_len=128, compile="reduce-overhead", compile_prefill=True)
    assert gen.compile_mode == "reduce-overhead"
    gen.warmup(batch_sizes=(2,), prompt_len=16)
    compiled = gen.generate(prompts, params)  # longest prompt 21 tokens: prefill bucket 32
    for e, c in zip(eager, compiled):
        assert c.token_ids == e.token_ids
    graphs = counters["stats"]["unique_graphs"]
    recorded = len(gen._graphs)
    gen.generate([[9, 9, 9], list(range(200, 226))], params)  # 26 tokens: same bucket
    assert counters["stats"]["unique_graphs"] == graphs
    assert len(gen._graphs) == recorded == 1  # one CUDA graph (batch 2, greedy), replayed


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
    assert sample(2) != first  # the graph's random stream follows the new seed
    assert len(gen._graphs) == 1


def test_nf4_matvec_equals_dequantized_linear_on_gpu():
    from infer.quantize import NF4Linear

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
    from infer.load import load, weight_bytes
    from infer.quantize import NF4Linear
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
