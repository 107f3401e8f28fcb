"""Tekken (tekken.json, tiktoken-style byte-level BPE): ids, decoding and streaming against mistral-common.

The oracle is mistral-common's `Tekkenizer.from_file`, on the two tekken files its wheel ships and
on a deterministic corpus of 600+ lines in 12 scripts plus code, whitespace runs and text that
looks like control tokens (which must stay text).
"""

from __future__ import annotations

import base64
import importlib.resources
import json
import random
from pathlib import Path

import pytest

from mistral_lm import AutoTokenizer
from mistral_lm.errors import TokenizerError
from mistral_lm.tokenizer import MistralTokenizer, StreamingDetokenizer

# its tests share costly module fixtures: one xdist worker runs them all (make test's --dist loadgroup)
pytestmark = pytest.mark.xdist_group("tekken")

pytest.importorskip("mistral_common")
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy  # noqa: E402
from mistral_common.tokens.tokenizers.tekken import Tekkenizer  # noqa: E402

DATA = Path(str(importlib.resources.files("mistral_common") / "data"))
FILES = ["tekken_240718.json", "tekken_240911.json"]

SCRIPTS = {
    "latin": ["The quick brown fox jumps over the lazy dog.", "Größenwahn über Ähren, déjà vu, façade, naïve",
              "Zażółć gęślą jaźń; Čeština, Ångström, Þórr"],
    "cyrillic": ["Съешь же ещё этих мягких французских булок, да выпей чаю.", "Ґанок, їжак, Єва; Ђорђе, Љубав"],
    "greek": ["Ξεσκεπάζω την ψυχοφθόρα βδελυγμία.", "Τάχιστη αλώπηξ βαφής ψημένη γη, δρασκελίζει"],
    "arabic": ["نص حكيم له سر قاطع وذو شأن عظيم مكتوب على ثوب أخضر", "مرحبا بالعالم! ١٢٣ ٤٥٦"],
    "hebrew": ["דג סקרן שט בים מאוכזב ולפתע מצא חברה", "שָׁלוֹם עוֹלָם"],
    "devanagari": ["ऋषियों को सताने वाले दुष्ट राक्षसों के राजा रावण का सर्वनाश करने वाले", "नमस्ते दुनिया, क्षत्रिय"],
    "cjk": ["我能吞下玻璃而不伤身体。", "いろはにほへと ちりぬるを、カタカナ漢字", "繁體中文與简体中文混排"],
    "thai": ["เป็นมนุษย์สุดประเสริฐเลิศคุณค่า", "สวัสดีครับ ภาษาไทยไม่มีช่องว่างระหว่างคำ"],
    "korean": ["다람쥐 헌 쳇바퀴에 타고파", "안녕하세요, 세계! 한국어 문장입니다."],
    "emoji": ["😀😃😄 👍🏽 👨‍👩‍👧‍👦 🇫🇷🇯🇵", "❤️‍🔥 🧑🏿‍💻 ✨🎉 1️⃣ #️⃣"],
    "armenian_georgian": ["Բարեւ աշխարհ", "გამარჯობა მსოფლიო"],
    "ethiopic_tamil": ["ሰላም ለዓለም", "வணக்கம் உலகம்"],
}
CODE = ["def f(x):\n    return {'a': [1, 2, 3]}[x]  # comment", "for (int i = 0; i < n; ++i) { sum += a[i]; }",
        "SELECT * FROM t WHERE id IN (1,2,3);", "fn main() { println!(\"{}\", 0x1F_u8 >> 2); }",
        "<html><body class=\"x\">&amp;&#x20AC;</body></html>", "$ grep -rn 'TODO' src/ | wc -l"]
SPECIAL_LOOKING = ["[INST] hi [/INST]", "</s><s>", "<s> text </s>", "[TOOL_CALLS] [{\"name\": \"f\"}]",
                   "<unk><pad>[IMG][IMG_BREAK]", "[SYSTEM_PROMPT]x[/SYSTEM_PROMPT]", "<SPECIAL_42>", "[AVAILABLE_TOOLS]"]
