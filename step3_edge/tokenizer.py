"""Step3 special tokens and a synthetic byte-level BPE tokenizer in the real file layout.

The real Step3 tokenizer (tokenizer.json, ~128.8k entries) cannot be downloaded here, so
synthetic checkpoints ship a genuine `tokenizers` byte-level BPE tokenizer that has the same
special tokens at the same ids: ids 0..2 are bos / eos / pad, ids 3..258 are the 256 byte
tokens (byte b -> id 3 + b), ids 259..127999 are unused and the Step3 specials sit at 128000+.
Any text round-trips through it; the real tokenizer.json loads through the same functions.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from step3_edge.errors import ConfigError
from step3_edge.fsutil import confined, read_json

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
PAD_TOKEN = "<｜▁pad▁｜>"
IMAGE_TOKEN = "<im_patch>"
IM_START, IM_END = "<im_start>", "<im_end>"
PATCH_START, PATCH_END, PATCH_NEWLINE = "<patch_start>", "<patch_end>", "<patch_newline>"
BOT_TOKEN, EOT_TOKEN = "<|BOT|>", "<|EOT|>"
THINK_START, THINK_END = "<think>", "</think>"

# How sure each id is: CONFIRMED (read from the released tokenizer / config), UNCONFIRMED (assumed):
SPECIAL_TOKENS: dict[str, int] = {
    BOS_TOKEN: 0,            # UNCONFIRMED (DeepSeek-V3 layout; config.json bos_token_id default)
    EOS_TOKEN: 1,            # UNCONFIRMED (DeepSeek-V3 layout; config.json eos_token_id default)
    PAD_TOKEN: 2,            # UNCONFIRMED (DeepSeek-V3 layout)
    IM_START: 128000,        # Step-3.7 Megatron-Bridge config; likely for Step3, UNCONFIRMED
    IMAGE_TOKEN: 128001,     # CODE (vLLM/SGLang image_token_id default)
    IM_END: 128002,          # Step-3.7 Megatron-Bridge config; UNCONFIRMED for Step3
    PATCH_START: 128003,     # Step-3.7 Megatron-Bridge config; UNCONFIRMED for Step3
    PATCH_NEWLINE: 128004,   # UNCONFIRMED: our assumption (the id is unknown)
    PATCH_END: 128005,       # Step-3.7 Megatron-Bridge config; UNCONFIRMED for Step3
    BOT_TOKEN: 128006,       # UNCONFIRMED: our assumption
    EOT_TOKEN: 128007,       # UNCONFIRMED: our assumption
    THINK_START: 128008,     # UNCONFIRMED: our assumption
    THINK_END: 128009,       # UNCONFIRMED: our assumption
}

# A compact vocabulary (the embedded default model's, and small-vocabulary test models): bos /
# eos / pad 0..2, the 256 byte tokens 3..258, the Step3 specials 259..268.
COMPACT_SPECIAL: dict[str, int] = {
    BOS_TOKEN: 0, EOS_TOKEN: 1, PAD_TOKEN: 2, IM_START: 259, IMAGE_TOKEN: 260, IM_END: 261,
    PATCH_START: 262, PATCH_NEWLINE: 263, PATCH_END: 264, BOT_TOKEN: 265, EOT_TOKEN: 266,
    THINK_START: 267, THINK_END: 268,
}

BYTE_TOKEN_OFFSET = 3  # byte b is token id 3 + b in the synthetic tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet of the ByteLevel pre-tokenizer."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    table: dict[int, str] = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def build_synthetic_tokenizer(special: dict[str, int] = SPECIAL_TOKENS,
                              merges: Sequence[tuple[str, str]] = ()) -> Tokenizer:
    """A byte-level BPE tokenizer with the byte tokens at ids 3..258, every special token at
    exactly its id in `special`, and the tokens that `merges` (byte-level symbol pairs, applied
    in order; none by default) make at the ids that follow the highest special or byte id.
    Raises ConfigError if an id collides."""
    byte_ids = range(BYTE_TOKEN_OFFSET, BYTE_TOKEN_OFFSET + 256)
    clash = {t: i for t, i in special.items() if i in byte_ids or i < 0}
    if clash or len(set(special.values())) != len(special):
        raise ConfigError(f"special token ids {clash or special} overlap the byte tokens "
                          f"(ids {byte_ids.start}..{byte_ids.stop - 1}) or each other",
                          "give every special token its own id outside 3..258")
    vocab = {ch: BYTE_TOKEN_OFFSET + b for b, ch in _bytes_to_unicode().items()}
    dup = set(vocab) & set(special)
    if dup:
        raise ConfigError(f"special tokens {sorted(dup)} are single byte characters",
                          "special tokens must be multi-character strings such as <im_patch>")
    # The specials are in the model vocab too, so AddedVocabulary keeps their ids (it assigns
    # fresh, consecutive ids to added tokens the model does not know).
    vocab.update(special)
    next_id = max(vocab.values()) + 1
    for a, b in merges:
        if a not in vocab or b not in vocab:
            raise ConfigError(f"merge ({a!r}, {b!r}) joins a symbol no earlier merge made",
                              "list merges in the order BPE learned them")
        if a + b not in vocab:
            vocab[a + b] = next_id
            next_id += 1
    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in sorted(special, key=special.__getitem__)])
    check_special_ids(tok, special)
    return tok


def check_special_ids(tok: Tokenizer, special: dict[str, int] = SPECIAL_TOKENS) -> None:
    """Raise ConfigError unless every special token maps to its id and encodes as one token."""
    for text, want in special.items():
        got = tok.token_to_id(text)
        if got != want:
            raise ConfigError(f"tokenizer maps {text!r} to id {got}, expected {want}",
                              "rebuild tokenizer.json with the Step3 special-token ids")
        ids = tok.encode(text, add_special_tokens=False).ids
        if ids != [want]:
            raise ConfigError(f"tokenizer splits special token {text!r} into {ids}",
                              "mark it as a special added token in tokenizer.json")


def _added_token_entry(content: str) -> dict[str, object]:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True}


def learn_merges(texts: Iterable[str], n_merges: int) -> list[tuple[str, str]]:
    """Byte-level BPE merges (at most `n_merges`, in learned order) from a corpus, with the
    `tokenizers` BPE trainer, for `build_synthetic_tokenizer(merges=...)`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=256 + n_merges, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]


