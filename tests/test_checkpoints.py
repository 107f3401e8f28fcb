"""Checkpoint folders: sharding both ways with transformers, .bin safety, corrupt files, dtype, device_map,
auto classes, and the peak memory of loading."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mistral_lm import (
    AutoConfig,
    AutoModelForCausalLM,
    CheckpointError,
    ConfigError,
    MistralConfig,
    MistralForCausalLM,
    MistralForSequenceClassification,
)
from mistral_lm.placement import _device_for

from .conftest import TINY, tiny_config

transformers = pytest.importorskip("transformers")


def _ids(vocab: int, length: int = 12) -> torch.Tensor:
    return torch.randint(0, vocab, (2, length))


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return out.logits.float()


def _hf_model(tmp_path: Path, **config) -> tuple[Path, object]:
    """A random transformers MistralForCausalLM saved to tmp_path/hf: the reference checkpoint."""
    fields = {**TINY, "sliding_window": 4, "dtype": "float32", **config}
    ref = transformers.MistralForCausalLM(transformers.MistralConfig(**fields)).eval()
    folder = tmp_path / "hf"
    ref.save_pretrained(folder)
    return folder, ref


@pytest.fixture
def ours_saved(tmp_path):
    """Our random model saved as one safetensors file; returns (folder, model)."""
    model = MistralForCausalLM(tiny_config(sliding_window=4)).eval()
    model.save_pretrained(tmp_path / "ours")
    return tmp_path / "ours", model


# ------------------------------------------------------------------ sharding, both directions
def test_sharded_save_writes_index_and_shards_transformers_loads(tmp_path):
    model = MistralForCausalLM(tiny_config(sliding_window=4)).eval()
    limit = 40_000
    model.save_pretrained(tmp_path, max_shard_size=limit)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    n = len(shards)
    assert n > 2 and not (tmp_path / "model.safetensors").exists()
    assert [p.name for p in shards] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    state = model.state_dict()
    assert set(index["weight_map"]) == set(state)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    for shard in shards:
        tensors = load_file(shard)
        assert all(index["weight_map"][k] == shard.name for k in tensors)
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        assert nbytes <= limit or len(tensors) == 1  # only a single oversized tensor may exceed the limit
    ref = transformers.MistralForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = _ids(model.config.vocab_size)
    torch.testing.assert_close(_logits(model, ids), _logits(ref, ids), atol=1e-5, rtol=1e-5)


def test_loads_transformers_sharded_checkpoint(tmp_path):
    _, ref = _hf_model(tmp_path)
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 2
    ours = MistralForCausalLM.from_pretrained(tmp_path / "sharded")
    ids = _ids(ours.config.vocab_size)
    torch.testing.assert_close(_logits(ours, ids), _logits(ref, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_loads_pytorch_model_bin(tmp_path, zip_format):
    folder, ref = _hf_model(tmp_path)
    (folder / "model.safetensors").unlink()
    torch.save(ref.state_dict(), folder / "pytorch_model.bin", _use_new_zipfile_serialization=zip_format)
    ours = MistralForCausalLM.from_pretrained(folder)
    ids = _ids(ours.config.vocab_size)
    torch.testing.assert_close(_logits(ours, ids), _logits(ref, ids), atol=1e-5, rtol=1e-5)


def test_loads_sharded_pytorch_model_bin(tmp_path):
    folder, ref = _hf_model(tmp_path)
    (folder / "model.safetensors").unlink()
    state = ref.state_dict()
    names = list(state)
    halves = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    for file, keys in halves.items():
        torch.save({k: state[k] for k in keys}, folder / file)
    weight_map = {k: file for file, keys in halves.items() for k in keys}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    ours = MistralForCausalLM.from_pretrained(folder)
    ids = _ids(ours.config.vocab_size)
    torch.testing.assert_close(_logits(ours, ids), _logits(ref, ids), atol=1e-5, rtol=1e-5)


class _Payload:
    """Unpickling this runs a shell command (here: creating a marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_malicious_pickle_in_bin_is_refused_without_running(ours_saved, tmp_path, zip_format):
    folder, model = ours_saved
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    state = {**model.state_dict(), "model.norm.weight": _Payload(marker)}
    torch.save(state, folder / "pytorch_model.bin", _use_new_zipfile_serialization=zip_format)
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        MistralForCausalLM.from_pretrained(folder)
    assert not marker.exists()
    # the payload is live: an unsafe load would have run it (so the assertion above can fail)
    torch.load(folder / "pytorch_model.bin", weights_only=False)
    assert marker.exists()


# ------------------------------------------------------------------ broken folders
def _corrupt(folder: Path, how: str) -> str:
    """Damage a saved single-file checkpoint; returns the name the error must mention."""
    file = folder / "model.safetensors"
    data = file.read_bytes()
    if how == "truncated":
        file.write_bytes(data[: len(data) // 2])
    elif how == "header-json":
        size = int.from_bytes(data[:8], "little")
        file.write_bytes(data[:8] + b"{not json" + b" " * (size - 9) + data[8 + size:])
    elif how == "header-size":
        file.write_bytes((len(data) * 10).to_bytes(8, "little") + data[8:])
    elif how == "empty":
        file.write_bytes(b"")
    return "model.safetensors"


@pytest.mark.parametrize("how", ["truncated", "header-json", "header-size", "empty"])
def test_damaged_safetensors_raises_checkpoint_error_naming_file(ours_saved, how):
    folder, _ = ours_saved
    name = _corrupt(folder, how)
    with pytest.raises(CheckpointError, match=name):
        MistralForCausalLM.from_pretrained(folder)


def test_truncated_shard_is_named(tmp_path):
    MistralForCausalLM(tiny_config()).save_pretrained(tmp_path, max_shard_size="40KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=shard.name):
        MistralForCausalLM.from_pretrained(tmp_path)


def _sharded(tmp_path: Path) -> tuple[Path, dict]:
    MistralForCausalLM(tiny_config()).save_pretrained(tmp_path / "m", max_shard_size="40KB")
    return tmp_path / "m", json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())


def test_index_pointing_to_missing_shard_is_named(tmp_path):
    folder, index = _sharded(tmp_path)
    missing = sorted(folder.glob("model-*.safetensors"))[-1]
    missing.unlink()
    with pytest.raises(CheckpointError, match=missing.name):
        MistralForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize("absolute", [False, True])
def test_index_pointing_outside_the_folder_is_refused(tmp_path, absolute):
    folder, index = _sharded(tmp_path)
    first = sorted(folder.glob("model-*.safetensors"))[0]
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes(first.read_bytes())  # a valid file: only its location is wrong
    target = str(outside) if absolute else "../elsewhere.safetensors"
    index["weight_map"] = {k: (target if v == first.name else v) for k, v in index["weight_map"].items()}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="outside"):
        MistralForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize("entry", ["sub/../../elsewhere.safetensors", 7, None])
def test_index_entry_escaping_or_not_a_name_is_refused(tmp_path, entry):
    folder, index = _sharded(tmp_path)
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = entry
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="outside"):
        MistralForCausalLM.from_pretrained(folder)


def test_hub_cache_snapshot_with_symlinked_shards_loads(tmp_path):
    """The Hugging Face cache keeps files in blobs/ and symlinks them from snapshots/<rev>/."""
    folder, _ = _sharded(tmp_path)
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "0123abc"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    for i, file in enumerate(sorted(folder.iterdir())):
        blob = blobs / f"{i:040x}"  # blobs are named by content hash
        file.rename(blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    ref = transformers.MistralForCausalLM.from_pretrained(snapshot, dtype=torch.float32).eval()
    ours = MistralForCausalLM.from_pretrained(snapshot)
    ids = _ids(ours.config.vocab_size)
    torch.testing.assert_close(_logits(ours, ids), _logits(ref, ids), atol=1e-5, rtol=1e-5)


def test_index_that_is_not_json_is_named(tmp_path):
    folder, _ = _sharded(tmp_path)
    (folder / "model.safetensors.index.json").write_text("{ nope")
    with pytest.raises(CheckpointError, match="model.safetensors.index.json"):
        MistralForCausalLM.from_pretrained(folder)


def _rewrite(folder: Path, edit) -> None:
    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, folder / "model.safetensors")


def test_missing_tensor_is_named(ours_saved):
    folder, _ = ours_saved
    _rewrite(folder, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing.*model\.layers\.1\.mlp\.up_proj\.weight"):
        MistralForCausalLM.from_pretrained(folder)


def test_unexpected_tensor_is_named(ours_saved):
    folder, _ = ours_saved
    _rewrite(folder, lambda s: s.update({"model.layers.0.self_attn.q_norm.weight": torch.ones(16)}))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.q_norm\.weight"):
        MistralForCausalLM.from_pretrained(folder)


def test_legacy_rotary_inv_freq_buffers_are_ignored(ours_saved):
    """Checkpoints written by transformers < 4.35 carry each layer's non-learned RoPE buffer."""
    folder, model = ours_saved
    _rewrite(folder, lambda s: s.update({f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.ones(8)
                                         for i in range(2)}))
    loaded = MistralForCausalLM.from_pretrained(folder)
    ids = _ids(model.config.vocab_size)
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), atol=0, rtol=0)


