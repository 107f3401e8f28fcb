"""Mistral's own layout (params.json + consolidated*.safetensors) loads directly.

Two independent checks of the loaded model:
1. transformers' MistralForCausalLM, written out in Mistral's layout by this file's own writer
   (rows placed by index, the inverse of Transformers' convert_mistral_weights_to_hf), gives
   transformers' logits;
2. a plain-torch forward with mistral-inference's interleaved-pair (complex) RoPE, run on the
   Mistral-layout weights themselves, gives the same logits as our loaded model.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from mistral_lm import AutoConfig, MistralForCausalLM
from mistral_lm.checkpoints.mistral_format import config_from_params, to_half_split
from mistral_lm.errors import CheckpointError, ConfigError

from .conftest import TINY

TOL = 1e-5

# Released Mistral shapes, scaled down (2 layers, tiny hidden, small vocab), HF field names.
# Each keeps what distinguishes the release: window, rope_theta, vocab growth, head_dim != hidden/heads.
RELEASE_SHAPES = {
    "v0.1": dict(sliding_window=8, rope_theta=10000.0, vocab_size=320),          # 7B v0.1: window 4096, vocab 32000
    "v0.2": dict(sliding_window=None, rope_theta=1e6, vocab_size=320),           # 7B v0.2: no window, theta 1e6
    "v0.3": dict(sliding_window=None, rope_theta=1e6, vocab_size=328),           # 7B v0.3: vocab 32768
    "nemo": dict(hidden_size=80, num_attention_heads=4, num_key_value_heads=1,   # 5120 / 32 heads, head_dim 128
                 head_dim=16, sliding_window=None, rope_theta=1e6, vocab_size=1310),
    "small": dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=1,  # Small 24B: 5120 / 32, head_dim 128
                  head_dim=16, intermediate_size=192, sliding_window=None, rope_theta=1e8, vocab_size=1310),
}
# The mistral-format round trip also covers GQA with a window shorter than the sequence and head_dim != hidden/heads.
LAYOUT_SHAPES = {**RELEASE_SHAPES, "gqa_window_head_dim": dict(head_dim=24, sliding_window=7, rope_theta=500.0)}


def hf_config(name: str) -> dict:
    return {**TINY, **LAYOUT_SHAPES[name]}


# ------------------------------------------------------------------ the test's own writer
def params_from_hf(c: dict) -> dict:
    return {"dim": c["hidden_size"], "n_layers": c["num_hidden_layers"],
            "head_dim": c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
            "hidden_dim": c["intermediate_size"], "n_heads": c["num_attention_heads"],
            "n_kv_heads": c["num_key_value_heads"], "norm_eps": c.get("rms_norm_eps", 1e-6),
            "vocab_size": c["vocab_size"], "rope_theta": c["rope_theta"], "sliding_window": c["sliding_window"]}


def to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF half-split rows -> Mistral interleaved-pair rows, by index: within a head, HF row j is
    Mistral row 2j and HF row j + D/2 is Mistral row 2j + 1 (the inverse of the conversion script)."""
    d = w.shape[0] // n_heads
    out = torch.empty_like(w)
    for h in range(n_heads):
        for j in range(d // 2):
            out[h * d + 2 * j] = w[h * d + j]
            out[h * d + 2 * j + 1] = w[h * d + d // 2 + j]
    return out


def mistral_state_dict(hf_state: dict, params: dict) -> dict:
    sd = {"tok_embeddings.weight": hf_state["model.embed_tokens.weight"],
          "norm.weight": hf_state["model.norm.weight"], "output.weight": hf_state["lm_head.weight"]}
    for i in range(params["n_layers"]):
        p = f"model.layers.{i}."
        q, k = hf_state[p + "self_attn.q_proj.weight"], hf_state[p + "self_attn.k_proj.weight"]
        sd[f"layers.{i}.attention.wq.weight"] = to_interleaved(q, params["n_heads"])
        sd[f"layers.{i}.attention.wk.weight"] = to_interleaved(k, params["n_kv_heads"])
        sd[f"layers.{i}.attention.wv.weight"] = hf_state[p + "self_attn.v_proj.weight"]
        sd[f"layers.{i}.attention.wo.weight"] = hf_state[p + "self_attn.o_proj.weight"]
        sd[f"layers.{i}.attention_norm.weight"] = hf_state[p + "input_layernorm.weight"]
        sd[f"layers.{i}.ffn_norm.weight"] = hf_state[p + "post_attention_layernorm.weight"]
        sd[f"layers.{i}.feed_forward.w1.weight"] = hf_state[p + "mlp.gate_proj.weight"]
        sd[f"layers.{i}.feed_forward.w2.weight"] = hf_state[p + "mlp.down_proj.weight"]
        sd[f"layers.{i}.feed_forward.w3.weight"] = hf_state[p + "mlp.up_proj.weight"]
    return {k: v.contiguous().clone() for k, v in sd.items()}


def write_mistral_folder(folder, sd: dict, params: dict, shards: int = 1) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.json").write_text(json.dumps(params))
    if shards == 1:
        save_file(sd, str(folder / "consolidated.safetensors"))
        return
    names = list(sd)
    for n in range(shards):
        part = {k: sd[k] for k in names[n::shards]}
        save_file(part, str(folder / f"consolidated-{n + 1:05d}-of-{shards:05d}.safetensors"))


def random_mistral_weights(params: dict, scale: float = 0.1) -> dict:
    fields = ("dim", "head_dim", "n_heads", "n_kv_heads", "hidden_dim", "vocab_size")
    dim, hd, h, kv, ff, v = (params[k] for k in fields)
    sd = {"tok_embeddings.weight": torch.randn(v, dim), "norm.weight": 1 + 0.1 * torch.randn(dim),
          "output.weight": scale * torch.randn(v, dim)}
    for i in range(params["n_layers"]):
        shapes = {"attention.wq": (h * hd, dim), "attention.wk": (kv * hd, dim), "attention.wv": (kv * hd, dim),
                  "attention.wo": (dim, h * hd), "feed_forward.w1": (ff, dim), "feed_forward.w2": (dim, ff),
                  "feed_forward.w3": (ff, dim)}
        for name, shape in shapes.items():
            sd[f"layers.{i}.{name}.weight"] = scale * torch.randn(shape)
        sd[f"layers.{i}.attention_norm.weight"] = 1 + 0.1 * torch.randn(dim)
        sd[f"layers.{i}.ffn_norm.weight"] = 1 + 0.1 * torch.randn(dim)
    return sd


# ------------------------------------------------------------------ check 1: transformers
@pytest.mark.parametrize("shards", [1, 2])
@pytest.mark.parametrize("name", sorted(LAYOUT_SHAPES))
def test_transformers_model_in_mistral_layout_matches(name, shards, tmp_path):
    transformers = pytest.importorskip("transformers")
    config = hf_config(name)
    ref = transformers.MistralForCausalLM(transformers.MistralConfig(**config, dtype="float32")).eval()
    params = params_from_hf(config)
    write_mistral_folder(tmp_path, mistral_state_dict(ref.state_dict(), params), params, shards=shards)
    ours = MistralForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, config["vocab_size"], (2, 24))
    with torch.no_grad():
        err = (ours(ids, use_cache=False).logits - ref(ids).logits).abs().max()
    assert err <= TOL, f"{name}: max |logit error| {err:.3g}"


# ------------------------------------------------------------------ check 2: complex RoPE reference
def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rotate(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """mistral-inference's apply_rotary_emb: adjacent pairs as complex numbers. x: (T, H, D)."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # (T, H, D/2)
    return torch.view_as_real(xc * freqs_cis[:, None, :]).flatten(-2)


def reference_logits(sd: dict, p: dict, ids: torch.Tensor) -> torch.Tensor:
    """A full causal forward on Mistral-named weights (one sequence), window as mistral-inference: i - j < W."""
    T, hd, h, kv = ids.shape[0], p["head_dim"], p["n_heads"], p["n_kv_heads"]
    pos = torch.arange(T, dtype=torch.float32)
    inv = p["rope_theta"] ** (-torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    freqs_cis = torch.polar(torch.ones(T, hd // 2), torch.outer(pos, inv))  # (T, D/2)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    allowed = (j <= i) & ((i - j < p["sliding_window"]) if p.get("sliding_window") else True)
    x = sd["tok_embeddings.weight"][ids]
    for n in range(p["n_layers"]):
        w = {k[len(f"layers.{n}."):]: v for k, v in sd.items() if k.startswith(f"layers.{n}.")}
        a = _rms(x, w["attention_norm.weight"], p["norm_eps"])
        q = _rotate((a @ w["attention.wq.weight"].T).view(T, h, hd), freqs_cis)
        k = _rotate((a @ w["attention.wk.weight"].T).view(T, kv, hd), freqs_cis)
        v = (a @ w["attention.wv.weight"].T).view(T, kv, hd)
        k, v = k.repeat_interleave(h // kv, dim=1), v.repeat_interleave(h // kv, dim=1)
        scores = torch.einsum("thd,shd->hts", q, k) / math.sqrt(hd)
        attn = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        x = x + torch.einsum("hts,shd->thd", attn, v).reshape(T, h * hd) @ w["attention.wo.weight"].T
        f = _rms(x, w["ffn_norm.weight"], p["norm_eps"])
        gate = torch.nn.functional.silu(f @ w["feed_forward.w1.weight"].T) * (f @ w["feed_forward.w3.weight"].T)
        x = x + gate @ w["feed_forward.w2.weight"].T
    return _rms(x, sd["norm.weight"], p["norm_eps"]) @ sd["output.weight"].T


REFERENCE_PARAMS = {
    "gqa_window": dict(dim=64, n_layers=2, head_dim=16, hidden_dim=128, n_heads=4, n_kv_heads=2, norm_eps=1e-5,
                       vocab_size=96, rope_theta=10000.0, sliding_window=6),
    "head_dim_no_window": dict(dim=48, n_layers=2, head_dim=16, hidden_dim=96, n_heads=4, n_kv_heads=1, norm_eps=1e-5,
                               vocab_size=96, rope_theta=1e6, sliding_window=None),
    "no_optional_fields": dict(dim=64, n_layers=2, hidden_dim=128, n_heads=4, norm_eps=1e-6, vocab_size=96),
}


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS))
def test_complex_rope_reference_matches(name, tmp_path):
    params = REFERENCE_PARAMS[name]
    full = {"head_dim": params["dim"] // params["n_heads"], "n_kv_heads": params["n_heads"], "rope_theta": 10000.0,
            "sliding_window": None, **params}  # the documented defaults
    sd = random_mistral_weights(full)
    write_mistral_folder(tmp_path, sd, params)
    ours = MistralForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, params["vocab_size"], (20,))
    with torch.no_grad():
        err = (ours(ids[None], use_cache=False).logits[0] - reference_logits(sd, full, ids)).abs().max()
    assert err <= TOL, f"{name}: max |logit error| {err:.3g}"


def test_permutation_worked_example():
    rows = torch.arange(8.0)[:, None]  # two heads of head_dim 4, rows named by their Mistral index
    assert to_half_split(rows, n_heads=2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    w = torch.randn(3 * 8, 5)
    assert torch.equal(to_half_split(to_interleaved(w, 3), 3), w)


def test_config_mapping():
    c = config_from_params({**REFERENCE_PARAMS["gqa_window"], "max_seq_len": 1024})
    assert (c.hidden_size, c.num_hidden_layers, c.head_dim, c.intermediate_size, c.num_attention_heads,
            c.num_key_value_heads, c.rms_norm_eps, c.vocab_size, c.rope_theta, c.sliding_window,
            c.max_position_embeddings, c.tie_word_embeddings) == (
        64, 2, 16, 128, 4, 2, 1e-5, 96, 10000.0, 6, 1024, False)


# ------------------------------------------------------------------ bad folders
BAD_PARAMS = {
    "dim": dict(dim=None),
    "n_layers": dict(n_layers=0),
    "hidden_dim": dict(hidden_dim=-4),
    "n_kv_heads": dict(n_kv_heads=3),
    "norm_eps": dict(norm_eps="1e-5"),
    "sliding_window": dict(sliding_window=[4, 8]),
    "rope_theta": dict(rope_theta=0),
    "moe": dict(moe={"num_experts": 8}),
    "vocab_size": dict(vocab_size=True),
}


@pytest.mark.parametrize("field", sorted(BAD_PARAMS))
def test_bad_params_name_the_field(field, tmp_path):
    params = {**REFERENCE_PARAMS["gqa_window"], **BAD_PARAMS[field]}
    if params["dim"] is None:
        del params["dim"]
    write_mistral_folder(tmp_path, random_mistral_weights(REFERENCE_PARAMS["gqa_window"]), params)
    with pytest.raises(ConfigError, match=field):
        MistralForCausalLM.from_pretrained(tmp_path)


def test_head_dim_contradicting_wq_is_named(tmp_path):
    good = REFERENCE_PARAMS["gqa_window"]
    write_mistral_folder(tmp_path, random_mistral_weights(good), {**good, "head_dim": 8})
    with pytest.raises(CheckpointError, match="head_dim"):
        MistralForCausalLM.from_pretrained(tmp_path)


def test_unknown_tensor_and_missing_shard_are_checkpoint_errors(tmp_path):
    good = REFERENCE_PARAMS["gqa_window"]
    sd = random_mistral_weights(good)
    write_mistral_folder(tmp_path / "extra", {**sd, "layers.0.attention.wqkv.weight": torch.zeros(2, 2)}, good)
    with pytest.raises(CheckpointError, match="wqkv"):
        MistralForCausalLM.from_pretrained(tmp_path / "extra")
    write_mistral_folder(tmp_path / "sharded", sd, good, shards=3)
    (tmp_path / "sharded" / "consolidated-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"missing \[2\]"):
        MistralForCausalLM.from_pretrained(tmp_path / "sharded")
    del sd["norm.weight"]
    write_mistral_folder(tmp_path / "short", sd, good)
    with pytest.raises(CheckpointError, match="model.norm.weight"):
        MistralForCausalLM.from_pretrained(tmp_path / "short")


def test_config_json_wins_over_params_json(tmp_path):
    """A folder with both (as some HF repos ship) is an HF folder: params.json is not consulted."""
    from mistral_lm import MistralConfig

    config = MistralConfig(**{**TINY, "sliding_window": None})
    MistralForCausalLM(config).save_pretrained(tmp_path)
    (tmp_path / "params.json").write_text(json.dumps({"dim": 3}))
    assert MistralForCausalLM.from_pretrained(tmp_path).config.hidden_size == TINY["hidden_size"]


# ------------------------------------------------------------------ writing Mistral's layout
@pytest.mark.parametrize("max_shard_size", ["5GB", 40_000])
def test_written_layout_equals_independent_writer_and_reloads(max_shard_size, tmp_path):
    from mistral_lm import MistralConfig
    from mistral_lm.checkpoints.mistral_format import save_mistral_layout
    from safetensors.torch import load_file

    config = MistralConfig(**hf_config("gqa_window_head_dim"))
    model = MistralForCausalLM(config).eval()
    files = save_mistral_layout(model.state_dict(), config, tmp_path, max_shard_size=max_shard_size)
    assert (len(files) > 1) == (max_shard_size != "5GB")
    written = {k: v for f in files for k, v in load_file(str(f)).items()}
    params = params_from_hf(hf_config("gqa_window_head_dim"))
    expected = mistral_state_dict(model.state_dict(), params)
    assert written.keys() == expected.keys()
    assert all(torch.equal(written[k], expected[k]) for k in expected)
    assert json.loads((tmp_path / "params.json").read_text()) == {**params, "norm_eps": config.rms_norm_eps}
    loaded = MistralForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, config.vocab_size, (2, 20))
    with torch.no_grad():
        assert torch.equal(loaded(ids, use_cache=False).logits, model(ids, use_cache=False).logits)


def test_cli_convert_layout_mistral_round_trips_the_default_model(tmp_path):
    import subprocess
    import sys

    from .conftest import default_model_or_skip

    gguf = default_model_or_skip()
    out = tmp_path / "mistral"
    result = subprocess.run([sys.executable, "-m", "mistral_lm", "convert", str(out), "--layout", "mistral",
                             "--model", str(gguf)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert (out / "params.json").is_file() and (out / "consolidated.safetensors").is_file()
    ref = MistralForCausalLM.from_pretrained(gguf).eval()
    ours = MistralForCausalLM.from_pretrained(out).eval()
    assert AutoConfig.from_pretrained(out).to_dict() == ours.config.to_dict()  # the loader's config, from params.json
    ids = torch.randint(0, ref.config.vocab_size, (1, 16))
    with torch.no_grad():
        err = (ours(ids, use_cache=False).logits - ref(ids, use_cache=False).logits).abs().max()
    assert err <= TOL, f"max |logit error| {err:.3g}"
