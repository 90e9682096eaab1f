"""infer.load and infer.quantize on CPU: bitsandbytes 0.50 runs int8, nf4 and fp4 on the CPU,
so quantized reloads are tested here for real, not only on the GPU machine."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import infer
from infer.generate import Generator
from infer.loading import LoadError, load, weight_bytes
from infer.quantize import save_quantized
from infer.quantized_layers import Int8Linear, NF4Linear, use_compiled_kernels
from infer.sampling import SamplingParams


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_quantized_reload_generates(tiny_model_dir, quant):
    import bitsandbytes as bnb

    model, tok = load(tiny_model_dir, quant=quant)
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, bnb.nn.Linear4bit if quant == "nf4" else bnb.nn.Linear8bitLt)
    assert model.tunewright["quant"] == quant and model.tunewright["device"] == "cpu"
    full, _ = load(tiny_model_dir)
    linear_full = sum(m.weight.numel() * 4 for m in full.model.layers.modules() if isinstance(m, torch.nn.Linear))
    linear_quant = weight_bytes(model.model.layers)
    assert linear_quant < linear_full * (0.2 if quant == "nf4" else 0.3)  # fp32 -> 4 / 8 bits (+ scales)
    result = Generator(model, tok, max_batch_size=2, max_seq_len=64).generate(
        ["Hello", "Count: 1 2 3"], SamplingParams(max_new_tokens=8, ignore_eos=True))
    assert [len(r.token_ids) for r in result] == [8, 8]
    x = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        ref, got = full(x).logits, model(x).logits
    assert torch.isfinite(got).all()
    assert ((got - ref).norm() / ref.norm()) < 0.5  # quantized, but the same function


def test_compiled_kernels_compute_what_bitsandbytes_computes(tiny_model_dir):
    x = torch.randint(0, 1000, (2, 9))
    for quant, cls, tolerance in (("nf4", NF4Linear, 1e-5), ("fp4", NF4Linear, 1e-5), ("int8", Int8Linear, 0.02)):
        model, _ = load(tiny_model_dir, quant=quant)
        for layer in model.modules():  # the reference is bitsandbytes' canonical kernel on every CPU, not its
            if hasattr(layer, "support_avx512bf16_for_cpu"):  # AVX512-BF16 path (bf16 activations and scales)
                layer.support_avx512bf16_for_cpu = False
        with torch.no_grad():
            ref = model(x).logits
            assert use_compiled_kernels(model) == 14  # 7 linears x 2 layers; lm_head stays 16/32-bit
            got = model(x).logits
        assert isinstance(model.model.layers[1].self_attn.k_proj, cls)
        # nf4/fp4: identical dequantized weights. int8: bitsandbytes also quantizes the
        # activations; the compiled layer keeps them in full precision.
        assert ((got - ref).norm() / ref.norm()) < tolerance, quant


def test_nf4_matvec_equals_dequantize_then_linear():
    # Decode steps (<= 4 rows) take NF4Linear.matvec; more rows dequantize + linear.
    torch.manual_seed(0)
    n, k = 48, 256
    layer = NF4Linear(torch.randint(0, 256, (n, k // 2), dtype=torch.uint8), torch.rand(n, k // 64),
                      torch.linspace(-1, 1, 16), torch.randn(n), k, n, 64)
    weight = layer.dequantize(torch.float32)
    for shape in ((1, 1, k), (1, 4, k), (2, 2, k)):
        x = torch.randn(shape)
        expected = torch.nn.functional.linear(x, weight, layer.bias)
        assert layer(x).shape == expected.shape
        torch.testing.assert_close(layer.matvec(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_saved_quantized_copy_reloads_without_requantizing(tiny_model_dir, tmp_path):
    out = save_quantized(tiny_model_dir, tmp_path / "q", quant="nf4")
    manifest = json.loads((out / "quantization.json").read_text())
    assert manifest["quant"] == "nf4" and manifest["double_quant"] is True and manifest["weight_bytes"] > 0
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    fresh, _ = load(tiny_model_dir, quant="nf4")
    reloaded, tok = load(out)
    assert reloaded.tunewright["quant"] == "nf4"
    x = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(fresh(x).logits, reloaded(x).logits)
    with pytest.raises(LoadError, match=r"already quantized \(nf4\)"):
        load(out, quant="int8")
    with pytest.raises(LoadError, match="already exists"):
        save_quantized(tiny_model_dir, out, quant="nf4")


def test_infer_load_reads_a_run_directory(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_model_dir, run / "model")
    model, tok = infer.load(run, dtype="bf16")  # `infer.load` is infer.loading.load
    assert model.tunewright["checkpoint"] == str(run / "model")
    assert model.dtype == torch.bfloat16 and tok.pad_token_id is not None


def test_errors_say_what_is_wrong_and_what_to_do(tiny_model_dir, tmp_path):
    with pytest.raises(LoadError, match="not a checkpoint directory"):
        load(tmp_path)
    no_tok = tmp_path / "no-tokenizer"
    no_tok.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / f, no_tok / f)
    with pytest.raises(LoadError, match="no tokenizer.*save_pretrained"):
        load(no_tok)
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(tiny_model_dir / "config.json", no_weights / "config.json")
    with pytest.raises(LoadError, match="no weights"):
        load(no_weights)
    with pytest.raises(LoadError, match="quant must be one of none, int8, nf4, fp4"):
        load(tiny_model_dir, quant="int4")
    if not torch.cuda.is_available():
        with pytest.raises(LoadError, match="no usable CUDA GPU"):
            load(tiny_model_dir, device="cuda")
    with pytest.raises(LoadError, match="device 'meta' is not supported: use auto, cpu, cuda or cuda:N"):
        load(tiny_model_dir, quant="nf4", device="meta")


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    """A run directory as train writes it for LoRA: merged model/, adapter/, manifest naming the base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tmp_path_factory.mktemp("lora-run")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a visible delta, so "adapter applied" is testable
    peft_model.save_pretrained(run / "adapter")
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(run / "model")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(run / "model")
    (run / "manifest.json").write_text(json.dumps({"base_model": {"name": "tiny", "resolved_path": str(tiny_model_dir)}}))
    return run


