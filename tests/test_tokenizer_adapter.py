"""Tests for easytunix.generate.tokenizer_adapter and the shipped tiny tokenizers."""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
import numpy as np
import pytest

from easytunix.generate.tokenizer_adapter import TokenizerAdapter

ASSETS = Path(__file__).resolve().parents[1] / "easytunix" / "presets" / "assets"
TINY_BPE = ASSETS / "tiny_bpe"
TINY_SP = ASSETS / "tiny_sp"

TEXTS = [
    "",
    " ",
    "Hello, world!",
    "What is 123 + 456? Answer: 579",
    "Please reverse 90817. Answer: 71809",
    "   leading spaces",
    "trailing spaces   ",
    "tabs\tand\nnew lines\n\n\nend",
    "Ünïcödé café naïve résumé",
    "日本語のテキスト",
    "emoji 😀🚀 and ✓",
    "mixed 3.14159 and -42 = ?",
    "<|im_start|>user\nhi<|im_end|>\n",
    "<bos>already has bos<eos>",
    "a" * 60,
    "CamelCaseWords and snake_case_words",
    "Σ math ∑ ∫ ≤ ≥",
    "\u00a0non-breaking\u00a0space",
    "don't won't it's I'm we've they're",
    "x=y+z-1?",
    "The small cat sees a big dog quickly.",
]

CHATS = [
    [{"role": "user", "content": "What is 2 + 3?"}],
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Please reverse cat."},
        {"role": "assistant", "content": "Answer: tac"},
        {"role": "user", "content": "  And 123?  "},
    ],
    [
        {"role": "user", "content": "Hi 😀"},
        {"role": "assistant", "content": "Hello!\nHow can I help?"},
    ],
]


@pytest.fixture(scope="module")
def auto_tokenizer():
    """Returns a cached ``AutoTokenizer.from_pretrained``."""
    transformers = pytest.importorskip("transformers")
    cache = {}

    def load(folder: Path):
        if folder not in cache:
            cache[folder] = transformers.AutoTokenizer.from_pretrained(str(folder))
        return cache[folder]

    return load


@pytest.fixture(scope="module")
def bpe() -> TokenizerAdapter:
    return TokenizerAdapter.from_pretrained(TINY_BPE)


@pytest.fixture(scope="module")
def sp() -> TokenizerAdapter:
    return TokenizerAdapter.from_pretrained(TINY_SP)


# ---------------------------------------------------------------- tiny_bpe


def test_tiny_bpe_special_ids(bpe):
    assert bpe.kind == "tokenizers"
    assert bpe.vocab_size == 512 == len(bpe)
    assert (bpe.pad_id, bpe.bos_id, bpe.eos_id) == (0, 1, 2)
    assert bpe.token_to_id("<|im_start|>") == 3
    assert bpe.token_to_id("<|im_end|>") == 4
    assert bpe.token_to_id("<|im_end|>") in bpe.eos_ids
    assert bpe.eos_ids[0] == bpe.eos_id
    assert bpe.special_ids == {0, 1, 2, 3, 4}
    assert bpe.id_to_token(4) == "<|im_end|>"
    assert bpe.token_to_id("definitely-not-a-token") is None
    assert not bpe.add_bos


def test_tiny_bpe_digits_are_single_tokens(bpe):
    ids = bpe.encode("9876543210")
    assert len(ids) == 10
    assert [bpe.id_to_token(i) for i in ids] == list("9876543210")


@pytest.mark.parametrize("text", TEXTS)
def test_tiny_bpe_matches_transformers(bpe, auto_tokenizer, text):
    hf = auto_tokenizer(TINY_BPE)
    ids = bpe.encode(text)
    assert ids == hf(text)["input_ids"]
    assert bpe.encode(text, add_special_tokens=False) == hf(text, add_special_tokens=False)["input_ids"]
    assert all(0 <= i < 512 for i in ids)
    for skip in (True, False):
        assert bpe.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def test_tiny_bpe_batch_and_roundtrip(bpe):
    batch = bpe.encode_batch(TEXTS)
    assert batch == [bpe.encode(t) for t in TEXTS]
    decoded = bpe.decode_batch(batch, skip_special_tokens=False)
    assert decoded == TEXTS  # byte-level BPE is lossless
    assert bpe.decode(np.asarray(batch[3], dtype=np.int32)) == TEXTS[3]


