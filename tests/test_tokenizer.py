"""q3lab.base.tokenizer: byte-level BPE round trips, Qwen-style special ids, loading both folder layouts (checked
against transformers' Qwen2Tokenizer), and the vocabulary-vs-embedding check."""
from __future__ import annotations

import json
import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from q3lab.errors import CheckpointError, InputError
from q3lab.base.tokenizer import QWEN_SPECIALS, check_vocab, load_tokenizer, save_tokenizer, train_bpe

CORPUS = ["The quick brown fox jumps over the lazy dog. " * 3,
          "Routing decides which experts see each token; 128 experts, 8 active. ",
          "Grüße aus Köln! Ça va? 你好，世界。Привет, мир. 🙂🚀 ", "def f(x):\n    return x * 2\n"] * 20
SAMPLES = ["hello world", "The lazy dog jumps 12345 times.\n\n  indented\tTab",
           "Grüße, 你好 мир 🙂 — ﬁ ∑ 𝔘", "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    save_tokenizer(train_bpe(CORPUS, 400), path)
    return path


@pytest.fixture(scope="module")
def tok(folder):
    return load_tokenizer(folder)


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=40))
def test_round_trip_any_unicode(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_bytes_only_vocabulary_gives_one_token_per_utf8_byte():
    # With no room for merges every UTF-8 byte is its own token: 'é' is 2 bytes, '🙂' 4, '你' 3.
    hf = train_bpe(CORPUS, 256 + 3)
    assert hf.get_vocab_size() == 259
    for text in ["abc", "é", "🙂", "你好 x"]:
        assert len(hf.encode(text).ids) == len(text.encode("utf-8"))


def test_special_tokens_are_last_ids(tok):
    assert tok.vocab_size == 400  # the corpus has enough pairs to fill the vocabulary
    assert tok.special_tokens == {"<|endoftext|>": 397, "<|im_start|>": 398, "<|im_end|>": 399}
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 399
    # a special token in the text is one id, never split into bytes
    assert tok.encode("<|im_start|>") == [398]
    assert tok.encode("a<|endoftext|>b")[1] == 397
    assert tok.decode(tok.encode("x<|im_end|>"), skip_special_tokens=True) == "x"


def test_config_file_contents(folder):
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    assert cfg["bos_token"] is None and cfg["eos_token"] == "<|im_end|>" and cfg["model_max_length"] == 65536
    assert {k: v["content"] for k, v in cfg["added_tokens_decoder"].items()} == \
        {"397": "<|endoftext|>", "398": "<|im_start|>", "399": "<|im_end|>"}
    assert all(v["special"] for v in cfg["added_tokens_decoder"].values())


def test_matches_transformers(folder, tok):
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(str(folder))
    for text in SAMPLES:
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False)
    assert ref.eos_token_id == tok.eos_token_id and ref.bos_token is None
    assert ref.pad_token_id == tok.special_tokens["<|endoftext|>"]


def test_vocab_merges_layout(folder, tok, tmp_path):
    # The same model written as vocab.json + merges.txt (the older Qwen2 layout) must give the same ids.
    tok.hf.model.save(str(tmp_path))
    shutil.copy(folder / "tokenizer_config.json", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merges.txt", "tokenizer_config.json", "vocab.json"]
    old = load_tokenizer(tmp_path)
    assert old.special_tokens == tok.special_tokens and old.eos_token_id == tok.eos_token_id
    for text in SAMPLES:
        assert old.encode(text) == tok.encode(text)
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in SAMPLES:
        assert old.encode(text) == ref.encode(text, add_special_tokens=False)


def test_missing_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"tokenizer\.json.*vocab\.json \+ merges\.txt") as e:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(e.value)
    with pytest.raises(CheckpointError, match="not a directory"):
        load_tokenizer(tmp_path / "nope")


def test_config_id_mismatch_is_an_error(folder, tmp_path):
    shutil.copytree(folder, tmp_path / "t")
    cfg_path = tmp_path / "t" / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["added_tokens_decoder"]["396"] = cfg["added_tokens_decoder"].pop("397")
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"'<\|endoftext\|>' has id 396, the tokenizer gives 397"):
        load_tokenizer(tmp_path / "t")


def test_check_vocab(tok):
    # The real model pads 152,064 embedding rows over 151,669 token ids; here 400 ids over 512 rows.
    assert check_vocab(tok, 512) == {"vocab_size": 400, "max_token_id": 399, "embedding_rows": 512,
                                     "padding_rows": 112}
    assert check_vocab(tok, 400)["padding_rows"] == 0
    with pytest.raises(CheckpointError, match=r"token ids up to 399.*only 399 rows: expected at least 400"):
        check_vocab(tok, 399)


def test_train_rejects_impossible_sizes():
    with pytest.raises(InputError, match="vocab_size 200 is too small"):
        train_bpe(CORPUS, 200)
    with pytest.raises(InputError, match="duplicate special"):
        train_bpe(CORPUS, 300, special_tokens=["<a>", "<a>"])
    assert QWEN_SPECIALS == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