def test_wrongly_shaped_tensor_is_named_with_both_shapes(ours_saved):
    folder, _ = ours_saved
    _rewrite(folder, lambda s: s.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(16, 64)}))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight.*\(16, 64\).*\(32, 64\)"):
        MistralForCausalLM.from_pretrained(folder)


def test_folder_without_weights_lists_what_it_found(tmp_path):
    tiny_config().save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="config.json"):
        MistralForCausalLM.from_pretrained(tmp_path)


# ------------------------------------------------------------------ dtype
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, "float16", "bfloat16"])
def test_torch_dtype_converts_every_weight(ours_saved, dtype):
    folder, model = ours_saved
    target = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    loaded = MistralForCausalLM.from_pretrained(folder, torch_dtype=dtype)
    assert loaded.dtype == target
    reference = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert tensor.dtype == target, name
        assert torch.equal(tensor, reference[name].to(target)), name
    ids = _ids(model.config.vocab_size)
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), atol=0.1, rtol=0.05)


def test_auto_dtype_keeps_a_bfloat16_checkpoint_bfloat16(tmp_path):
    folder, ref = _hf_model(tmp_path, dtype="bfloat16")
    ref = ref.to(torch.bfloat16)
    ref.save_pretrained(folder)
    assert load_file(folder / "model.safetensors")["lm_head.weight"].dtype == torch.bfloat16
    ours = MistralForCausalLM.from_pretrained(folder, torch_dtype="auto")
    assert {t.dtype for t in ours.state_dict().values()} == {torch.bfloat16}
    ids = _ids(ours.config.vocab_size)
    torch.testing.assert_close(_logits(ours, ids), _logits(ref, ids), atol=2e-2, rtol=2e-2)
    assert MistralForCausalLM.from_pretrained(folder, dtype="auto").dtype == torch.bfloat16
    assert MistralForCausalLM.from_pretrained(folder).dtype == torch.float32  # documented default


