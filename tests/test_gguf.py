"""GGUF loading: ours vs transformers on the packaged SmolLM2 file, synthetic files written with
gguf.GGUFWriter, brute-force block decoders, and corrupt / crafted files that must fail cleanly."""

from __future__ import annotations

import io
import struct
import time
import tracemalloc
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch

# its tests share costly module fixtures: one xdist worker runs them all (make test's --dist loadgroup)
pytestmark = pytest.mark.xdist_group("gguf")

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

from gguf import GGMLQuantizationType as Q  # noqa: E402

from mistral_lm.checkpoints.gguf import (  # noqa: E402
    GGUFQuantizedTensor, load_gguf, read_gguf, unpermute_rope_rows)
from mistral_lm.checkpoints.gguf_tokenizer import gguf_tokenizer_parts  # noqa: E402
from mistral_lm.defaults import default_model_path  # noqa: E402
from mistral_lm.errors import CheckpointError, TokenizerError  # noqa: E402
from mistral_lm.modeling import MistralForCausalLM  # noqa: E402
from mistral_lm.tokenizer import MistralTokenizer  # noqa: E402
from .conftest import gguf_parsed_once, hf_gguf_tokenizer  # noqa: E402

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! It's 2024-11-24 and pi is 3.14159; 1,234,567 items cost $89.99.",
    "def fib(n: int) -> int:\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < 10; ++i) {\n\tsum += a[i] * b[i];\n}",
    "Emoji: 🤗🚀 family 👨‍👩‍👧 flag 🇫🇷 skin 👍🏽 heart ❤️",
    "日本語のテキスト、中文文本和한국어 텍스트。",
    "Arabic مرحبا بالعالم, Hindi नमस्ते दुनिया, Greek καλημέρα κόσμε",
    "   leading spaces, trailing spaces   ",
    "runs:    four    \t\ttabs\n\n\nthree newlines \r\n crlf     end",
    " ",
    "x² + y³ = z⁴, ½ + ¼ = ¾, Ⅻ o'clock, ١٢٣ ٤٥٦",
    "Ça va? Naïve café, façade, Ångström, straße, œuvre.",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "URLs https://example.com/path?q=a&b=c#frag and emails me@example.org",
    "ALL CAPS and MiXeD CaSe and snake_case_words and camelCaseWords",
]


# --------------------------------------------------------------------------- shared fixtures
@pytest.fixture(scope="module")
def smollm() -> Path:
    try:
        return default_model_path()
    except CheckpointError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def ours(smollm: Path):
    return load_gguf(smollm)


@pytest.fixture(scope="module")
def ours_raw(smollm: Path):
    return load_gguf(smollm, dequantize=False)


@pytest.fixture(scope="module")
def hf_model(smollm: Path):
    pytest.importorskip("accelerate")  # transformers needs it to load GGUF weights
    with gguf_parsed_once():
        model = transformers.AutoModelForCausalLM.from_pretrained(smollm.parent, gguf_file=smollm.name,
                                                                  dtype=torch.float32)
    return model.eval()


# --------------------------------------------------------------------------- the packaged model
def test_config_matches_transformers(ours, hf_model):
    ref = hf_model.config  # loaded by transformers.AutoConfig.from_pretrained(dir, gguf_file=name)
    cfg = ours.config
    for name in ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
                 "rms_norm_eps", "hidden_act", "tie_word_embeddings", "bos_token_id", "eos_token_id",
                 "pad_token_id"):
        assert getattr(cfg, name) == getattr(ref, name), name
    assert cfg.rope_theta == ref.rope_parameters["rope_theta"]
    assert cfg.sliding_window is None  # Llama: full attention
    assert ours.chat_template == ours.metadata["tokenizer.chat_template"]
    assert "tokenizer.ggml.tokens" not in ours.metadata  # vocabularies stay out of the summary


def test_tensors_match_transformers(ours, hf_model):
    ref = hf_model.state_dict()
    assert ours.config.tie_word_embeddings and "lm_head.weight" not in ours.tensors
    assert set(ref) == set(ours.tensors) | {"lm_head.weight"}
    diffs = {name: (ours.tensors[name] - ref[name]).abs().max().item() for name in ours.tensors}
    assert all(ours.tensors[n].shape == ref[n].shape and ours.tensors[n].dtype == torch.float32 for n in diffs)
    worst = max(diffs, key=diffs.get)
    print(f"max abs diff vs transformers: {diffs[worst]:.3g} ({worst})")
    assert diffs[worst] <= 1e-6, worst
    assert torch.equal(ref["lm_head.weight"], ours.tensors["model.embed_tokens.weight"])


def test_raw_blocks_dequantize_to_the_dequantized_path(ours, ours_raw):
    assert ours_raw.tensors.keys() == ours.tensors.keys()
    kinds = set()
    for name, value in ours_raw.tensors.items():
        if isinstance(value, GGUFQuantizedTensor):
            kinds.add(Q(value.ggml_type).name)
            assert value.shape == tuple(ours.tensors[name].shape) and value.data.dtype == np.uint8
            assert value.data.shape[0] == value.shape[0]  # one row of blocks per output feature
            assert torch.equal(value.dequantize(), ours.tensors[name]), name
        else:  # norms (F32) come back as tensors
            assert value.ndim == 1 and torch.equal(value, ours.tensors[name]), name
    assert kinds == {"Q4_1", "Q8_0"}