WHITESPACE = ["", " ", "  ", "\n", "\n\n\n", "\t\t", "a  b   c    d", "  leading", "trailing   ", " \n \n ",
              "\r\n\r\n", "x\u00a0y\u2003z", "\u3000全角"]


def make_corpus(n: int = 600) -> list[str]:
    """Deterministic lines: every seed as is, then random mixes of seeds, whitespace and digits."""
    seeds = [s for group in SCRIPTS.values() for s in group] + CODE + SPECIAL_LOOKING + WHITESPACE
    rng = random.Random(16)
    lines = list(seeds)
    joiners = [" ", "", "  ", "\n", "\t", " - ", "1234567", " 3.14 ", "...", "\u200b"]
    while len(lines) < n:
        parts = rng.sample(seeds, rng.randint(1, 4))
        if rng.random() < 0.3:  # cut inside a word (and inside a grapheme cluster)
            parts = [p[rng.randint(0, len(p)):] if p else p for p in parts]
        lines.append("".join(p + rng.choice(joiners) for p in parts))
    return lines


CORPUS = make_corpus()


@pytest.fixture(scope="module", params=FILES)
def pair(request: pytest.FixtureRequest) -> tuple[MistralTokenizer, Tekkenizer]:
    path = DATA / request.param
    return MistralTokenizer.from_pretrained(path), Tekkenizer.from_file(path)


def test_corpus_covers_the_scripts() -> None:
    assert len(CORPUS) >= 500 and len(SCRIPTS) >= 10
    for group in SCRIPTS.values():
        assert sum(any(s in line for s in group) for line in CORPUS) >= 3


def test_ids_match_mistral_common(pair: tuple[MistralTokenizer, Tekkenizer]) -> None:
    tok, ref = pair
    assert tok(CORPUS).input_ids == [ref.encode(line, bos=True, eos=False) for line in CORPUS]
    assert tok(CORPUS, add_special_tokens=False).input_ids == [ref.encode(line, bos=False, eos=False)
                                                               for line in CORPUS]
    with_eos = MistralTokenizer.from_pretrained(DATA / FILES[0], add_eos_token=True)
    assert with_eos.encode("a [INST] b") == Tekkenizer.from_file(DATA / FILES[0]).encode("a [INST] b", True, True)


def test_special_tokens_as_mistral_common(pair: tuple[MistralTokenizer, Tekkenizer]) -> None:
    tok, ref = pair
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.pad_token_id) == (
        ref.bos_id, ref.eos_id, ref.unk_id, ref.pad_id)
    assert len(tok) == tok.vocab_size == ref.n_words
    assert tok.all_special_ids == list(range(ref.num_special_tokens)) == sorted(ref.special_ids)
    assert tok.convert_ids_to_tokens(list(range(ref.num_special_tokens))) == [
        ref.id_to_piece(i) for i in range(ref.num_special_tokens)]
    assert tok.convert_tokens_to_ids("[TOOL_CALLS]") == ref.get_special_token("[TOOL_CALLS]")
    for text in SPECIAL_LOOKING:  # stays text: no control id
        assert min(tok.encode(text, add_special_tokens=False)) >= ref.num_special_tokens
    # ids of regular tokens are offset by num_special_tokens; every id renders as mistral-common's bytes
    for i in [ref.num_special_tokens, ref.num_special_tokens + 255, 5000, 70000, ref.n_words - 1]:
        assert tok.token_table.raw[i] == ref.id_to_byte_piece(i)


def test_decode_round_trip(pair: tuple[MistralTokenizer, Tekkenizer]) -> None:
    tok, ref = pair
    rows = tok(CORPUS).input_ids
    assert tok.batch_decode(rows, skip_special_tokens=True) == CORPUS
    assert [tok.decode(r, skip_special_tokens=True) for r in rows] == [ref.decode(r) for r in rows]
    kept = [ref.decode(r, special_token_policy=SpecialTokenPolicy.KEEP) for r in rows[:50]]
    assert tok.batch_decode(rows[:50]) == kept