def test_auto_dtype_keeps_a_float32_checkpoint_float32(ours_saved):
    folder, _ = ours_saved
    assert MistralForCausalLM.from_pretrained(folder, torch_dtype="auto").dtype == torch.float32


def test_conflicting_dtype_arguments_are_refused(ours_saved):
    folder, _ = ours_saved
    with pytest.raises(ConfigError):
        MistralForCausalLM.from_pretrained(folder, torch_dtype=torch.float16, dtype=torch.bfloat16)


# ------------------------------------------------------------------ device_map
@pytest.mark.parametrize("device_map", [None, "cpu", "auto", torch.device("cpu"),
                                        {"": "cpu"}, {"model": "cpu", "lm_head": "cpu"},
                                        {"model.embed_tokens": "cpu", "model.layers": "cpu", "model.norm": "cpu",
                                         "lm_head": "cpu"}])
def test_device_map_on_cpu(ours_saved, device_map):
    if device_map == "auto" and torch.cuda.is_available():
        pytest.skip("'auto' places on the GPU here")
    folder, model = ours_saved
    loaded = MistralForCausalLM.from_pretrained(folder, device_map=device_map)
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    ids = _ids(model.config.vocab_size)
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), atol=0, rtol=0)


def test_device_map_without_entry_for_a_module_names_it(ours_saved):
    folder, _ = ours_saved
    with pytest.raises(ConfigError, match="lm_head"):
        MistralForCausalLM.from_pretrained(folder, device_map={"model": "cpu"})


