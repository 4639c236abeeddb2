"""Byte-level BPE tokenizers: train small ones for synthetic checkpoints, load real ones, check them against
the embedding table.

Qwen-style layout: ordinary tokens first, special tokens (`<|endoftext|>`, `<|im_start|>`, `<|im_end|>`)
appended after them, and embedding rows past the last token id are padding.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers

from q3lab.base import jsonio
from q3lab.errors import CheckpointError, InputError

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2's pre-tokenization split (what transformers' Qwen2Tokenizer applies before byte-level BPE): needed to
# reproduce the real tokenizer's ids when only vocab.json + merges.txt are given.
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_BYTES = 256


class Tokenizer:
    """A loaded tokenizer: ids in and out, plus the special tokens its config names."""

    def __init__(self, hf: tokenizers.Tokenizer, *, special_tokens: dict[str, int], eos_token: str | None,
                 path: Path | None = None):
        self.hf = hf
        self.special_tokens = dict(special_tokens)
        self.eos_token = eos_token
        self.path = path

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token strings in the text map to their ids (no BOS is added).

        Text that is not a string of Unicode characters (a lone surrogate: how Python hands over command-line
        bytes that are not UTF-8) raises InputError, as tokenizers' own refusals do."""
        if not isinstance(text, str):
            raise InputError(f"cannot tokenize {type(text).__name__} {text!r:.60}: expected text")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            c = ord(text[e.start])
            byte = f" (byte 0x{c - 0xDC00:02x} of input that is not UTF-8)" if 0xDC80 <= c <= 0xDCFF else ""
            raise InputError(f"text is not valid Unicode: lone surrogate U+{c:04X} at character {e.start}{byte}; "
                             f"give UTF-8 text") from None
        try:
            return self.hf.encode(text, add_special_tokens=False).ids
        except Exception as e:  # noqa: BLE001 - tokenizers raises plain exceptions from Rust
            raise InputError(f"the tokenizer cannot encode {text[:60]!r}: {e}") from None

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """Text of `ids`; keeps special tokens by default so that decode(encode(t)) == t."""
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included."""
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def max_token_id(self) -> int:
        return max(self.hf.get_vocab(with_added_tokens=True).values())

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self.hf.token_to_id(self.eos_token)

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, eos={self.eos_token!r}, "
                f"specials={len(self.special_tokens)}, path={str(self.path) if self.path else None!r})")


# -- training and saving -------------------------------------------------------------------------
def qwen_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """Qwen2's split (digits one by one, no prefix space) followed by the byte-level mapping.

    transformers' Qwen2Tokenizer applies this split whatever tokenizer.json says, so a tokenizer trained
    with GPT-2's split would give other ids there.
    """
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def train_bpe(texts: Iterable[str], vocab_size: int, special_tokens: list[str] | None = None) -> tokenizers.Tokenizer:
    """Train a byte-level BPE tokenizer with at most `vocab_size` ids, special tokens included.

    All 256 byte symbols are in the base alphabet, so any text (any Unicode) encodes and decodes losslessly.
    Special tokens get the last ids, after the ordinary vocabulary, as in Qwen's tokenizer. A small corpus
    may run out of merges before `vocab_size`: the result then has fewer ids.
    """
    specials = list(QWEN_SPECIALS if special_tokens is None else special_tokens)
    if len(set(specials)) != len(specials):
        raise InputError(f"train_bpe: duplicate special tokens in {specials}")
    need = _BYTES + len(specials)
    if vocab_size < need:
        raise InputError(f"train_bpe: vocab_size {vocab_size} is too small: the byte alphabet and "
                         f"{len(specials)} special tokens need {need}")
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = qwen_pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(specials), min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return tok


def save_tokenizer(tok: tokenizers.Tokenizer | Tokenizer, folder: str | Path, *, eos_token: str | None = None,
                   model_max_length: int = 65536) -> Path:
    """Write `tokenizer.json` and a transformers-style `tokenizer_config.json` into `folder`.

    `eos_token` defaults to `<|im_end|>` when the tokenizer has it (Qwen chat models stop there), else
    `<|endoftext|>`; there is no BOS token, as in Qwen.
    """
    hf = tok.hf if isinstance(tok, Tokenizer) else tok
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    added = {t.content: (i, t) for i, t in sorted(hf.get_added_tokens_decoder().items())}
    if eos_token is None:
        eos_token = next((s for s in ("<|im_end|>", "<|endoftext|>") if s in added), None)
        if eos_token is None:
            raise InputError(f"save_tokenizer: no eos_token given and neither <|im_end|> nor <|endoftext|> "
                             f"among the added tokens {sorted(added)}")
    elif hf.token_to_id(eos_token) is None:
        raise InputError(f"save_tokenizer: eos_token {eos_token!r} is not in the vocabulary")
    pad = "<|endoftext|>" if "<|endoftext|>" in added else None
    config: dict[str, Any] = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                     "single_word": t.single_word, "special": t.special}
            for _, (i, t) in sorted(added.items(), key=lambda kv: kv[1][0])
        },
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": eos_token,
        "errors": "replace",
        "model_max_length": int(model_max_length),
        "pad_token": pad,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    hf.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return folder


# -- loading -------------------------------------------------------------------------------------
def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load the tokenizer of a folder: `tokenizer.json`, or `vocab.json` + `merges.txt` (Qwen2 style).

    Special tokens and the EOS token come from `tokenizer_config.json` when present; every id it names
    must agree with the tokenizer, or this raises `CheckpointError`.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a directory (expected a folder with tokenizer.json, or "
                              f"vocab.json + merges.txt)")
    cfg = _read_config(folder / "tokenizer_config.json")
    decoder_cfg = _added_tokens(cfg, folder / "tokenizer_config.json")
    if jsonio.exists(folder / "tokenizer.json", CheckpointError):
        path = folder / "tokenizer.json"
        text = jsonio.read_text(path, CheckpointError, kind="tokenizer")
        depth = jsonio.json_depth(text)
        if depth > jsonio.MAX_DEPTH:
            raise CheckpointError(f"{path}: cannot be read as a tokenizer: nested {depth} levels deep, more than "
                                  f"the {jsonio.MAX_DEPTH} q3lab accepts")
        try:
            hf = tokenizers.Tokenizer.from_str(text)
        except Exception as e:  # noqa: BLE001 - the Rust side raises plain Exception for any malformed file
            raise CheckpointError(f"{path}: cannot be read as a tokenizer: {e}") from None
    elif jsonio.exists(folder / "vocab.json", CheckpointError) and jsonio.exists(folder / "merges.txt", CheckpointError):
        hf = _from_vocab_merges(folder, decoder_cfg)
    else:
        present = sorted(p.name for p in folder.iterdir())[:12]
        raise CheckpointError(f"{folder}: no tokenizer found: looked for tokenizer.json, or vocab.json + "
                              f"merges.txt; the folder holds {present}")

    where = folder / "tokenizer_config.json"
    if decoder_cfg:
        specials = {}
        for sid, entry in decoder_cfg.items():
            got = hf.token_to_id(entry["content"])
            if got != sid:
                raise CheckpointError(f"{folder}: tokenizer_config.json says {entry['content']!r} has id {sid}, the "
                                      f"tokenizer gives {got}")
            if entry.get("special", True):
                specials[entry["content"]] = sid
    else:
        specials = {t.content: i for i, t in hf.get_added_tokens_decoder().items() if t.special}

    eos = cfg.get("eos_token")
    if isinstance(eos, dict):  # older configs store AddedToken dicts
        eos = eos.get("content")
    if eos is not None and not isinstance(eos, str):
        raise CheckpointError(f"{where}: eos_token is {eos!r:.80}, expected a string")
    if eos is not None and hf.token_to_id(eos) is None:
        raise CheckpointError(f"{where}: eos_token {eos!r} is not in the vocabulary")
    return Tokenizer(hf, special_tokens=dict(sorted(specials.items(), key=lambda kv: kv[1])), eos_token=eos,
                     path=folder)


def _read_config(path: Path) -> dict:
    if not jsonio.exists(path, CheckpointError):
        return {}
    return jsonio.read_json_object(path, CheckpointError, kind="tokenizer_config")


def _added_tokens(cfg: dict, where: Path) -> dict[int, dict]:
    """tokenizer_config.json's added_tokens_decoder, checked field by field: id (a decimal string) -> entry with
    a `content` string and true/false flags."""
    raw = cfg.get("added_tokens_decoder") or {}
    if not isinstance(raw, dict):
        raise CheckpointError(f"{where}: added_tokens_decoder is {type(raw).__name__}, expected an object of "
                              f"id -> token")
    out = {}
    for sid, entry in raw.items():
        if not (sid.isascii() and sid.isdigit()) or len(sid) > 12:
            raise CheckpointError(f"{where}: added_tokens_decoder key {sid[:40]!r} is not a token id")
        if not isinstance(entry, dict) or not isinstance(entry.get("content"), str):
            raise CheckpointError(f"{where}: added_tokens_decoder[{sid}] has no content string")
        flags = [k for k in ("special", "normalized", "lstrip", "rstrip", "single_word")
                 if k in entry and not isinstance(entry[k], bool)]
        if flags:
            raise CheckpointError(f"{where}: added_tokens_decoder[{sid}]: {', '.join(flags)} must be true or false")
        out[int(sid)] = entry
    return out


def _from_vocab_merges(folder: Path, decoder_cfg: dict[int, dict]) -> tokenizers.Tokenizer:
    vocab = jsonio.read_json_object(folder / "vocab.json", CheckpointError, kind="tokenizer")
    if not all(type(v) is int for v in vocab.values()):
        raise CheckpointError(f"{folder / 'vocab.json'}: expected an object of token -> integer id")
    merges = []
    text = jsonio.read_text(folder / "merges.txt", CheckpointError, kind="tokenizer")
    for n, line in enumerate(text.splitlines(), 1):
        if not line or (n == 1 and line.startswith("#version")):
            continue
        pair = line.split(" ")
        if len(pair) != 2:
            raise CheckpointError(f"{folder / 'merges.txt'}:{n}: expected two tokens separated by a space, "
                                  f"got {line[:80]!r}")
        merges.append(tuple(pair))
    try:
        bpe = models.BPE(vocab, merges)
    except Exception as e:  # noqa: BLE001 - tokenizers raises plain exceptions from Rust
        raise CheckpointError(f"{folder}: vocab.json + merges.txt cannot be read as BPE: {e}") from None
    hf = tokenizers.Tokenizer(bpe)
    hf.pre_tokenizer = qwen_pre_tokenizer()
    hf.decoder = decoders.ByteLevel()
    # Added tokens are appended in id order; for a well-formed folder they land on the ids the config names
    # (load_tokenizer checks each one afterwards).
    for sid, entry in sorted(decoder_cfg.items()):
        if hf.token_to_id(entry["content"]) is None:
            hf.add_tokens([AddedToken(entry["content"], special=entry.get("special", True),
                                      normalized=entry.get("normalized", False))])
    return hf


# -- checks --------------------------------------------------------------------------------------
def check_vocab(tokenizer: Tokenizer | tokenizers.Tokenizer, embedding_rows: int) -> dict[str, int]:
    """Compare the tokenizer with an embedding table of `embedding_rows` rows.

    More rows than token ids is normal (the real model pads 152,064 rows over about 151.7k tokens); a token
    id at or past the last row would index out of the table: `CheckpointError`.
    """
    hf = tokenizer.hf if isinstance(tokenizer, Tokenizer) else tokenizer
    vocab = hf.get_vocab(with_added_tokens=True)
    needed = max(vocab.values()) + 1
    report = {"vocab_size": len(vocab), "max_token_id": needed - 1, "embedding_rows": int(embedding_rows),
              "padding_rows": int(embedding_rows) - needed}
    if embedding_rows < needed:
        top = max(vocab, key=vocab.__getitem__)
        where = f" ({tokenizer.path})" if isinstance(tokenizer, Tokenizer) and tokenizer.path else ""
        raise CheckpointError(f"tokenizer{where} has token ids up to {needed - 1} (e.g. {top!r}), but the "
                              f"embedding table has only {embedding_rows} rows: expected at least {needed}")
    return report