def test_streaming_is_utf8_safe(pair: tuple[MistralTokenizer, Tekkenizer]) -> None:
    tok, _ = pair
    split_chars = 0
    for line in CORPUS:
        ids = tok.encode(line, add_special_tokens=False)
        detok = StreamingDetokenizer(tok)
        chunks = [detok.add(i) for i in ids] + [detok.finish()]
        assert "".join(chunks) == line
        assert all("\ufffd" not in c for c in chunks)  # never half a character
        split_chars += sum(1 for i in ids if _incomplete_utf8(tok.token_table.raw[i]))
    assert split_chars > 50  # the corpus does exercise characters split across byte-level tokens


def _incomplete_utf8(raw: bytes) -> bool:
    try:
        raw.decode()
    except UnicodeDecodeError:
        return True
    return False


def test_auto_tokenizer_folder_and_save_round_trip(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "tekken.json").symlink_to(DATA / FILES[1])
    tok = AutoTokenizer.from_pretrained(folder)
    assert repr(tok).startswith("MistralTokenizer(engine=tekken")
    sample = CORPUS[:80]
    ref = Tekkenizer.from_file(DATA / FILES[1])
    assert tok(sample).input_ids == [ref.encode(line, True, False) for line in sample]
    written = tok.save_pretrained(tmp_path / "saved")
    assert {Path(p).name for p in written} >= {"tekken.json", "tokenizer.json", "tokenizer_config.json"}
    again = MistralTokenizer.from_pretrained(tmp_path / "saved")
    assert repr(again) == repr(tok) and again(sample).input_ids == tok(sample).input_ids
    # the tokenizer.json conversion (what transformers reads) gives the same ids
    converted = MistralTokenizer.from_pretrained(tmp_path / "saved" / "tokenizer.json")
    assert converted(sample, add_special_tokens=False).input_ids == tok(sample, add_special_tokens=False).input_ids
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "saved")
    plain = [line for line in sample if not any(s in line for s in tok.all_special_tokens[:20])]
    assert [theirs(line).input_ids for line in plain] == tok(plain).input_ids


def test_opt_in_special_tokens(pair: tuple[MistralTokenizer, Tekkenizer]) -> None:
    tok, ref = pair
    ids = tok.encode("[INST] hi [/INST]", split_special_tokens=False)
    assert ids == [ref.bos_id, ref.get_special_token("[INST]"), *ref.encode(" hi ", False, False),
                   ref.get_special_token("[/INST]")]


# ----- bad files: a small synthetic tekken file --------------------------------------------------

def _tiny_tekken(**changes: object) -> dict:
    merges = [b"ab", b"abc", b" a", b"cd"]
    vocab = [{"rank": i, "token_bytes": base64.b64encode(bytes([i])).decode(), "token_str": None} for i in range(256)]
    vocab += [{"rank": 256 + k, "token_bytes": base64.b64encode(m).decode(), "token_str": m.decode()}
              for k, m in enumerate(merges)]
    data = {"config": {"pattern": r"\s*\S+|\s+", "num_vocab_tokens": len(vocab),
                       "default_vocab_size": len(vocab) + 30, "default_num_special_tokens": 30, "version": "v3"},
            "vocab": vocab}
    for key, value in changes.items():
        target = data["config"] if key in data["config"] else data
        target[key] = value
    return data


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "tekken.json"
    path.write_text(json.dumps(data))
    return path


def test_tiny_file_matches_mistral_common(tmp_path: Path) -> None:
    specials = [{"rank": i, "token_str": t, "is_control": True} for i, t in enumerate(["<unk>", "<s>", "</s>", "[X]"])]
    for data in (_tiny_tekken(), _tiny_tekken(version="v13", special_tokens=specials)):
        path = _write(tmp_path, data)
        tok, ref = MistralTokenizer.from_pretrained(path), Tekkenizer.from_file(path)
        for text in ["abc abcd", " a cd", "[X] zz", "é"]:
            assert tok.encode(text) == ref.encode(text, True, False)
        assert tok.convert_ids_to_tokens(list(range(30))) == [ref.id_to_piece(i) for i in range(30)]