def test_tiny_bpe_vocab_size_matches_transformers(bpe, auto_tokenizer):
    hf = auto_tokenizer(TINY_BPE)
    assert bpe.vocab_size == len(hf)
    assert bpe.bos_id == hf.bos_token_id
    assert bpe.eos_id == hf.eos_token_id
    assert bpe.pad_id == hf.pad_token_id
    assert bpe.special_ids == set(hf.all_special_ids)


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("chat_index", range(len(CHATS)))
def test_tiny_bpe_chat_template_matches_transformers(bpe, auto_tokenizer, chat_index, add_generation_prompt):
    hf = auto_tokenizer(TINY_BPE)
    chat = CHATS[chat_index]
    ours = bpe.apply_chat_template(chat, add_generation_prompt=add_generation_prompt)
    theirs = hf.apply_chat_template(chat, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert ours == theirs
    ids = bpe.apply_chat_template(chat, add_generation_prompt=add_generation_prompt, tokenize=True)
    assert ids == hf(theirs, add_special_tokens=False)["input_ids"]


def test_tiny_bpe_chatml_format(bpe):
    text = bpe.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = bpe.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True)
    assert ids[0] == bpe.token_to_id("<|im_start|>")
    assert ids[-2] == bpe.token_to_id("<|im_end|>")


def test_construct_from_tokenizers_object():
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(TINY_BPE / "tokenizer.json"))
    tok = TokenizerAdapter(raw, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)
    assert tok.encode("What is 1 + 1?") == raw.encode("What is 1 + 1?").ids
    assert tok.chat_template is None
    # No pad token: pad_id falls back to eos_id.
    assert TokenizerAdapter(raw, eos_token="<eos>").pad_id == 2
    custom = TokenizerAdapter(raw, eos_token="<eos>", chat_template="{{ messages[0]['content'] }}!")
    assert custom.apply_chat_template([{"role": "user", "content": "hey"}]) == "hey!"


