"""Write a transformers causal LM and its tokenizer as one GGUF file for llama.cpp / Ollama.

    info = write_gguf(model, tokenizer, "out/model-q8_0.gguf", quant="q8_0")

Everything goes through the `gguf` package: its writer, its architecture and tensor-name
tables, its metadata keys and its quantizers. What llama.cpp needs beyond a plain copy:

* Llama-layout models (llama, mistral) store q/k projection rows interleaved per rotary
  pair, because llama.cpp's rope rotates neighbouring dimensions while transformers rotates
  the two halves of each head. Qwen2 uses llama.cpp's NeoX rope and is stored as is.
* The tokenizer is metadata: tokens, merges, token types, special ids, the chat template,
  and the name of the pre-tokenizer (the regex that splits text before BPE) read from
  tokenizer.json. A pre-tokenizer llama.cpp does not implement is an error, not a guess:
  a wrong split changes every prompt's tokens without any visible failure.
* Types: 1-D tensors (norms, biases) stay f32, as llama.cpp keeps them. With a 4- or 5-bit
  type the output head (the token embedding when tied) is q8_0: llama.cpp's own quantizer
  keeps that tensor at 6+ bits for the same reason, and the gguf package cannot write its
  6-bit K-quant. A tensor whose rows do not split into whole blocks is written in f16.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import numpy as np

# Types the gguf package quantizes itself (K-quants it can only read, so they are not offered).
GGUF_QUANTS = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

_BYTE_LEVEL_SPLITS = {
    # The regexes tokenizer.json files state for their Split pre-tokenizer, by the name
    # llama.cpp gives the same split.
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
             r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}


class ExportError(ValueError):
    """A model, tokenizer or option this exporter cannot write faithfully; the message says why."""


def ggml_type(quant: str):
    import gguf

    if quant not in GGUF_QUANTS:
        raise ExportError(f"--quant {quant!r} is not a GGUF type this exporter writes; choose one of "
                          f"{', '.join(GGUF_QUANTS)} (K-quants need llama.cpp's llama-quantize)")
    return gguf.GGMLQuantizationType[quant.upper()]


def file_type(quant: str):
    import gguf

    if quant == "f32":
        return gguf.LlamaFileType.ALL_F32
    return gguf.LlamaFileType[f"MOSTLY_{quant.upper()}"]


def check_exportable(config) -> str:
    """The GGUF architecture name for `config`, or an ExportError naming what is unsupported."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        arch = ", ".join(getattr(config, "architectures", None) or []) or "unknown class"
        raise ExportError(f"model type {model_type!r} ({arch}) cannot be exported to GGUF here; "
                          f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ExportError(f"{model_type} with hidden_act {config.hidden_act!r}: llama.cpp's {model_type} graph uses silu")
    if getattr(config, "mlp_bias", False):
        raise ExportError(f"{model_type} with mlp_bias: llama.cpp's graph for it has no feed-forward biases")
    if model_type == "qwen2" and getattr(config, "use_sliding_window", False):
        raise ExportError("qwen2 with use_sliding_window: llama.cpp's qwen2 graph attends to the whole context")
    rope_type = rope_parameters(config).get("rope_type", "default")
    if rope_type not in ("default", "linear", "llama3") or (rope_type == "llama3" and model_type == "qwen2"):
        raise ExportError(f"{model_type} with rope scaling {rope_type!r} is not exported (written: none, linear, "
                          "and llama3 for llama-layout models)")
    return "qwen2" if model_type == "qwen2" else "llama"  # llama.cpp runs Mistral as llama


def rope_parameters(config) -> dict:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    params = dict(params)
    if "rope_theta" not in params and getattr(config, "rope_theta", None) is not None:
        params["rope_theta"] = config.rope_theta
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def interleave_rotary_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Reorder a q/k projection's output rows from transformers' rotate-half layout (per head:
    all first-half dims, then all second-half dims) to llama.cpp's pairwise layout (dim i
    next to dim i + half). Works on weights (rows, cols) and biases (rows,)."""
    rows = weight.shape[0]
    half = rows // heads // 2
    grouped = weight.reshape(heads, 2, half, *weight.shape[1:])
    return grouped.swapaxes(1, 2).reshape(weight.shape)


def llama3_rope_factors(config) -> np.ndarray:
    """Per-frequency divisors for llama3 rope scaling, stored as llama.cpp's rope_freqs tensor."""
    p = rope_parameters(config)
    dim = head_dim(config)
    base, factor = p["rope_theta"], p["factor"]
    low, high, original = p["low_freq_factor"], p["high_freq_factor"], p["original_max_position_embeddings"]
    factors = []
    for i in range(0, dim, 2):
        wavelength = 2 * math.pi * base ** (i / dim)
        if wavelength < original / high:
            factors.append(1.0)
        elif wavelength > original / low:
            factors.append(factor)
        else:
            smooth = (original / wavelength - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def write_gguf(model, tokenizer, path, *, quant: str, name: str | None = None) -> dict:
    """Write `model` + `tokenizer` to `path` (overwritten). Returns what was written:
    architecture, tensor types, tokenizer facts, byte size."""
    import gguf

    config = model.config
    arch_name = check_exportable(config)
    qtype = ggml_type(quant)
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    vocab = tokenizer_metadata(tokenizer, model.get_input_embeddings().weight.shape[0])

    path = Path(path)
    # Its INFO lines (endianness, shard plan) restate what the export reports itself.
    logging.getLogger("gguf.gguf_writer").setLevel(logging.WARNING)
    writer = gguf.GGUFWriter(path, arch_name)
    writer.add_name(name or path.stem)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_file_type(file_type(quant))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_architecture(writer, config, vocab["n_vocab"])
    _add_tokenizer(writer, vocab)
    types = _add_tensors(writer, model, arch, qtype)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    counts: dict[str, int] = {}
    for t in types.values():
        counts[t] = counts.get(t, 0) + 1
    return {
        "architecture": arch_name,
        "model_type": config.model_type,
        "quant": quant,
        "tensor_types": counts,
        "kept_f16_for_block_size": sorted(k for k, t in types.items() if t == "F16" and quant not in ("f16",)),
        "tokenizer": {k: vocab[k] for k in ("model", "pre", "bos_id", "eos_id", "eot_id", "pad_id", "add_bos",
                                            "end_of_turn", "n_tokens")},
        "chat_template": bool(vocab["chat_template"]),
        "bytes": os.path.getsize(path),
    }


def _add_architecture(writer, config, n_vocab: int) -> None:
    import gguf

    dim = head_dim(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(n_vocab)
    writer.add_rope_dimension_count(dim)
    if dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(dim)
        writer.add_value_length(dim)
    rope = rope_parameters(config)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))