def test_raw_load_is_fast_and_lean(smollm):
    load_gguf(smollm, dequantize=False)  # warm the page cache
    start = time.perf_counter()
    ckpt = load_gguf(smollm, dequantize=False)
    elapsed = time.perf_counter() - start
    tracemalloc.start()
    load_gguf(smollm, dequantize=False)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(f"load_gguf(dequantize=False): {elapsed:.3f} s, traced peak {peak / 2**20:.1f} MiB")
    assert elapsed < 2.0
    assert peak < 40 * 2**20  # the 98 MB of blocks stay in the file map; only Q/K rows are copied
    assert not ckpt.tensors["model.layers.0.mlp.up_proj.weight"].data.flags.writeable  # a view


def test_dtype_is_honoured(tiny_file):
    full, half = load_gguf(tiny_file[0]), load_gguf(tiny_file[0], dtype=torch.bfloat16)
    assert {t.dtype for t in half.tensors.values()} == {torch.bfloat16}
    assert all(torch.equal(half.tensors[n], full.tensors[n].bfloat16()) for n in full.tensors)
    with pytest.raises(TypeError, match="floating-point"):
        load_gguf(tiny_file[0], dtype=torch.int8)


def test_logits_match_transformers(ours, hf_model, smollm):
    with torch.device("meta"):
        model = MistralForCausalLM(ours.config)
    tensors = dict(ours.tensors)
    if ours.config.tie_word_embeddings:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    model.load_state_dict(tensors, strict=True, assign=True)
    model.eval()
    backend, _ = gguf_tokenizer_parts(read_gguf(smollm))
    worst = 0.0
    for text in CORPUS[1:4]:
        ids = torch.tensor([backend.encode(text).ids])
        with torch.no_grad():
            a = model(ids).logits
            b = hf_model(ids).logits
        assert a.shape == (1, ids.shape[1], ours.config.vocab_size) and torch.isfinite(a).all()
        worst = max(worst, (a - b).abs().max().item())
    print(f"max abs logit diff vs transformers: {worst:.3g}")
    assert worst <= 1e-3


# --------------------------------------------------------------------------- tokenizer
def _numeric_split(text: str) -> list[str]:
    """Cut text around every Unicode number character, as SmolLM2's own tokenizer.json (Digits)
    and llama.cpp's "smollm" pre-tokenizer do; transformers' GGUF loader ignores "smollm"."""
    pieces, current = [], ""
    for ch in text:
        if unicodedata.category(ch).startswith("N"):
            pieces += [current, ch] if current else [ch]
            current = ""
        else:
            current += ch
    return pieces + [current] * bool(current)


def _reference_ids(hf_tokenizer, text: str) -> list[int]:
    return [i for piece in _numeric_split(text) for i in hf_tokenizer(piece, add_special_tokens=False)["input_ids"]]


@pytest.fixture(scope="module")
def hf_tokenizer(smollm):
    return hf_gguf_tokenizer(smollm)


def test_byte_level_tokenizer_matches_transformers(smollm, hf_tokenizer):
    backend, kwargs = gguf_tokenizer_parts(read_gguf(smollm))
    for text in CORPUS:
        ids = backend.encode(text).ids
        assert ids == _reference_ids(hf_tokenizer, text), text
        assert backend.decode(ids, skip_special_tokens=False) == text
    assert backend.encode("Hello 12345").ids == hf_tokenizer("Hello 12345")["input_ids"]
    for role in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert kwargs[role] == getattr(hf_tokenizer, role), role
    assert kwargs["add_bos_token"] is False and kwargs["add_eos_token"] is False
    assert kwargs["chat_template"] == hf_tokenizer.chat_template
    assert backend.encode("<|im_start|>").ids == [hf_tokenizer.convert_tokens_to_ids("<|im_start|>")]


def test_gpt2_split_matches_transformers_unsplit(smollm, hf_tokenizer, tmp_path):
    """The same vocabulary declared pre="gpt-2": no digit cutting, transformers' ids as they are."""
    md = read_gguf(smollm).metadata
    writer = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(md["tokenizer.ggml.tokens"])
    writer.add_token_types(md["tokenizer.ggml.token_type"].tolist())
    writer.add_token_merges(md["tokenizer.ggml.merges"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    backend, _ = gguf_tokenizer_parts(read_gguf(tmp_path / "gpt2.gguf"))
    for text in CORPUS:
        assert backend.encode(text).ids == hf_tokenizer(text, add_special_tokens=False)["input_ids"], text


def test_gguf_tokenizer_gives_the_reference_ids(smollm, hf_tokenizer):
    tok = MistralTokenizer.from_pretrained(smollm)
    assert isinstance(tok, MistralTokenizer) and tok.chat_template == hf_tokenizer.chat_template
    assert (tok.bos_token_id, tok.eos_token_id, tok.add_bos_token) == (1, 2, False)
    for text in CORPUS:
        expected = _reference_ids(hf_tokenizer, text)
        assert tok(text, split_special_tokens=False)["input_ids"] == expected, text
        assert tok.decode(expected) == text


def _sentencepiece_gguf(path: Path, sp, *, add_space_prefix: bool | None = None) -> None:
    """Write a SentencePiece vocabulary the way llama.cpp's converter does (pieces, scores, types)."""
    n = sp.get_piece_size()
    kind = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 5 if sp.is_unused(i)
            else 6 if sp.is_byte(i) else 1 for i in range(n)]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list([sp.id_to_piece(i) for i in range(n)])
    writer.add_token_scores([sp.get_score(i) for i in range(n)])
    writer.add_token_types(kind)
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    if add_space_prefix is not None:
        writer.add_add_space_prefix(add_space_prefix)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_sentencepiece_tokenizer_matches_sentencepiece(tmp_path, tokenizer_model_v1):
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model_v1))  # Mistral-7B-v0.1's vocabulary
    _sentencepiece_gguf(tmp_path / "v1.gguf", sp)
    backend, kwargs = gguf_tokenizer_parts(read_gguf(tmp_path / "v1.gguf"))
    plain = [t for t in CORPUS if "<|" not in t] + ["", "  two leading", "\n\nnewlines first"]
    for text in plain:
        ids = backend.encode(text).ids
        assert ids == sp.encode(text), text
        assert backend.decode(ids) == sp.decode(ids) == text
    assert backend.encode("a\u2581b").ids == sp.encode("a\u2581b")  # a literal U+2581 is a space
    assert backend.encode("<s>hi</s>").ids[0::2] == [sp.bos_id(), sp.eos_id()]  # control tokens stay whole
    assert kwargs["add_bos_token"] is True  # llama.cpp's default for SentencePiece files
    assert (kwargs["bos_token"], kwargs["eos_token"], kwargs["unk_token"]) == ("<s>", "</s>", "<unk>")