def test_template_helpers(bpe):
    template = (
        "{% for m in messages %}{{ m | tojson }}{% if loop.index == 1 %}{% break %}{% endif %}{% endfor %}"
        "{% generation %}[{{ strftime_now('%Y') | length }}]{% endgeneration %}{{ extra }}"
    )
    out = bpe.apply_chat_template(
        [{"role": "user", "content": "é<b>"}, {"role": "user", "content": "x"}], chat_template=template, extra="!"
    )
    assert out == '{"role": "user", "content": "é<b>"}[4]!'
    with pytest.raises(jinja2.exceptions.TemplateError, match="roles must alternate"):
        TokenizerAdapter.from_pretrained(TINY_SP).apply_chat_template(
            [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
        )


def test_template_is_sandboxed(bpe):
    with pytest.raises(jinja2.exceptions.SecurityError):
        bpe.apply_chat_template([], chat_template="{{ ''.__class__.__mro__ }}")


def test_chat_template_list_form(tmp_path):
    for name in ("tokenizer.json", "generation_config.json"):
        (tmp_path / name).write_bytes((TINY_BPE / name).read_bytes())
    config = json.loads((TINY_BPE / "tokenizer_config.json").read_text())
    config["chat_template"] = [
        {"name": "default", "template": "D{{ messages | length }}"},
        {"name": "tool_use", "template": "T{{ messages | length }}"},
    ]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = TokenizerAdapter.from_pretrained(tmp_path)
    assert tok.chat_template == "D{{ messages | length }}"
    assert tok.apply_chat_template([{"role": "user", "content": "a"}]) == "D1"
    assert tok.apply_chat_template([{"role": "user", "content": "a"}], chat_template="tool_use") == "T1"


def test_chat_template_jinja_file_wins(tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((TINY_BPE / name).read_bytes())
    (tmp_path / "chat_template.jinja").write_text("from file: {{ messages[0]['content'] }}")
    tok = TokenizerAdapter.from_pretrained(tmp_path)
    assert tok.apply_chat_template([{"role": "user", "content": "q"}]) == "from file: q"


def test_repr_is_informative(bpe, sp):
    text = repr(bpe)
    for part in ("tokenizers", "vocab_size=512", "'<bos>'(1)", "'<eos>'(2)", "'<pad>'(0)"):
        assert part in text
    text = repr(sp)
    for part in ("sentencepiece", "vocab_size=512", "'<bos>'(2)", "'<eos>'(1)", "'<pad>'(0)"):
        assert part in text


# ----------------------------------------------------------------- tiny_sp

ASCII_TEXTS = [t for t in TEXTS if t.isascii() and "<" not in t]


def test_tiny_sp_special_ids(sp):
    assert sp.kind == "sentencepiece"
    assert sp.vocab_size == 512
    assert (sp.pad_id, sp.eos_id, sp.bos_id, sp.unk_id) == (0, 1, 2, 3)
    start, end = sp.token_to_id("<start_of_turn>"), sp.token_to_id("<end_of_turn>")
    assert start is not None and end is not None
    assert (start, end) == (4, 5)
    assert end in sp.eos_ids
    assert {0, 1, 2, 3, start, end} <= sp.special_ids
    assert sp.add_bos
    assert sp.token_to_id("not-a-piece") is None
    assert sp.id_to_token(10_000) is None


@pytest.mark.parametrize("text", ASCII_TEXTS)
def test_tiny_sp_roundtrip(sp, text):
    ids = sp.encode(text)
    assert ids[0] == sp.bos_id
    assert sp.bos_id not in ids[1:]
    assert all(0 <= i < 512 for i in ids)
    assert sp.decode(ids) == text
    assert sp.decode(sp.encode(text, add_special_tokens=False)) == text


def test_tiny_sp_special_strings_in_text(sp):
    ids = sp.encode("<start_of_turn>user\nhi<end_of_turn>")
    assert ids[:2] == [sp.bos_id, sp.token_to_id("<start_of_turn>")]
    assert ids[-1] == sp.token_to_id("<end_of_turn>")
    assert sp.encode("<bos>x", add_special_tokens=False)[0] == sp.bos_id
    assert sp.decode(ids) == "user\nhi"
    assert sp.decode(ids, skip_special_tokens=False) == "<bos><start_of_turn>user\nhi<end_of_turn>"
    # Bytes outside the vocabulary go through byte fallback, losslessly.
    assert sp.decode(sp.encode("日本 😀")) == "日本 😀"


def test_tiny_sp_chat_template(sp):
    chat = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]
    text = sp.apply_chat_template(chat, add_generation_prompt=False)
    assert text == "<bos><start_of_turn>user\nWhat is 2 + 3?<end_of_turn>\n<start_of_turn>model\n5<end_of_turn>\n"
    prompt = sp.apply_chat_template(chat[:1], add_generation_prompt=True)
    assert prompt.endswith("<start_of_turn>model\n")
    ids = sp.apply_chat_template(chat[:1], add_generation_prompt=True, tokenize=True)
    assert ids[0] == sp.bos_id and ids[1] != sp.bos_id  # no second BOS
    assert sp.decode(ids, skip_special_tokens=False) == prompt


def test_construct_from_sentencepiece_object():
    import sentencepiece as spm

    proc = spm.SentencePieceProcessor(model_file=str(TINY_SP / "tokenizer.model"))
    tok = TokenizerAdapter(proc, add_bos=False)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 1, 0)
    assert tok.encode("What is 4 + 4?") == proc.encode("What is 4 + 4?")
    assert TokenizerAdapter(proc).encode("hi")[0] == 2


@pytest.mark.parametrize("text", TEXTS)
def test_tiny_sp_matches_transformers(sp, auto_tokenizer, text):
    hf = auto_tokenizer(TINY_SP)
    ids = sp.encode(text)
    assert ids == hf(text)["input_ids"]
    for skip in (True, False):
        assert sp.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_tiny_sp_chat_template_matches_transformers(sp, auto_tokenizer, add_generation_prompt):
    hf = auto_tokenizer(TINY_SP)
    for chat in CHATS:
        ours = sp.apply_chat_template(chat, add_generation_prompt=add_generation_prompt)
        assert ours == hf.apply_chat_template(chat, add_generation_prompt=add_generation_prompt, tokenize=False)
        ids = sp.apply_chat_template(chat, add_generation_prompt=add_generation_prompt, tokenize=True)
        assert ids == hf(ours, add_special_tokens=False)["input_ids"]