def _add_tensors(writer, model, arch, qtype) -> dict[str, str]:
    import gguf
    from gguf.quants import quantize

    config = model.config
    tensor_map = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    allowed = set(gguf.MODEL_TENSORS[arch])
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    tied = bool(getattr(config, "tie_word_embeddings", False))
    llama_layout = arch == gguf.MODEL_ARCH.LLAMA
    low_bit = qtype not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16,
                            gguf.GGMLQuantizationType.BF16, gguf.GGMLQuantizationType.Q8_0)
    head_tensor = gguf.MODEL_TENSOR.TOKEN_EMBD if tied else gguf.MODEL_TENSOR.OUTPUT
    types: dict[str, str] = {}
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reads the output head from token_embd when output.weight is absent
        found = tensor_map.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))
        if found is None or found[0] not in allowed:
            raise ExportError(f"tensor {hf_name} {tuple(tensor.shape)} has no place in llama.cpp's "
                              f"{gguf.MODEL_ARCH_NAMES[arch]} graph; this checkpoint is not a plain "
                              f"{config.model_type} model")
        kind, name = found
        data = tensor.detach().to("cpu").float().numpy()
        if llama_layout and kind in (gguf.MODEL_TENSOR.ATTN_Q, gguf.MODEL_TENSOR.ATTN_K):
            data = interleave_rotary_rows(data, heads if kind == gguf.MODEL_TENSOR.ATTN_Q else kv_heads)
        target = qtype
        if data.ndim == 1:
            target = gguf.GGMLQuantizationType.F32
        elif low_bit and kind == head_tensor:
            target = gguf.GGMLQuantizationType.Q8_0
        block = gguf.GGML_QUANT_SIZES[target][0]
        if data.shape[-1] % block:
            target = gguf.GGMLQuantizationType.F16
        _add(writer, name, data, target, quantize)
        types[name] = target.name
    if llama_layout and rope_parameters(config)["rope_type"] == "llama3":
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        _add(writer, name, llama3_rope_factors(config), gguf.GGMLQuantizationType.F32, quantize)
        types[name] = "F32"
    return types