def write_tokenizer_files(folder: str | Path, chat_template: str | None = None,
                          special: dict[str, int] = SPECIAL_TOKENS,
                          merges: Sequence[tuple[str, str]] = ()) -> None:
    """Write tokenizer.json and tokenizer_config.json (Hugging Face layout) into `folder`."""
    if chat_template is None:
        from step3_edge.chat import DEFAULT_CHAT_TEMPLATE

        chat_template = DEFAULT_CHAT_TEMPLATE
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_synthetic_tokenizer(special, merges)
    tok.save(str(out / "tokenizer.json"))
    by_id = sorted(special.items(), key=lambda kv: kv[1])
    config = {
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": {str(i): _added_token_entry(t) for t, i in by_id},
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "chat_template": chat_template,
        "clean_up_tokenization_spaces": False,
        "legacy": True,
        "model_max_length": 65536,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (out / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


MAX_TOKENIZER_BYTES = 512 << 20      # tokenizer.json (the real one is ~10 MB)


def load_tokenizer(folder: str | Path) -> Tokenizer:
    """Load `tokenizer.json` from a checkpoint or bundle folder (or the file itself). In a
    folder it must resolve inside it (or its Hugging Face hub repo cache)."""
    p = Path(folder)
    f = confined(p, "tokenizer.json", ConfigError) if p.is_dir() else p
    if not f.is_file():
        raise ConfigError(f"no tokenizer.json at {p}",
                          "copy tokenizer.json from the checkpoint (stepfun-ai/step3) into this "
                          "folder, or run `step3-edge synth` to make a synthetic one")
    return tokenizer_from_file(f)


def tokenizer_from_file(f: Path) -> Tokenizer:
    """A tokenizers.Tokenizer from one tokenizer.json file; ConfigError naming it if the file
    is oversized or not a tokenizer."""
    size = f.stat().st_size
    if size > MAX_TOKENIZER_BYTES:
        raise ConfigError(f"{f} is {size:,} bytes, over the {MAX_TOKENIZER_BYTES:,} bytes a "
                          "tokenizer.json may have", "restore tokenizer.json from the original "
                          "checkpoint")
    try:
        return Tokenizer.from_file(str(f))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON / schema
        raise ConfigError(f"{f} is not a valid tokenizer.json: {e}",
                          "restore tokenizer.json from the original checkpoint") from e


def read_tokenizer_config(folder: str | Path, path: Path | None = None) -> dict[str, object]:
    """tokenizer_config.json of `folder` as a dict ({} when the file is absent); `path`: the
    (already confined) file to read instead."""
    f = path if path is not None else Path(folder) / "tokenizer_config.json"
    if path is None and not (f.is_file() or f.is_symlink()):
        return {}
    if path is None:
        f = confined(folder, "tokenizer_config.json", ConfigError)
    data = read_json(f, ConfigError,
                     "restore tokenizer_config.json from the original checkpoint")
    if not isinstance(data, dict):
        raise ConfigError(f"{f} must hold a JSON object, got {type(data).__name__}",
                          "restore tokenizer_config.json")
    return data


def check_tokenizer_files(folder: str | Path, required: bool = False) -> None:
    """The tokenizer files of a checkpoint, checked before any weight is read: each confined
    to the folder, tokenizer.json a loadable tokenizer, tokenizer_config.json an object whose
    chat_template compiles. Absent files pass unless `required`."""
    from step3_edge.chat import compile_template, load_chat_template

    p = Path(folder)
    if required or (p / "tokenizer.json").exists() or (p / "tokenizer.json").is_symlink():
        load_tokenizer(p)
    compile_template(load_chat_template(p))