def _tiny_sentencepiece(add_dummy_prefix: bool = True):
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 10), model_writer=model, model_type="bpe", vocab_size=512,
        character_coverage=0.98,  # rarer characters go through byte fallback
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=add_dummy_prefix, hard_vocab_limit=False, minloglevel=2)
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


@pytest.mark.parametrize("prefix", [True, False])
def test_small_sentencepiece_vocab_with_byte_fallback(tmp_path, prefix):
    sp = _tiny_sentencepiece(prefix)
    _sentencepiece_gguf(tmp_path / "t.gguf", sp, add_space_prefix=prefix)
    backend, _ = gguf_tokenizer_parts(read_gguf(tmp_path / "t.gguf"))
    for text in [t for t in CORPUS if "<|" not in t] + ["unseen: ЖЖЖ 🦀 ß"]:
        ids = backend.encode(text).ids
        assert ids == sp.encode(text), text
        assert backend.decode(ids) == sp.decode(ids), text


# --------------------------------------------------------------------------- synthetic files
TINY = dict(hidden=64, ff=128, layers=2, heads=4, kv_heads=2)
# GGUF name -> HF name, as llama.cpp and transformers spell them (the spec our table must follow).
HF_NAME = {
    "token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight", "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
# storage type per tensor, so every supported simple type appears
STORAGE = {"token_embd": Q.Q8_0, "output": Q.BF16, "attn_q": Q.Q4_0, "attn_k": Q.Q8_0, "attn_v": Q.F16,
           "attn_output": Q.Q4_1, "ffn_gate": Q.Q4_0, "ffn_up": Q.F16, "ffn_down": Q.Q8_0}


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to Q/K rows: each head's halves interleaved pairwise."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tiny_tensors(vocab: int, rng: np.random.Generator, tied: bool) -> dict[str, np.ndarray]:
    """GGUF name -> weight in HF row order (before llama.cpp's permutation)."""
    h, ff, d = TINY["hidden"], TINY["ff"], TINY["hidden"] // TINY["heads"]
    shapes = {"token_embd.weight": (vocab, h), "output_norm.weight": (h,), "output.weight": (vocab, h)}
    for i in range(TINY["layers"]):
        shapes.update({f"blk.{i}.attn_norm.weight": (h,), f"blk.{i}.ffn_norm.weight": (h,),
                       f"blk.{i}.attn_q.weight": (h, h), f"blk.{i}.attn_k.weight": (TINY["kv_heads"] * d, h),
                       f"blk.{i}.attn_v.weight": (TINY["kv_heads"] * d, h), f"blk.{i}.attn_output.weight": (h, h),
                       f"blk.{i}.ffn_gate.weight": (ff, h), f"blk.{i}.ffn_up.weight": (ff, h),
                       f"blk.{i}.ffn_down.weight": (h, ff)})
    if tied:
        del shapes["output.weight"]
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def _kind(name: str) -> str:
    return name.split(".")[-2]


def write_tiny_gguf(path: Path, sp, *, arch: str = "llama", tied: bool = True, window: int | None = None,
                    kv: dict | None = None, tensors: dict[str, np.ndarray] | None = None,
                    storage: dict | None = None) -> dict[str, np.ndarray]:
    """A tiny model file; returns GGUF name -> the rows as stored (HF order for all but Q/K)."""
    tensors = tensors if tensors is not None else _tiny_tensors(sp.get_piece_size(), np.random.default_rng(0), tied)
    storage = {**STORAGE, **(storage or {})}
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(256)
    writer.add_embedding_length(TINY["hidden"])
    writer.add_feed_forward_length(TINY["ff"])
    writer.add_block_count(TINY["layers"])
    writer.add_head_count(TINY["heads"])
    writer.add_head_count_kv(TINY["kv_heads"])
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(500000.0)
    writer.add_rope_dimension_count(TINY["hidden"] // TINY["heads"])
    if window is not None:
        writer.add_sliding_window(window)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([sp.id_to_piece(i) for i in range(sp.get_piece_size())])
    writer.add_token_scores([sp.get_score(i) for i in range(sp.get_piece_size())])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template("{{ messages }}")
    for key, (value, vtype) in (kv or {}).items():
        writer.add_key_value(key, value, vtype)
    stored = {}
    for name, w in tensors.items():
        heads = {"attn_q": TINY["heads"], "attn_k": TINY["kv_heads"]}.get(_kind(name))
        rows = llama_cpp_permute(w, heads) if heads else w
        qtype = storage.get(_kind(name), Q.F32) if w.ndim == 2 else Q.F32
        data = gguf.quants.quantize(rows, qtype)
        writer.add_tensor(name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
        if qtype in _DECODABLE:  # the stored bytes, decoded by the brute-force reference
            file_rows = np.ascontiguousarray(data).view(np.uint8).reshape(len(rows) if rows.ndim == 2 else 1, -1)
            stored[name] = reference_dequantize(file_rows, qtype).reshape(rows.shape)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


# ---- brute-force block decoders, written from ggml's block layouts (one block = 32 or 256 values)
def _f16(b: np.ndarray) -> np.ndarray:
    return b.view(np.float16).astype(np.float32)


def _q8_0(b):  # d:f16, q:int8[32]
    return _f16(b[:, 0:2]) * b[:, 2:].view(np.int8).astype(np.float32)


def _q4_0(b):  # d:f16, 16 bytes: low nibbles are values 0..15, high nibbles 16..31, offset 8
    q = np.concatenate([b[:, 2:] & 0xF, b[:, 2:] >> 4], axis=1).astype(np.float32) - 8
    return _f16(b[:, 0:2]) * q


def _q4_1(b):  # d:f16, m:f16, nibbles as Q4_0 without offset
    q = np.concatenate([b[:, 4:] & 0xF, b[:, 4:] >> 4], axis=1).astype(np.float32)
    return _f16(b[:, 0:2]) * q + _f16(b[:, 2:4])


def _k_scale_min(scales: np.ndarray, j: int) -> tuple[int, int]:  # 6-bit packed (ggml get_scale_min_k4)
    if j < 4:
        return int(scales[j] & 63), int(scales[j + 4] & 63)
    return (int((scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4)),
            int((scales[j + 4] >> 4) | ((scales[j] >> 6) << 4)))


def _q4_k(b):  # d, dmin: f16; scales[12]; qs[128]
    out = np.zeros((len(b), 256), np.float32)
    for r, blk in enumerate(b):
        d, dmin, scales, qs = _f16(blk[0:2])[0], _f16(blk[2:4])[0], blk[4:16], blk[16:144]
        for chunk in range(4):  # 64 values: low nibbles then high nibbles of 32 bytes
            q = qs[32 * chunk: 32 * chunk + 32]
            for half, vals in enumerate((q & 0xF, q >> 4)):
                sc, m = _k_scale_min(scales, 2 * chunk + half)
                out[r, 64 * chunk + 32 * half: 64 * chunk + 32 * half + 32] = d * sc * vals - dmin * m
    return out


def _q5_k(b):  # d, dmin: f16; scales[12]; qh[32]; qs[128]
    out = np.zeros((len(b), 256), np.float32)
    for r, blk in enumerate(b):
        d, dmin, scales, qh, qs = _f16(blk[0:2])[0], _f16(blk[2:4])[0], blk[4:16], blk[16:48], blk[48:176]
        for chunk in range(4):
            q = qs[32 * chunk: 32 * chunk + 32]
            for half, vals in enumerate((q & 0xF, q >> 4)):
                high = ((qh >> (2 * chunk + half)) & 1).astype(np.float32) * 16
                sc, m = _k_scale_min(scales, 2 * chunk + half)
                out[r, 64 * chunk + 32 * half: 64 * chunk + 32 * half + 32] = d * sc * (vals + high) - dmin * m
    return out


def _q6_k(b):  # ql[128]; qh[64]; scales: int8[16]; d: f16
    out = np.zeros((len(b), 256), np.float32)
    for r, blk in enumerate(b):
        ql, qh, sc, d = blk[0:128], blk[128:192], blk[192:208].view(np.int8), _f16(blk[208:210])[0]
        for n in range(2):  # two halves of 128 values
            l_, h_, s_ = ql[64 * n: 64 * n + 64], qh[32 * n: 32 * n + 32], sc[8 * n: 8 * n + 8]
            quads = [(l_[:32] & 0xF) | (((h_ >> 0) & 3) << 4), (l_[32:] & 0xF) | (((h_ >> 2) & 3) << 4),
                     (l_[:32] >> 4) | (((h_ >> 4) & 3) << 4), (l_[32:] >> 4) | (((h_ >> 6) & 3) << 4)]
            for k, q in enumerate(quads):
                for half in range(2):  # a scale per 16 values
                    vals = q[16 * half: 16 * half + 16].astype(np.float32) - 32
                    start = 128 * n + 32 * k + 16 * half
                    out[r, start: start + 16] = d * s_[2 * k + half] * vals
    return out


_REFERENCE = {Q.Q8_0: (34, _q8_0), Q.Q4_0: (18, _q4_0), Q.Q4_1: (20, _q4_1),
              Q.Q4_K: (144, _q4_k), Q.Q5_K: (176, _q5_k), Q.Q6_K: (210, _q6_k)}
_DECODABLE = {Q.F32, Q.F16, Q.BF16, *_REFERENCE}


def reference_dequantize(rows: np.ndarray, qtype: Q) -> np.ndarray:
    """(rows, bytes) -> (rows, values), from the block layouts above; floats by reinterpretation."""
    if qtype in (Q.F32, Q.F16):
        return rows.view(np.float32 if qtype == Q.F32 else np.float16).astype(np.float32)
    if qtype == Q.BF16:  # the upper half of a float32
        return (rows.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    size, decode = _REFERENCE[qtype]
    return decode(rows.reshape(-1, size)).reshape(rows.shape[0], -1)


@pytest.fixture(scope="module")
def tiny_sp():
    return _tiny_sentencepiece()


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory, tiny_sp) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_tiny_gguf(path, tiny_sp)


def _hf(name: str) -> str:
    parts = name.split(".")
    if parts[0] == "blk":
        return HF_NAME["blk.{i}." + ".".join(parts[2:])].format(i=parts[1])
    return HF_NAME[name]


@pytest.mark.parametrize("arch,tied,window", [("llama", True, None), ("mistral", False, 8)])
def test_tiny_file_loads_with_config_and_exact_values(tmp_path, tiny_sp, arch, tied, window):
    stored = write_tiny_gguf(tmp_path / "m.gguf", tiny_sp, arch=arch, tied=tied, window=window)
    ckpt = load_gguf(tmp_path / "m.gguf")
    c = ckpt.config
    assert (c.model_type, c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (arch, 64, 128, 2)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (4, 2, 16)
    assert (c.vocab_size, c.max_position_embeddings, c.rope_theta) == (tiny_sp.get_piece_size(), 256, 500000.0)
    assert (c.sliding_window, c.tie_word_embeddings, c.bos_token_id, c.eos_token_id) == (window, tied, 1, 2)
    assert c.rms_norm_eps == pytest.approx(1e-5) and ckpt.chat_template == "{{ messages }}"
    assert set(ckpt.tensors) == {_hf(n) for n in stored}
    raw = load_gguf(tmp_path / "m.gguf", dequantize=False)
    for name, rows in stored.items():
        got = ckpt.tensors[_hf(name)].numpy()
        heads = {"attn_q": 4, "attn_k": 2}.get(_kind(name))
        assert np.array_equal(llama_cpp_permute(got, heads) if heads else got, rows), name
        value = raw.tensors[_hf(name)]
        if isinstance(value, GGUFQuantizedTensor):
            assert torch.equal(value.dequantize(), ckpt.tensors[_hf(name)]), name


def test_unpermute_rope_rows_inverts_llama_cpp():
    assert unpermute_rope_rows(4, 1).tolist() == [0, 2, 1, 3]
    w = np.arange(3 * 8 * 5).reshape(24, 5)  # 3 heads of 8 rows
    assert np.array_equal(llama_cpp_permute(w, 3)[unpermute_rope_rows(24, 3)], w)


def _random_blocks(qtype: Q, n_rows: int, n_blocks: int, rng) -> np.ndarray:
    """Random bytes with sane f16 scales (random halves may be inf/NaN)."""
    size = _REFERENCE[qtype][0]
    blocks = rng.integers(0, 256, (n_rows * n_blocks, size), dtype=np.uint8)
    scale_at = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}[qtype]
    for at in scale_at:
        blocks[:, at:at + 2] = rng.uniform(-1, 1, (len(blocks), 1)).astype(np.float16).view(np.uint8)
    return blocks.reshape(n_rows, n_blocks * size)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K])
def test_k_quants_match_brute_force(qtype):
    rows = _random_blocks(qtype, 3, 2, np.random.default_rng(int(qtype)))
    got = GGUFQuantizedTensor(int(qtype), (3, 512), rows).dequantize()
    assert torch.equal(got, torch.from_numpy(reference_dequantize(rows, qtype)))


def test_k_quant_file_keeps_rows_and_unpermutes(tmp_path, tiny_sp):
    """A 256-wide model whose weights are K-quant blocks (no quantizer: random valid blocks)."""
    rng = np.random.default_rng(1)
    h, d = 256, 64
    writer = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "llama")
    for add, value in ((writer.add_context_length, 64), (writer.add_embedding_length, h),
                       (writer.add_feed_forward_length, h), (writer.add_block_count, 1),
                       (writer.add_head_count, 4), (writer.add_head_count_kv, 2),
                       (writer.add_layer_norm_rms_eps, 1e-6), (writer.add_vocab_size, 32)):
        add(value)
    types = {"attn_q": (Q.Q4_K, h), "attn_k": (Q.Q5_K, 2 * d), "attn_v": (Q.Q6_K, 2 * d),
             "attn_output": (Q.Q4_K, h), "ffn_gate": (Q.Q5_K, h), "ffn_up": (Q.Q6_K, h), "ffn_down": (Q.Q4_K, h)}
    stored = {}
    writer.add_tensor("token_embd.weight", rng.standard_normal((32, h)).astype(np.float16))
    for norm in ("output_norm.weight", "blk.0.attn_norm.weight", "blk.0.ffn_norm.weight"):
        writer.add_tensor(norm, np.ones(h, np.float32))
    for kind, (qtype, out) in types.items():
        stored[kind] = _random_blocks(qtype, out, h // 256, rng)
        writer.add_tensor(f"blk.0.{kind}.weight", stored[kind], raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ckpt, raw = load_gguf(tmp_path / "k.gguf"), load_gguf(tmp_path / "k.gguf", dequantize=False)
    for kind, (qtype, _) in types.items():
        name = _hf(f"blk.0.{kind}.weight")
        heads = {"attn_q": 4, "attn_k": 2}.get(kind)
        got = ckpt.tensors[name].numpy()
        assert np.array_equal(llama_cpp_permute(got, heads) if heads else got,
                              reference_dequantize(stored[kind], qtype)), kind
        assert raw.tensors[name].ggml_type == qtype
        assert torch.equal(raw.tensors[name].dequantize(), ckpt.tensors[name]), kind
        if heads is None:  # untouched rows are the file's bytes
            assert np.array_equal(raw.tensors[name].data, stored[kind])


def test_tiny_file_tokenizer(tiny_file, tiny_sp):
    backend, kwargs = gguf_tokenizer_parts(read_gguf(tiny_file[0]))
    assert backend.encode(CORPUS[0]).ids == tiny_sp.encode(CORPUS[0])
    assert kwargs["chat_template"] == "{{ messages }}" and kwargs["model_max_length"] == 256


# --------------------------------------------------------------------------- semantic errors
I32, STR = gguf.GGUFValueType.INT32, gguf.GGUFValueType.STRING


@pytest.mark.parametrize("change,needle", [
    (dict(arch="gpt2"), "'gpt2' is not supported"),
    (dict(kv={"llama.block_count": ("thirty", STR)}), "'llama.block_count' must be int"),
    (dict(kv={"llama.rope.scaling.type": ("yarn", STR)}), "RoPE scaling 'yarn'"),
    (dict(kv={"llama.rope.dimension_count": (8, I32)}), "partial rotary"),
    (dict(kv={"llama.attention.head_count_kv": (3, I32)}), "num_attention_heads (4) must be divisible"),
    (dict(kv={"llama.vocab_size": (999, I32)}), "'token_embd.weight' (model.embed_tokens.weight) has shape"),
    (dict(extra="blk.0.attn_qkv.weight"), "unknown tensors (not part of a Mistral/Llama model): blk.0.attn_qkv"),
    (dict(drop="blk.1.ffn_up.weight"), "missing tensors: blk.1.ffn_up.weight"),
    (dict(storage={"ffn_down": Q.Q5_0}), "'blk.0.ffn_down.weight' is stored as Q5_0"),
])
def test_semantic_errors_name_the_culprit(tmp_path, tiny_sp, change, needle):
    tensors = _tiny_tensors(tiny_sp.get_piece_size(), np.random.default_rng(0), tied=True)
    if "extra" in change:
        tensors[change["extra"]] = np.zeros((64, 64), np.float32)
    tensors.pop(change.get("drop"), None)
    kwargs = {k: v for k, v in change.items() if k in ("arch", "kv", "storage")}
    write_tiny_gguf(tmp_path / "bad.gguf", tiny_sp, tensors=tensors, **kwargs)
    with pytest.raises(CheckpointError) as info:
        load_gguf(tmp_path / "bad.gguf")
    assert needle in str(info.value) and str(tmp_path / "bad.gguf") in str(info.value)


def test_missing_required_key(tmp_path, tiny_sp):
    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    writer.add_block_count(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="'llama.context_length' is missing"):
        load_gguf(tmp_path / "m.gguf")


def test_tokenizer_errors(tmp_path, tiny_sp):
    write_tiny_gguf(tmp_path / "t.gguf", tiny_sp, kv={"tokenizer.ggml.model": ("bert", STR)})
    with pytest.raises(TokenizerError, match="'bert' is not supported"):
        gguf_tokenizer_parts(read_gguf(tmp_path / "t.gguf"))
    write_tiny_gguf(tmp_path / "u.gguf", tiny_sp, kv={"tokenizer.ggml.unknown_token_id": (10**6, I32)})
    with pytest.raises(TokenizerError, match="unknown_token_id=1000000 is not an id"):
        gguf_tokenizer_parts(read_gguf(tmp_path / "u.gguf"))


# --------------------------------------------------------------------------- corrupt and crafted files
def _load_all(path: Path) -> None:
    load_gguf(path, dequantize=False)
    gguf_tokenizer_parts(read_gguf(path))


def test_truncated_files_raise_checkpoint_error(tiny_file, tmp_path):
    data = tiny_file[0].read_bytes()
    last_byte = max(t.offset + t.nbytes for t in read_gguf(tiny_file[0]).tensors.values())
    header_end = min(t.offset for t in read_gguf(tiny_file[0]).tensors.values())
    cuts = sorted(set(range(0, header_end, 17)) | set(range(header_end, last_byte, 997)) | {last_byte - 1})
    cut_file = tmp_path / "cut.gguf"
    for cut in cuts:
        cut_file.write_bytes(data[:cut])
        start = time.perf_counter()
        with pytest.raises(CheckpointError):
            _load_all(cut_file)
        assert time.perf_counter() - start < 1.0, cut


def test_bit_flips_raise_checkpoint_error_or_load(tiny_file, tmp_path):
    data = np.frombuffer(tiny_file[0].read_bytes(), np.uint8)
    header_end = min(t.offset for t in read_gguf(tiny_file[0]).tensors.values())
    rng = np.random.default_rng(0)
    positions = np.concatenate([rng.integers(0, header_end, 200), rng.integers(header_end, len(data), 40)])
    flipped, failures = tmp_path / "flip.gguf", 0
    tracemalloc.start()
    for pos in positions:
        corrupt = data.copy()
        corrupt[pos] ^= np.uint8(1 << int(rng.integers(8)))
        flipped.write_bytes(corrupt.tobytes())
        try:
            _load_all(flipped)
        except (CheckpointError, TokenizerError):  # anything else fails the test
            failures += 1
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert failures > 0 and peak < 64 * 2**20


def _header(*, magic=b"GGUF", version=3, n_tensors=0, n_kv=0, body=b"") -> bytes:
    return struct.pack("<4sIQQ", magic, version, n_tensors, n_kv) + body


def _gguf_str(s: str) -> bytes:
    return struct.pack("<Q", len(s)) + s.encode()


def _kv_u32(key: str, value: int) -> bytes:
    return _gguf_str(key) + struct.pack("<II", 4, value)


def _tensor_info(name: str, dims: tuple[int, ...], ggml_type: int, offset: int) -> bytes:
    return (_gguf_str(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
            + struct.pack("<IQ", ggml_type, offset))


@pytest.mark.parametrize("content,needle", [
    (b"", "too short"),
    (b"GGUF\x03\x00", "too short"),
    (_header(magic=b"GGML"), "not a GGUF file"),
    (_header(version=1), "version 1 is not supported"),
    (_header(version=3 << 24), "big-endian"),
    (_header(n_tensors=2**63), "more than"),
    (_header(n_kv=2**40), "more than"),
    (_header(n_kv=1, body=struct.pack("<Q", 2**62) + b"k" * 32), "needs 4611686018427387904 bytes"),
    (_header(n_kv=1, body=_gguf_str("a") + struct.pack("<IIQ", 9, 0, 2**60) + b"\0" * 64), "array 'a' of"),
    (_header(n_kv=1, body=_gguf_str("a") + struct.pack("<IIQ", 9, 9, 1) + b"\0" * 64), "unsupported type 9"),
    (_header(n_kv=1, body=_gguf_str("a") + struct.pack("<I", 99) + b"\0" * 64), "unknown value type 99"),
    (_header(n_kv=2, body=_kv_u32("a", 1) + _kv_u32("a", 2)), "appears twice"),
    (_header(n_kv=1, body=_kv_u32("general.alignment", 3) + b"\0" * 32), "power of two"),
    (_header(n_kv=1, body=_gguf_str("k") + struct.pack("<I", 8) + struct.pack("<Q", 2) + b"\xff\xfe"
                                 + b"\0" * 32), "not valid UTF-8"),
    (_header(n_tensors=1, body=_tensor_info("t", (32,), 0, 2**50) + b"\0" * 256), "past the end"),
    (_header(n_tensors=1, body=_tensor_info("t", (2**40, 2**40), 0, 0) + b"\0" * 64), "more than the file"),
    (_header(n_tensors=1, body=_tensor_info("t", (32,), 99, 0) + b"\0" * 64), "unknown type 99"),
    (_header(n_tensors=1, body=_tensor_info("t", (30,), 8, 0) + b"\0" * 64), "multiple of 32"),
    (_header(n_tensors=1, body=_tensor_info("t", (32,), 0, 4) + b"\0" * 256), "not 32-byte aligned"),
    (_header(n_tensors=1, body=_gguf_str("t") + struct.pack("<I", 9) + b"\0" * 96), "rank 9"),
])
def test_crafted_headers_fail_fast_without_allocating(tmp_path, content, needle):
    path = tmp_path / "crafted.gguf"
    path.write_bytes(content)
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(CheckpointError) as info:
        read_gguf(path)
    elapsed, peak = time.perf_counter() - start, tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert needle in str(info.value) and str(path) in str(info.value)
    assert elapsed < 0.5 and peak < 2**20


def test_unreadable_paths(tmp_path):
    with pytest.raises(CheckpointError, match="cannot read GGUF file"):
        read_gguf(tmp_path / "absent.gguf")
    with pytest.raises(CheckpointError, match="cannot read GGUF file"):
        read_gguf(tmp_path)



# --------------------------------------------------------------------------- end-to-end on the real model
def test_greedy_continuations_match_transformers(smollm, hf_model):
    """from_pretrained(.gguf) + generate: 32 greedy tokens identical to transformers' GGUF model."""
    from mistral_lm import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm)
    tok = AutoTokenizer.from_pretrained(smollm)
    for text in ("The capital of France is", "def fibonacci(n):"):
        ids = tok(text, return_tensors="pt")["input_ids"]
        ours = model.generate(ids, max_new_tokens=32, eos_token_id=None)
        ref = hf_model.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=None,
                                pad_token_id=tok.eos_token_id)
        assert torch.equal(ours, ref)


def test_convert_output_loads_in_transformers_with_the_same_logits(smollm, hf_model, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "converted"
    result = subprocess.run([sys.executable, "-m", "mistral_lm", "convert", str(out), "--model", str(smollm)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    converted = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ref_tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([ref_tok("Hello, converted world!")["input_ids"]])
    with torch.no_grad():
        assert (converted(ids).logits - hf_model(ids).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q4_K, Q.Q6_K])
def test_native_decoder_gives_the_gguf_package_bits(qtype):
    """Loading decodes blocks with the native kernels' C decoder where it covers the type; the
    values are gguf's own (the oracle transformers loads with), bit for bit: every scale field
    random, subnormal, infinite and NaN halves included (NaN where gguf has NaN), and a zero code
    under a negative scale -0 as in gguf. The decoder computes in float vectors of each
    instruction set; bfloat16 and float16 results are gguf's values rounded as torch rounds them,
    into a given buffer (a quantizing load reuses one)."""
    import gguf

    from mistral_lm.checkpoints.gguf import DECODE_ROWS, _dequantize_rows
    from mistral_lm.native import ggml

    from .conftest import capped_isa, isa_levels

    if not ggml.available():
        pytest.skip("the native decoder is not built here")
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(int(qtype))
    n_blocks = 512 // block
    rows = rng.integers(0, 256, (DECODE_ROWS + 3, n_blocks * size), dtype=np.uint8)  # two slices
    with np.errstate(invalid="ignore", over="ignore"):  # NaN and infinite scales, on purpose
        want = torch.from_numpy(gguf.quants.dequantize(rows, qtype).reshape(len(rows), -1))
    nan = want.isnan()
    assert nan.any() and (want == 0).logical_and(want.signbit()).any()
    shape = (len(rows), n_blocks * block)
    for cap in isa_levels(ggml._lib()):
        with capped_isa(ggml._lib(), cap):
            got = _dequantize_rows(rows, qtype, shape, torch.float32)
            assert torch.equal(got.isnan(), nan), cap
            assert torch.equal(got[~nan].view(torch.int32), want[~nan].view(torch.int32)), cap
            for dtype in (torch.bfloat16, torch.float16):
                out = torch.full(shape, 7.0, dtype=dtype)
                assert _dequantize_rows(rows, qtype, shape, dtype, out=out).data_ptr() == out.data_ptr()
                rounded = want.to(dtype)
                assert torch.equal(out.isnan(), rounded.isnan()), (cap, dtype)
                keep = ~rounded.isnan()
                assert torch.equal(out[keep].view(torch.int16), rounded[keep].view(torch.int16)), (cap, dtype)


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_decoding_in_slices_keeps_the_row_order(monkeypatch, native, dtype):
    """Loading decodes a slice of rows at a time (float64: through one reused float32 scratch),
    Q/K rows by their HF order: the result is gguf's decode of the reordered rows, whatever the
    slice size."""
    import gguf

    import mistral_lm.checkpoints.gguf as checkpoint
    from mistral_lm.native import ggml

    if native and not ggml.available():
        pytest.skip("the native decoder is not built here")
    if not native:
        monkeypatch.setattr(checkpoint, "_native_decoder", lambda ggml_type: None)
    monkeypatch.setattr(checkpoint, "_SCRATCH_VALUES", 3 * 64)  # slices of 3 rows: 7 slices, the last short
    rng = np.random.default_rng(7)
    rows = gguf.quants.quantize(rng.standard_normal((20, 64)).astype(np.float32), Q.Q4_1)
    order = rng.permutation(20)
    want = torch.from_numpy(gguf.quants.dequantize(rows[order], Q.Q4_1).reshape(20, 64)).to(dtype)
    got = checkpoint._dequantize_rows(rows, Q.Q4_1, (20, 64), dtype, order)
    again = checkpoint._dequantize_rows(rows, Q.Q4_1, (20, 64), dtype, order)
    assert got.dtype == dtype and torch.equal(got, want) and torch.equal(again, want)


def test_shared_headers_parse_each_file_once(tiny_file, tmp_path, monkeypatch):
    """Within shared_headers() a file is parsed once (a model, then its tokenizer); a file changed
    on disk in between is parsed again; outside, every read parses."""
    import os
    import shutil

    import mistral_lm.checkpoints.gguf as checkpoint

    parsed = []
    parse = checkpoint._parse
    monkeypatch.setattr(checkpoint, "_parse", lambda cursor: parsed.append(1) or parse(cursor))
    path = tmp_path / "model.gguf"
    shutil.copy(tiny_file[0], path)
    checkpoint.read_gguf(path), checkpoint.read_gguf(path)
    assert len(parsed) == 2
    with checkpoint.shared_headers():
        first = checkpoint.read_gguf(path)
        assert checkpoint.read_gguf(path) is first and len(parsed) == 3
        stat = path.stat()
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        assert checkpoint.read_gguf(path) is not first and len(parsed) == 4
    checkpoint.read_gguf(path)
    assert len(parsed) == 5


def test_loading_for_inference_parses_the_header_once(tiny_file, monkeypatch):
    import mistral_lm.checkpoints.gguf as checkpoint
    from mistral_lm.runtime import load_for_inference

    parsed = []
    parse = checkpoint._parse
    monkeypatch.setattr(checkpoint, "_parse", lambda cursor: parsed.append(1) or parse(cursor))
    model, tokenizer = load_for_inference(tiny_file[0])
    assert len(parsed) == 1 and tokenizer.encode("Hello") and model.config.vocab_size == len(tokenizer)


def test_the_format_numbers_are_the_gguf_packages():
    """checkpoints/gguf_spec.py keeps the package's import (about 1 s with mistral-common) off
    the loading path; its numbers must be the package's, type by type."""
    import gguf

    from mistral_lm.checkpoints import gguf_spec

    assert {t.name: int(t) for t in gguf_spec.GGUFValueType} == {t.name: int(t) for t in gguf.GGUFValueType}
    ours = {t.name: (int(t), gguf_spec.GGML_QUANT_SIZES[t]) for t in gguf_spec.GGMLQuantizationType}
    theirs = {t.name: (int(t), gguf.GGML_QUANT_SIZES[t]) for t in gguf.GGMLQuantizationType}
    assert {k: v for k, v in theirs.items() if k in ours} == ours  # a newer gguf may add types
    assert set(ours) >= {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"}


@pytest.mark.parametrize("name", ["F32", "F16", "BF16"])
def test_float_tensors_decode_as_the_gguf_package_decodes_them(name):
    import gguf

    from mistral_lm.checkpoints.gguf import _gguf_dequantize

    kind = gguf.GGMLQuantizationType[name]
    values = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    values[0, :4] = [np.inf, -np.inf, -0.0, 1e-40]
    data = gguf.quants.quantize(values, kind) if kind != gguf.GGMLQuantizationType.F32 else values.view(np.uint8)
    data = np.ascontiguousarray(data).view(np.uint8).reshape(3, -1)
    assert np.array_equal(_gguf_dequantize(data, kind), gguf.quants.dequantize(data, kind), equal_nan=True)