def _random_texts(count: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    alphabet = list("abcXYZ 0123456789  \n\t.,!?'\"<>|_-+=éü日本😀\u00a0") + [
        "<bos>",
        "<eos>",
        "<pad>",
        "<unk>",
        "<|im_start|>",
        "<|im_end|>",
        "<start_of_turn>",
        "<end_of_turn>",
    ]
    return ["".join(rng.choice(alphabet, size=rng.integers(0, 40))) for _ in range(count)]


def _assert_same_as_transformers(ours: TokenizerAdapter, hf, count: int = 300) -> None:
    """Compares encode and decode (also of random ids) with a transformers tokenizer."""
    rng = np.random.default_rng(1)
    texts = _random_texts(count)
    assert ours.encode_batch(texts) == [hf(t)["input_ids"] for t in texts]
    for _ in range(count):
        ids = rng.integers(0, len(hf), size=rng.integers(0, 20)).tolist()
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), ids


def test_tiny_bpe_random_strings_match_transformers(bpe, auto_tokenizer):
    _assert_same_as_transformers(bpe, auto_tokenizer(TINY_BPE))


def test_gemma_style_tokenizer_json_matches_transformers(tmp_path, auto_tokenizer):
    """tiny_sp saved by transformers as a tokenizer.json (byte fallback, BOS post-processor), like Gemma."""
    auto_tokenizer(TINY_SP).save_pretrained(str(tmp_path))
    ours = TokenizerAdapter.from_pretrained(tmp_path)
    hf = auto_tokenizer(tmp_path)
    assert ours.kind == "tokenizers"
    assert (ours.pad_id, ours.eos_id, ours.bos_id, ours.vocab_size) == (0, 1, 2, 512)
    assert ours.add_bos and ours.encode("")[0] == ours.bos_id
    _assert_same_as_transformers(ours, hf)
    for chat in CHATS:
        for add_generation_prompt in (False, True):
            text = ours.apply_chat_template(chat, add_generation_prompt=add_generation_prompt)
            assert text == hf.apply_chat_template(chat, add_generation_prompt=add_generation_prompt, tokenize=False)
            ids = ours.apply_chat_template(chat, add_generation_prompt=add_generation_prompt, tokenize=True)
            assert ids == hf(text, add_special_tokens=False)["input_ids"]
            assert ids.count(ours.bos_id) == 1


# ------------------------------------------------------------------- errors


def test_missing_folder_error(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError) as info:
        TokenizerAdapter.from_pretrained(missing)
    message = str(info.value)
    assert str(missing) in message and "does not exist" in message
    assert "tokenizer.json" in message and "tokenizer.model" in message


def test_folder_without_tokenizer_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError) as info:
        TokenizerAdapter.from_pretrained(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message
    assert "tokenizer.json" in message and "tokenizer.model" in message and "*.model" in message
    assert "config.json" in message  # lists what the folder holds


def test_missing_chat_template_error():
    from tokenizers import Tokenizer

    tok = TokenizerAdapter(Tokenizer.from_file(str(TINY_BPE / "tokenizer.json")), eos_token="<eos>")
    with pytest.raises(ValueError) as info:
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    message = str(info.value)
    assert "has no chat template" in message
    assert "chat_template=" in message


def test_wrong_object_type():
    with pytest.raises(TypeError, match="tokenizers.Tokenizer or a sentencepiece"):
        TokenizerAdapter(object())


def test_file_paths(tmp_path):
    tok = TokenizerAdapter.from_pretrained(TINY_BPE / "tokenizer.json")
    assert tok.kind == "tokenizers" and tok.chat_template is not None  # configs read from the parent folder
    tok = TokenizerAdapter.from_pretrained(TINY_SP / "tokenizer.model")
    assert tok.kind == "sentencepiece" and tok.bos_id == 2
    renamed = tmp_path / "spm.model"
    renamed.write_bytes((TINY_SP / "tokenizer.model").read_bytes())
    tok = TokenizerAdapter.from_pretrained(tmp_path)  # any *.model file in a folder
    assert tok.vocab_size == 512 and tok.chat_template is None


# -------------------------------------------------------------- build script


def test_build_script_is_deterministic(tmp_path):
    """Rebuilding (well under a second) gives the shipped files byte for byte."""
    from easytunix.presets.assets import build_tiny_tokenizers

    build_tiny_tokenizers.main(["--out", str(tmp_path)])
    shipped = json.loads((TINY_BPE / "tokenizer.json").read_text(encoding="utf-8"))
    rebuilt = json.loads((tmp_path / "tiny_bpe" / "tokenizer.json").read_text(encoding="utf-8"))
    assert rebuilt["model"]["vocab"] == shipped["model"]["vocab"]
    assert rebuilt["model"]["merges"] == shipped["model"]["merges"]
    for folder in ("tiny_bpe", "tiny_sp"):
        for path in sorted((ASSETS / folder).iterdir()):
            assert (tmp_path / folder / path.name).read_bytes() == path.read_bytes(), path.name


def test_shipped_assets_are_small():
    for folder in (TINY_BPE, TINY_SP):
        total = sum(p.stat().st_size for p in folder.iterdir())
        assert 1_000 < total < 100_000


# ------------------------------------------------------------ real tokenizers

REAL_FOLDERS = {
    "smollm2-135m-instruct": "<|im_end|>",
    "gemma3-270m": "<end_of_turn>",
}


def _real_folder(name: str) -> Path:
    """The converted folder of a real model (converted into the cache on first use, like every real_weights test)."""
    from easytunix.convert.real_models import ensure_real_model

    return ensure_real_model(name)


@pytest.mark.real_weights
@pytest.mark.parametrize("name", sorted(REAL_FOLDERS))
def test_real_tokenizer_matches_transformers(name, auto_tokenizer):
    folder = _real_folder(name)
    ours = TokenizerAdapter.from_pretrained(folder)
    hf = auto_tokenizer(folder)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == hf(text)["input_ids"], text
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), text
    _assert_same_as_transformers(ours, hf, count=200)
    assert ours.vocab_size == len(hf)
    assert ours.bos_id == hf.bos_token_id
    assert ours.eos_id == hf.eos_token_id
    assert ours.token_to_id(REAL_FOLDERS[name]) in ours.eos_ids