def _add(writer, name: str, data: np.ndarray, target, quantize) -> None:
    import gguf

    if target == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
    elif target == gguf.GGMLQuantizationType.F16:
        writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float16))
    else:
        writer.add_tensor(name, quantize(np.ascontiguousarray(data), target), raw_dtype=target)


# ---------------------------------------------------------------- tokenizer


def tokenizer_metadata(tokenizer, n_vocab: int) -> dict:
    """Everything llama.cpp needs to tokenize and stop like `tokenizer` does.

    n_vocab is the embedding's row count: a vocabulary shorter than it (padded embeddings)
    is filled with unused placeholder tokens so token ids and rows stay aligned.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(f"{type(tokenizer).__name__} has no tokenizer.json (fast tokenizer); GGUF export reads "
                          "the vocabulary, merges and pre-tokenizer from it")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ExportError(f"tokenizer model {model.get('type')!r} is not exported; GGUF export writes BPE "
                          "tokenizers (byte-level as in GPT-2 / Llama 3 / Qwen2, or sentencepiece-style with byte fallback)")
    byte_fallback = bool(model.get("byte_fallback"))
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    id_to_token = {i: t for t, i in model["vocab"].items()}
    id_to_token.update({i: t["content"] for i, t in added.items()})
    n_tokens = max(id_to_token) + 1
    if n_tokens > n_vocab:
        raise ExportError(f"the tokenizer has {n_tokens} tokens but the model's embedding only {n_vocab} rows")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    import gguf

    normalizer = (spec.get("normalizer") or {}).get("type")
    if not byte_fallback and normalizer not in (None, "NFC"):  # NFC (Qwen2): llama.cpp skips it, a no-op on composed text
        raise ExportError(f"the tokenizer normalizes text ({normalizer}) before splitting; llama.cpp's byte-level "
                          "tokenizer does not, so prompts would be tokenized differently")
    if byte_fallback:
        kind, pre, add_space = "llama", None, _sentencepiece_space_prefix(spec)
        scores = _merge_scores(merges, id_to_token, n_vocab)
    else:
        kind, pre, add_space, scores = "gpt2", _byte_level_pre(spec), None, None
    tokens, types = [], []
    for i in range(n_vocab):
        token = id_to_token.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif byte_fallback and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            tokens.append(token)  # llama.cpp's byte fallback looks these up by type
            types.append(gguf.TokenType.BYTE)
        elif i in added:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    unk_id = tokenizer.unk_token_id
    if byte_fallback and unk_id is not None and unk_id < n_vocab:
        types[unk_id] = gguf.TokenType.UNKNOWN

    probe = list(tokenizer("a").input_ids)
    template = getattr(tokenizer, "chat_template", None)
    end_of_turn = end_of_turn_token(tokenizer) if template else None
    eos_id = tokenizer.eos_token_id
    return {
        "model": kind, "pre": pre, "add_space_prefix": add_space, "tokens": tokens, "types": types,
        "scores": scores, "merges": merges, "n_vocab": n_vocab, "n_tokens": n_tokens,
        "bos_id": tokenizer.bos_token_id, "eos_id": eos_id, "unk_id": unk_id, "pad_id": tokenizer.pad_token_id,
        "eot_id": end_of_turn[0] if end_of_turn else None, "end_of_turn": end_of_turn[1] if end_of_turn else None,
        "add_bos": bool(probe) and tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id,
        "add_eos": bool(probe) and eos_id is not None and probe[-1] == eos_id,
        "chat_template": template,
    }


def end_of_turn_token(tokenizer) -> tuple[int, str] | None:
    """The special token the chat template closes an assistant turn with (ChatML's <|im_end|>,
    Llama 3's <|eot_id|>): what generation must stop at."""
    from infer.prompts import chat_ids, through_end_of_turn

    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    try:
        prompt = chat_ids(tokenizer, conversation[:1], add_generation_prompt=True)
        full = chat_ids(tokenizer, conversation, add_generation_prompt=False)
    except Exception:  # a template that refuses this shape of conversation names no end-of-turn
        return None
    answer = full[len(prompt):] if full[: len(prompt)] == prompt else []
    turn = through_end_of_turn(tokenizer, answer)
    special = set(tokenizer.all_special_ids)
    special.update(i for i, t in tokenizer.added_tokens_decoder.items() if t.special)
    if not turn or turn[-1] not in special:
        return None
    return turn[-1], tokenizer.convert_ids_to_tokens(turn[-1])


def _byte_level_pre(spec: dict) -> str:
    """llama.cpp's name for the split a byte-level tokenizer.json performs before BPE."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if any(s.get("type") == "ByteLevel" and s.get("add_prefix_space") for s in steps):
        raise ExportError("the tokenizer's byte-level pre-tokenizer adds a prefix space, which llama.cpp's does not")
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "starcoder"  # llama.cpp: each digit alone, then GPT-2's regex
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        for name, regex in _BYTE_LEVEL_SPLITS.items():
            if pattern == regex:
                return name
    raise ExportError(f"the tokenizer's pre-tokenizer ({json.dumps(pre)[:300]}) is not one whose llama.cpp name is "
                      "known here (GPT-2, StarCoder/SmolLM digits, Llama 3, Qwen2); writing another name would "
                      "make llama.cpp split text differently from training")


def _sentencepiece_space_prefix(spec: dict) -> bool:
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    for step in steps:
        if step.get("type") == "Metaspace":
            return step.get("prepend_scheme", "always") != "never" and step.get("add_prefix_space", True)
    normalizer = json.dumps(spec.get("normalizer") or {})
    return '"Prepend"' in normalizer


def _merge_scores(merges: list[str], id_to_token: dict, n_vocab: int) -> list[float]:
    """Sentencepiece scores for a BPE vocabulary: llama.cpp's SPM tokenizer merges the pair
    whose result scores highest, BPE applies the lowest-ranked merge first, so a token made by
    merge r scores -r. Tokens no merge makes (bytes, characters, specials) score 0."""
    rank = {}
    for r, merge in enumerate(merges):
        rank.setdefault(merge.replace(" ", "", 1), r)
    return [-float(rank[t]) if (t := id_to_token.get(i)) in rank else 0.0 for i in range(n_vocab)]


def _add_tokenizer(writer, vocab: dict) -> None:
    writer.add_tokenizer_model(vocab["model"])
    if vocab["pre"]:
        writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types([int(t) for t in vocab["types"]])
    if vocab["scores"] is not None:
        writer.add_token_scores(vocab["scores"])
    if vocab["merges"] and vocab["model"] == "gpt2":
        writer.add_token_merges(vocab["merges"])
    if vocab["add_space_prefix"] is not None:
        writer.add_add_space_prefix(vocab["add_space_prefix"])
    for key, add in (("bos_id", writer.add_bos_token_id), ("eos_id", writer.add_eos_token_id),
                     ("unk_id", writer.add_unk_token_id), ("pad_id", writer.add_pad_token_id)):
        if vocab[key] is not None:
            add(vocab[key])
    if vocab["eot_id"] is not None:
        writer.add_eot_token_id(vocab["eot_id"])
    writer.add_add_bos_token(vocab["add_bos"])
    writer.add_add_eos_token(vocab["add_eos"])
    if vocab["chat_template"]:
        writer.add_chat_template(vocab["chat_template"])