@pytest.mark.parametrize(("changes", "field"), [
    ({"version": "v99"}, "config.version"),
    ({"version": "v13"}, "special_tokens"),  # from v11 the file must list its special tokens
    ({"default_vocab_size": 400}, "'vocab' has 260 entries"),
    ({"default_num_special_tokens": 2000}, "config.default_num_special_tokens"),
    ({"pattern": 5}, "config.pattern"),
])
def test_bad_file_names_the_field(tmp_path: Path, changes: dict, field: str) -> None:
    with pytest.raises(TokenizerError, match=field.replace(".", r"\.").replace("[", r"\[")):
        MistralTokenizer.from_pretrained(_write(tmp_path, _tiny_tekken(**changes)))


def test_truncated_or_inconsistent_vocab(tmp_path: Path) -> None:
    data = _tiny_tekken()
    data["vocab"] = data["vocab"][:258]
    with pytest.raises(TokenizerError, match="default_vocab_size"):
        MistralTokenizer.from_pretrained(_write(tmp_path, data))
    data = _tiny_tekken()
    data["vocab"][257]["rank"] = 300
    with pytest.raises(TokenizerError, match=r"vocab\[257\]"):
        MistralTokenizer.from_pretrained(_write(tmp_path, data))
    data = _tiny_tekken()
    data["vocab"][258]["token_bytes"] = data["vocab"][256]["token_bytes"]
    with pytest.raises(TokenizerError, match=r"vocab\[258\]\.token_bytes.*duplicate"):
        MistralTokenizer.from_pretrained(_write(tmp_path, data))
    del data["config"]
    with pytest.raises(TokenizerError, match="config.version"):
        MistralTokenizer.from_pretrained(_write(tmp_path, data))


def test_a_tekken_file_under_another_name(tmp_path: Path) -> None:
    """mistral-common finds Tekken by name only; a renamed copy is recognised by its layout."""
    renamed = tmp_path / "tokenizer_nemo.json"
    renamed.write_bytes((DATA / FILES[1]).read_bytes())
    tok, ref = MistralTokenizer.from_pretrained(renamed), Tekkenizer.from_file(DATA / FILES[1])
    assert tok.encode(CORPUS[:50]) == [ref.encode(line, bos=True, eos=False) for line in CORPUS[:50]]
    (tmp_path / "neither.json").write_text('{"config": {}, "model": {}}')
    with pytest.raises(TokenizerError, match="neither a valid tokenizer.json .* nor a Tekken file"):
        MistralTokenizer.from_pretrained(tmp_path / "neither.json")


def test_is_control_must_be_a_flag(tmp_path: Path) -> None:
    specials = [{"rank": i, "token_str": t, "is_control": True} for i, t in enumerate(["<unk>", "<s>", "</s>"])]
    specials[2]["is_control"] = "yes"
    with pytest.raises(TokenizerError, match=r"special_tokens\[2\]\.is_control"):
        MistralTokenizer.from_pretrained(_write(tmp_path, _tiny_tekken(version="v13", special_tokens=specials)))


def test_a_tekken_gguf_gives_mistral_common_ids(tmp_path: Path) -> None:
    """A GGUF of a Tekken model (Mistral-Nemo) as llama.cpp's converter writes it: byte-level pieces and
    merges, tokenizer.ggml.pre "tekken", the special ids typed CONTROL."""
    import gguf

    source = MistralTokenizer.from_pretrained(DATA / FILES[1])
    engine = source._engine
    merges = json.loads(engine.to_tokenizers().to_str())["model"]["merges"]
    writer = gguf.GGUFWriter(str(tmp_path / "nemo.gguf"), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("tekken")
    writer.add_token_list(engine.pieces)
    writer.add_token_types([3 if i < engine.num_special_tokens else 1 for i in range(len(engine.pieces))])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    writer.add_bos_token_id(source.bos_token_id)
    writer.add_eos_token_id(source.eos_token_id)
    writer.add_add_bos_token(True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tok, ref = MistralTokenizer.from_pretrained(tmp_path / "nemo.gguf"), Tekkenizer.from_file(DATA / FILES[1])
    assert tok(CORPUS).input_ids == [ref.encode(line, bos=True, eos=False) for line in CORPUS]
    assert [tok.decode(ref.encode(line, bos=False, eos=False)) for line in CORPUS[:100]] == CORPUS[:100]