def test_adapter_on_base_equals_merged_model(lora_run, tiny_model_dir):
    x = torch.tensor([[5, 6, 7, 8]])
    merged, _ = load(lora_run)
    unmerged, tok = load(lora_run, adapter=True)
    base, _ = load(tiny_model_dir)
    assert unmerged.tunewright["adapter"].endswith("adapter") and unmerged.tunewright["checkpoint"] == str(tiny_model_dir)
    with torch.no_grad():
        a, b, c = merged(x).logits, unmerged(x).logits, base(x).logits
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(c, a, atol=1e-2)  # the adapter changed the model


def test_quantized_base_with_adapter_and_kept_modules(lora_run):
    import bitsandbytes as bnb

    model, tok = load(lora_run, quant="nf4", adapter=True, keep_modules=["down_proj"])
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj.base_layer, bnb.nn.Linear4bit)  # quantized base under LoRA
    assert isinstance(layer.self_attn.k_proj, bnb.nn.Linear4bit)  # no adapter there
    assert type(layer.mlp.down_proj.base_layer) is torch.nn.Linear  # kept unquantized
    assert type(layer.self_attn.q_proj.lora_A["default"]) is torch.nn.Linear
    out = Generator(model, tok, max_batch_size=1, max_seq_len=64).generate([[5, 6, 7]], SamplingParams(max_new_tokens=5, ignore_eos=True))
    assert len(out[0].token_ids) == 5


def test_adapter_and_keep_modules_errors(tiny_model_dir):
    with pytest.raises(LoadError, match="adapter/adapter_config.json"):
        load(tiny_model_dir, adapter=True)
    with pytest.raises(LoadError, match="only applies when quantizing"):
        load(tiny_model_dir, keep_modules=["down_proj"])
