"""The command line end to end, in subprocesses (error paths also in-process), on the embedded default model."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

from .conftest import default_model_or_skip, gguf_reader

default_model_or_skip()


def _run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mistral_lm", *args], input=stdin, capture_output=True,
                          text=True, timeout=600)


def _library_answer(prompt: str, **kwargs) -> str:
    from mistral_lm import runtime

    model, tok = runtime.load_for_inference(None)  # the CLI's defaults: the GGUF's own blocks
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                  return_tensors="pt")
    out = model.generate(ids, eos_token_id=tok.eos_token_id, **kwargs)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_generate_greedy_matches_library_call_and_counts_its_tokens():
    """The text is the library's greedy answer, and the stats line counts what generate() returned
    past the prompt. This answer ends on the stop token (11 text tokens and the stop token, on the
    default model), which the text's tokens, counted again, missed."""
    from mistral_lm import runtime

    model, tok = runtime.load_for_inference(None)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True,
                                  return_tensors="pt")
    out = model.generate(ids, eos_token_id=tok.eos_token_id, max_new_tokens=40, do_sample=False)
    result = _run("generate", "What is 2+2?", "--max-new-tokens", "40", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert "seed" not in result.stderr
    assert result.stdout.strip() == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    assert int(re.search(r"\[(\d+) tokens in ", result.stderr).group(1)) == out.shape[1] - ids.shape[1]


def test_generate_samples_by_default_with_llama_cpp_settings_and_prints_its_seed():
    """No flags: sampled with llama-cli's temperature, top-k, top-p and min-p, and a random seed
    that the stats line prints; that seed and those settings in the library give the same text."""
    first = _run("generate", "Write a haiku about the sea.", "--max-new-tokens", "24")
    assert first.returncode == 0, first.stderr
    seed = int(re.search(r"; seed (\d+)\]", first.stderr).group(1))
    expected = _library_answer("Write a haiku about the sea.", max_new_tokens=24, do_sample=True, temperature=0.8,
                               top_k=40, top_p=0.95, min_p=0.05, seed=seed, sampler="inverse_cdf")
    assert first.stdout.strip() == expected.strip()


def test_the_cli_loader_freezes_its_imports_and_leaves_the_gguf_package_alone():
    """Two start-up costs of the CLI and the server: the first full collection after importing
    torch walked its ~200k lasting objects during loading or the first generate (0.2 s on the
    default model), so the loader freezes them; and importing the gguf package imports
    mistral-common's tokenizers where they are installed (about 1 s), for constants that
    checkpoints/gguf_spec.py holds and a float decoding the reader does itself."""
    code = ("import gc, sys, mistral_lm.cli as cli; before = len(gc.get_objects()); cli.load(None, None); "
            "print(before, gc.get_freeze_count(), 'gguf' in sys.modules, 'mistral_common' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    before, frozen, gguf_imported, mistral_common_imported = result.stdout.split()
    assert int(frozen) > int(before) // 2 > 10_000  # a few of the counted ones are collected before the freeze
    assert (gguf_imported, mistral_common_imported) == ("False", "False")


def test_chat_from_stdin_keeps_conversation_and_resets():
    result = _run("chat", "--max-new-tokens", "8", stdin="Hello!\nWhat did I just say?\n/reset\nHi\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert "conversation cleared" in result.stderr
    assert len(result.stdout.strip().splitlines()) >= 3


def test_info_reads_no_weights(monkeypatch, capsys):
    """`info` on a 7B GGUF loaded the weights, dequantized: 28 GB of float32, more than the
    machine held. It reads the header and counts a model built on the meta device."""
    from mistral_lm import loading
    from mistral_lm.cli import main

    monkeypatch.setattr(loading, "read_checkpoint", lambda *a, **k: pytest.fail("info read the weights"))
    assert main(["info"]) == 0
    assert "parameters: " in capsys.readouterr().out


def test_info_prints_config_and_parameter_count():
    import numpy as np

    from mistral_lm.defaults import default_model_path

    result = _run("info")
    assert result.returncode == 0, result.stderr
    reader = gguf_reader(str(default_model_path()))  # independent count: every tensor in the file
    expected = sum(int(np.prod(t.shape)) for t in reader.tensors)
    assert '"model_type": "llama"' in result.stdout and f"parameters: {expected:,}" in result.stdout


@pytest.mark.parametrize("content", [b"", b"GGUF\x03\x00\x00\x00garbage", b"not a model at all"])
def test_bad_model_file_is_one_clear_line(content, tmp_path, capsys):
    """In-process, `main` as the console script calls it: an exception escaping it fails the
    test as its traceback would fail the user (the subprocess path: the missing-model test)."""
    from mistral_lm.cli import main

    bad = tmp_path / "broken.gguf"
    bad.write_bytes(content)
    assert main(["generate", "hi", "--model", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error:")


def test_missing_model_is_one_clear_line(tmp_path):
    result = _run("info", "--model", str(tmp_path / "nope.gguf"))
    assert result.returncode == 2 and "not found" in result.stderr and "Traceback" not in result.stderr


def test_kv_cache_dtype_reaches_the_model_from_every_command(monkeypatch):
    """--kv-cache-dtype is parsed by generate, chat and serve and reaches the loader they share;
    without it a GGUF's own blocks get the float16 cache from_pretrained gives them."""
    import torch

    from mistral_lm import cli
    from mistral_lm.runtime import load_for_inference

    parser = cli.build_parser()
    for command in (["generate", "hi"], ["chat"], ["serve"]):
        assert parser.parse_args([*command, "--kv-cache-dtype", "float32"]).kv_cache_dtype == "float32"
        assert parser.parse_args(command).kv_cache_dtype is None
    path = default_model_or_skip()
    assert load_for_inference(path)[0].kv_cache_dtype == torch.float16
    assert load_for_inference(path, kv_cache_dtype="float32")[0].make_cache(1).keys[0].dtype == torch.float32


def test_a_one_shot_generate_waits_for_the_tile_cache_and_says_so(tmp_path):
    """`generate` on a GGUF without its tile cache tiles at load and writes the cache behind;
    a command shorter than the write waits for it at the end, on a line of its own, rather
    than leave no cache (the writer held here until the command is done, so that it is still
    writing)."""
    from mistral_lm.defaults import default_model_path

    from .test_gguf_tiled import HELD_WRITER

    model = tmp_path / "model.gguf"
    shutil.copyfile(default_model_path(), model)
    code = HELD_WRITER + ("import mistral_lm.cli as cli\n"
                          "run = cli._run\n"
                          "cli._run = lambda args: (run(args), done.set())[0]\n"
                          "sys.exit(cli.main(['generate', 'Hi', '--model', sys.argv[1], '--max-new-tokens', '2']))\n")
    result = subprocess.run([sys.executable, "-c", code, str(model)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert re.search(r"saving the tiled weights beside the model, for later loads \.\.\. \d+\.\d\d s", result.stderr)
    assert (tmp_path / "model.gguf.mistral_lm-tiled").exists() and not list(tmp_path.glob("*.tmp"))


def _convert_growth(out, *args) -> int:
    """Bytes by which `convert` into `out` (50 MB shards; the default model unless `args` name
    another) grew the peak RSS of its process, imports excluded."""
    # VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's RSS (a test that loaded a
    # model before would hide the command's growth), the peak of its own memory does not
    code = ("import re, sys, mistral_lm.cli as cli, mistral_lm.checkpoints.gguf, mistral_lm.tokenizer\n"
            "peak = lambda: int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1])\n"
            "before = peak()\n"
            "rc = cli.main(['convert', *sys.argv[1:], '--max-shard-size', '50MB'])\n"
            "print(rc, before, peak())\n")
    result = subprocess.run([sys.executable, "-c", code, str(out), *args], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    rc, before, after = map(int, result.stdout.split())
    assert rc == 0
    return (after - before) * 1024


def _assert_same_hf_shards(out, ref) -> None:
    """Both folders sharded, every shard in the index, and the same tensors under the same names."""
    import json

    import torch
    from safetensors.torch import load_file

    def shards(folder):
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        files = {p.name: load_file(p) for p in folder.glob("*.safetensors")}
        assert set(index["weight_map"].values()) == set(files) and len(files) > 2  # sharded, every shard listed
        assert all(name in files[file] for name, file in index["weight_map"].items())
        return index["metadata"]["total_size"], {k: t for shard in files.values() for k, t in shard.items()}

    (size, ours), (ref_size, theirs) = shards(out), shards(ref)
    assert size == ref_size and ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)


def _assert_same_mistral_shards(out, ref) -> None:
    """Both folders sharded, the same tensors under the same names, the same params.json."""
    import torch
    from safetensors.torch import load_file

    def tensors(folder):
        files = sorted(folder.glob("consolidated-*.safetensors"))
        assert len(files) > 2  # sharded
        return {k: t for f in files for k, t in load_file(f).items()}

    ours, theirs = tensors(out), tensors(ref)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert (out / "params.json").read_text() == (ref / "params.json").read_text()


def test_convert_of_a_gguf_writes_what_save_pretrained_writes_a_shard_at_a_time(tmp_path):
    """`convert` decodes a GGUF's tensors as it writes each shard (a 7B's float32 weights are
    29 GB, more than the machines it runs on hold). The files must be those the library's
    `save_pretrained` writes of the whole model loaded in the same dtype, shard for shard, and
    the command's memory must grow by a shard and the largest tensor, not by the model. The
    shards are cut in the file's tensor order, not the module order, so each name's shard may
    differ from `save_pretrained`'s: the index must map every name to the shard that holds it."""
    import json

    from mistral_lm import MistralForCausalLM
    from mistral_lm.defaults import default_model_path

    out, ref = tmp_path / "out", tmp_path / "ref"
    grown = _convert_growth(out)
    model = MistralForCausalLM.from_pretrained(default_model_path())  # float32, convert's default too
    model.save_pretrained(ref, max_shard_size="50MB")
    # measured: 0.3x (the 113 MB embedding, a 50 MB shard, the tokenizer); loading the model took 1.5x
    assert grown < 0.75 * model.num_parameters() * 4, grown
    assert json.loads((out / "config.json").read_text()) == json.loads((ref / "config.json").read_text())

    _assert_same_hf_shards(out, ref)


def test_convert_of_a_gguf_to_mistral_layout_writes_a_shard_at_a_time(tmp_path):
    """`convert --layout mistral` of a GGUF streams too: the shards hold the tensors the in-memory
    writer makes of the loaded model (itself checked against an independent writer in
    test_mistral_format), and memory grows by a shard, not by the model."""
    from mistral_lm import MistralForCausalLM
    from mistral_lm.checkpoints.mistral_format import save_mistral_layout
    from mistral_lm.defaults import default_model_path

    out, ref = tmp_path / "out", tmp_path / "ref"
    grown = _convert_growth(out, "--layout", "mistral")
    model = MistralForCausalLM.from_pretrained(default_model_path())
    save_mistral_layout(model.state_dict(), model.config, ref, max_shard_size="50MB")
    assert grown < 0.75 * model.num_parameters() * 4, grown  # the in-memory writer grew 1.3x
    _assert_same_mistral_shards(out, ref)


@pytest.mark.parametrize("layout", ["hf", "mistral"])
def test_convert_of_an_hf_folder_writes_a_shard_at_a_time(tmp_path, layout):
    """`convert` of an HF safetensors folder reads each tensor as its shard is written, as for a
    GGUF (loading a 7B whole held 1.4x its weights): the files are those the loaded model's
    writers make (`save_pretrained`, `save_mistral_layout`), here from a bfloat16 source
    converted to convert's float32, and memory grows by a shard, not by the model."""
    import json

    import torch

    from mistral_lm import MistralForCausalLM
    from mistral_lm.checkpoints.mistral_format import save_mistral_layout
    from mistral_lm.defaults import default_model_path
    from mistral_lm.tokenizer import MistralTokenizer

    source, out, ref = tmp_path / "source", tmp_path / "out", tmp_path / "ref"
    MistralForCausalLM.from_pretrained(default_model_path(), torch_dtype=torch.bfloat16).save_pretrained(
        source, max_shard_size="50MB")
    MistralTokenizer.from_pretrained(default_model_path()).save_pretrained(source)
    grown = _convert_growth(out, "--model", str(source), "--layout", layout)
    model = MistralForCausalLM.from_pretrained(source)  # float32, as convert's default
    assert next(model.parameters()).dtype == torch.float32
    # measured: loading the model whole grew it 1.4x
    assert grown < 0.75 * model.num_parameters() * 4, grown
    if layout == "mistral":
        save_mistral_layout(model.state_dict(), model.config, ref, max_shard_size="50MB")
        _assert_same_mistral_shards(out, ref)
    else:
        model.save_pretrained(ref, max_shard_size="50MB")
        assert json.loads((out / "config.json").read_text()) == json.loads((ref / "config.json").read_text())
        _assert_same_hf_shards(out, ref)
    assert (out / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