def test_device_map_prefix_resolution_takes_longest_whole_component_match():
    device_map = {"": "cpu", "model.layers": 0, "model.layers.1": "cuda:1", "lm_head": "cpu"}
    assert _device_for("model.layers.1.mlp.up_proj", device_map) == torch.device("cuda:1")
    assert _device_for("model.layers.10.mlp.up_proj", device_map) == torch.device("cuda:0")  # not "layers.1"
    assert _device_for("model.layers.0", device_map) == torch.device("cuda:0")
    assert _device_for("model.norm", device_map) == torch.device("cpu")
    assert _device_for("lm_head", device_map) == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_map_dict_splits_layers_across_cpu_and_gpu(ours_saved):
    folder, model = ours_saved
    device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "cpu", "model.norm": "cpu",
                  "lm_head": 0}
    loaded = MistralForCausalLM.from_pretrained(folder, device_map=device_map)
    assert loaded.model.layers[0].self_attn.q_proj.weight.device.type == "cuda"
    assert loaded.model.layers[1].self_attn.q_proj.weight.device.type == "cpu"
    ids = _ids(model.config.vocab_size)
    torch.testing.assert_close(_logits(loaded, ids.cuda()).cpu(), _logits(model, ids), atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ keywords
def test_unknown_keyword_is_a_type_error_naming_it(ours_saved):
    folder, _ = ours_saved
    with pytest.raises(TypeError, match="slidng_window"):
        MistralForCausalLM.from_pretrained(folder, slidng_window=2)


def test_config_field_keyword_overrides_like_transformers(tmp_path):
    folder, _ = _hf_model(tmp_path)
    ours = MistralForCausalLM.from_pretrained(folder, sliding_window=2)
    ref = transformers.MistralForCausalLM.from_pretrained(folder, sliding_window=2, dtype=torch.float32).eval()
    assert ours.config.sliding_window == ref.config.sliding_window == 2
    ids = _ids(ours.config.vocab_size)
    torch.testing.assert_close(_logits(ours, ids), _logits(ref, ids), atol=1e-5, rtol=1e-5)
    default = MistralForCausalLM.from_pretrained(folder)
    assert not torch.allclose(_logits(default, ids), _logits(ours, ids))  # the override changed the model


def test_flash_attention_2_without_flash_attn_or_cuda_is_a_clear_config_error(ours_saved):
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available():
        pytest.skip("flash-attn is usable here")
    folder, _ = ours_saved
    for kwargs in ({"attn_implementation": "flash_attention_2"}, {"use_flash_attention_2": True}):
        with pytest.raises(ConfigError, match="flash") as info:
            MistralForCausalLM.from_pretrained(folder, torch_dtype=torch.float16, **kwargs)
        assert "sdpa" in str(info.value)  # names the fix


def test_unknown_attn_implementation_is_a_config_error(ours_saved):
    folder, _ = ours_saved
    with pytest.raises(ConfigError, match="flex"):
        MistralForCausalLM.from_pretrained(folder, attn_implementation="flex")


# ------------------------------------------------------------------ auto classes
def test_auto_classes_dispatch_mistral(ours_saved):
    folder, model = ours_saved
    assert AutoConfig.from_pretrained(folder) == model.config
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert type(loaded) is MistralForCausalLM
    ids = _ids(model.config.vocab_size)
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), atol=0, rtol=0)