@pytest.mark.real_weights
@pytest.mark.parametrize("name", sorted(REAL_FOLDERS))
def test_real_chat_template_matches_transformers(name, auto_tokenizer):
    """Uses the folder's own template, or (base models) the matching tiny tokenizer's one."""
    folder = _real_folder(name)
    ours = TokenizerAdapter.from_pretrained(folder)
    hf = auto_tokenizer(folder)
    template = None
    if ours.chat_template is None:
        with pytest.raises(ValueError, match="has no chat template"):
            ours.apply_chat_template(CHATS[0])
        template = TokenizerAdapter.from_pretrained(TINY_SP if "gemma" in name else TINY_BPE).chat_template
    else:
        assert ours.chat_template == hf.chat_template
    for chat in CHATS:
        for add_generation_prompt in (False, True):
            kwargs = {"add_generation_prompt": add_generation_prompt, "chat_template": template}
            text = ours.apply_chat_template(chat, **kwargs)
            assert text == hf.apply_chat_template(chat, tokenize=False, **kwargs)
            ids = ours.apply_chat_template(chat, tokenize=True, **kwargs)
            assert ids == hf(text, add_special_tokens=False)["input_ids"]
            if ours.bos_id is not None and ours.add_bos:
                assert ids.count(ours.bos_id) == 1


def test_eos_and_pad_lookup_reads_any_tokenizer():
    from easytunix.generate.tokenizer_adapter import (
        as_tokenizer,
        tokenizer_eos_id,
        tokenizer_eos_ids,
        tokenizer_pad_id,
    )

    adapter = TokenizerAdapter.from_pretrained(TINY_BPE)
    assert tokenizer_eos_ids(adapter) == adapter.eos_ids and tokenizer_eos_id(adapter) == adapter.eos_id
    assert tokenizer_pad_id(adapter) == adapter.pad_id
    assert as_tokenizer(adapter) is adapter and as_tokenizer(None) is None

    class Methods:  # SentencePiece style: ids behind methods, -1 for none
        def eos_id(self):
            return 7

        def pad_id(self):
            return -1

    class HfStyle:  # transformers style names, a list of EOS ids
        eos_token_id = [5, 9]
        pad_token_id = 4

    assert tokenizer_eos_ids(Methods()) == (7,) and tokenizer_eos_id(Methods()) == 7
    assert tokenizer_pad_id(Methods()) == 0 and tokenizer_pad_id(Methods(), fallback_to_eos=True) == 7
    assert tokenizer_eos_ids(HfStyle()) == (5, 9) and tokenizer_eos_id(HfStyle()) == 5
    assert tokenizer_pad_id(HfStyle()) == 4
    assert tokenizer_eos_ids(object()) == () and tokenizer_eos_id(object()) is None
    assert tokenizer_pad_id(object()) == 0 and tokenizer_pad_id(None) == 0 and tokenizer_eos_ids(None) == ()
    with pytest.raises(TypeError, match="tokenizer must be"):
        as_tokenizer(42)