def test_auto_classes_dispatch_llama(tmp_path):
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, dtype="float32")).eval()
    ref.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, MistralConfig) and config.model_type == "llama" and config.sliding_window is None
    ours = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = _ids(ours.config.vocab_size, length=20)
    torch.testing.assert_close(_logits(ours, ids), _logits(ref, ids), atol=1e-5, rtol=1e-5)


def test_auto_classes_reject_gpt2(ours_saved):
    folder, _ = ours_saved
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    for load in (AutoConfig.from_pretrained, AutoModelForCausalLM.from_pretrained, MistralForCausalLM.from_pretrained):
        with pytest.raises(ConfigError, match="gpt2"):
            load(folder)
    with pytest.raises(ConfigError, match="gpt2"):
        AutoConfig.for_model("gpt2")


# ------------------------------------------------------------------ heads
def test_sequence_classification_from_causal_lm_checkpoint_warns_and_initializes_score(tmp_path):
    folder, _ = _hf_model(tmp_path, pad_token_id=0)
    with pytest.warns(UserWarning, match="score"):
        ours = MistralForSequenceClassification.from_pretrained(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = transformers.MistralForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
    score = ours.score.weight
    assert score.shape == (ours.config.num_labels, ours.config.hidden_size)
    assert score.isfinite().all() and 0.5 < float(score.detach().std()) / ours.config.initializer_range < 1.5
    ids = _ids(ours.config.vocab_size)
    with torch.no_grad():  # the backbone is the checkpoint's
        torch.testing.assert_close(ours.model(ids).last_hidden_state, ref.model(ids).last_hidden_state,
                                   atol=1e-5, rtol=1e-5)
        assert ours(ids).logits.shape == (2, ours.config.num_labels)


def test_num_labels_keyword_sizes_the_new_head_like_transformers(ours_saved):
    folder, _ = ours_saved  # its config.json lists id2label for 2 labels
    assert len(json.loads((folder / "config.json").read_text())["id2label"]) == 2
    with pytest.warns(UserWarning):
        ours = MistralForSequenceClassification.from_pretrained(folder, num_labels=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = transformers.MistralForSequenceClassification.from_pretrained(folder, num_labels=5)
    assert ours.score.weight.shape == ref.score.weight.shape == (5, ours.config.hidden_size)
    assert ours.config.id2label == ref.config.id2label


# ------------------------------------------------------------------ peak memory while loading
_MEASURE = textwrap.dedent("""
    import json, sys
    import torch, mistral_lm
    from mistral_lm import MistralForCausalLM

    def status(field):
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(field))

    def rss():
        return status("VmRSS:")

    def peak():
        # VmHWM is getrusage's ru_maxrss for this address space only: ru_maxrss survives exec, so a
        # child of a big pytest process would report the parent's peak
        return status("VmHWM:")

    base = rss()
    kwargs = {"torch_dtype": sys.argv[2]} if len(sys.argv) > 2 else {}
    model = MistralForCausalLM.from_pretrained(sys.argv[1], **kwargs)
    loading = peak() - base
    checksum = sum(float(p.detach().sum()) for p in model.parameters())  # reads every weight, no copy
    print(json.dumps({"loading": loading, "touched": peak() - base, "checksum": checksum,
                      "weights": sum(p.numel() * p.element_size() for p in model.parameters()),
                      "largest": max(p.numel() for p in model.parameters()),
                      "dynamo": "torch._dynamo" in sys.modules}))
""")


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory):
    """~200 MB of random float32 weights."""
    config = MistralConfig(vocab_size=32000, hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
                           num_attention_heads=8, num_key_value_heads=4)
    folder = tmp_path_factory.mktemp("big")
    MistralForCausalLM(config).save_pretrained(folder)
    return folder, (folder / "model.safetensors").stat().st_size


def _measure(folder: Path, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(folder), *args], check=True, capture_output=True,
                         text=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_loading_peak_rss_is_within_1_3x_the_weights(big_checkpoint):
    folder, size = big_checkpoint
    assert size > 190e6
    m = _measure(folder)
    assert m["loading"] <= 1.3 * size, m
    # after every weight has been read once: mmapped pages, not a second copy
    assert m["touched"] <= 1.3 * size, m
    # the meta build must not drag in torch._dynamo (~70 MB, ~1.3 s; see loading._empty_on_meta)
    assert not m["dynamo"]


def test_loading_with_dtype_conversion_holds_one_source_tensor_at_a_time(big_checkpoint):
    """Converting from the mmap kept the whole float32 file resident next to its bfloat16 copy (1.5x)."""
    folder, size = big_checkpoint
    m = _measure(folder, "bfloat16")
    assert m["weights"] < 0.51 * size
    assert m["touched"] <= 1.15 * (m["weights"] + 4 * m["largest"]), m


def test_hf_folder_key_mapping_is_shared_and_framework_free():
    """One mapping of checkpoint names (prefix, ignored keys, the other head) for torch and Flax."""
    from mistral_lm.checkpoints import hf_folder

    head = {"model.embed_tokens.weight", "lm_head.weight"}
    bare = {"embed_tokens.weight"}
    assert hf_folder.model_key("embed_tokens.weight", head) == "model.embed_tokens.weight"
    assert hf_folder.model_key("model.embed_tokens.weight", bare) == "embed_tokens.weight"
    assert hf_folder.model_key("model.embed_tokens.weight", head) == "model.embed_tokens.weight"
    assert hf_folder.model_key("model.layers.0.self_attn.rotary_emb.inv_freq", head) is None
    assert hf_folder.skippable("model.layers.0.self_attn.rotary_emb.inv_freq", head)
    assert hf_folder.skippable("score.weight", head) and hf_folder.skippable("lm_head.weight", bare)
    assert not hf_folder.skippable("model.layers.9.mlp.up_proj.weight", head)
    code = "import sys, mistral_lm.checkpoints.hf_folder; assert not {'torch', 'jax'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_released_pages_of_a_mapped_shard_leave_the_rss_and_read_back_the_same(tmp_path):
    """`release_file_pages` drops a mapped tensor's pages from the process (a quantizing load
    reading a folder calls it for each weight it consumed): RSS falls by about the tensor's size,
    the values read back from the file unchanged; a tensor on the heap is left alone."""
    from safetensors import safe_open

    from mistral_lm.checkpoints.safetensors import release_file_pages

    def rss() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    weight = torch.randn(4096, 2048)  # 32 MiB
    save_file({"small": torch.ones(3), "weight": weight}, str(tmp_path / "shard.safetensors"))
    with safe_open(str(tmp_path / "shard.safetensors"), framework="pt") as handle:
        mapped = handle.get_tensor("weight")
    assert float(mapped.sum()) == float(weight.sum())  # every page read
    before = rss()
    assert release_file_pages(mapped)
    assert before - rss() > 0.8 * mapped.nbytes
    assert torch.equal(mapped, weight)
    heap = weight.clone()
    assert not release_file_pages(heap) and torch.equal(heap, weight)


def test_a_quantizing_load_of_a_folder_does_not_keep_the_shards_in_its_rss(tmp_path):
    """A folder's bfloat16 shards are mapped; a load that quantizes each Linear as it reads it
    drops the pages it consumed, so its RSS grows by about the quantized model, not by the file
    too (the kept embedding holds the shard mapped)."""
    config = tiny_config(hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=1024)
    MistralForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path, max_shard_size="2GB")
    file_bytes = sum(f.stat().st_size for f in tmp_path.glob("*.safetensors"))
    code = textwrap.dedent(f"""
        import os, torch
        from mistral_lm import MistralForCausalLM
        def rss():
            with open("/proc/self/statm") as statm:
                return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        before = rss()
        model = MistralForCausalLM.from_pretrained({str(tmp_path)!r}, quantization_config={{"load_in_8bit": True}})
        print(rss() - before)
    """)
    grown = int(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout.split()[-1])
    assert file_bytes > 60e6 and grown < 0.85 * file_bytes, (grown, file_bytes)
