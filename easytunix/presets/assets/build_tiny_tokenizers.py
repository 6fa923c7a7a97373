"""Builds the tiny tokenizers shipped with easytunix.

Run it from the repository root with::

    python -m easytunix.presets.assets.build_tiny_tokenizers [--out DIR]

It writes two folders next to this file (or under ``--out``):

* ``tiny_bpe/``: a byte-level BPE ``tokenizer.json`` trained with the Hugging
  Face ``tokenizers`` library, 512 ids in total, ChatML chat template. Digits
  are split one by one by the pre-tokenizer, so every number is a sequence of
  single-digit tokens. No BOS is added when encoding (like SmolLM2 or Qwen).
* ``tiny_sp/``: a SentencePiece BPE ``tokenizer.model`` with byte fallback and
  512 pieces, Gemma id convention (pad=0, eos=1, bos=2, unk=3), Gemma-style chat
  template, BOS added when encoding.

Both are trained on the same synthetic English and arithmetic corpus, produced
from a fixed random seed, and the training runs single-threaded, so running
the script twice gives identical files.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
from pathlib import Path

VOCAB_SIZE = 512
SEED = 1234
NUM_LINES = 4000

BPE_SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<|im_start|>", "<|im_end|>"]
SP_USER_SYMBOLS = ["<start_of_turn>", "<end_of_turn>"]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\\n\\n' %}"
    "{% set loop_messages = messages[1:] %}"
    "{% else %}"
    "{% set first_user_prefix = '' %}"
    "{% set loop_messages = messages %}"
    "{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') "
    "+ message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

_NOUNS = (
    "cat dog bird fish tree house river book apple teacher student child friend city "
    "garden table window number answer question model word letter story song car "
    "train boat road mountain sun moon star water bread school market doctor farmer "
    "computer list problem"
).split()
_VERBS = (
    "sees likes reads writes finds makes takes gives wants knows helps builds opens "
    "closes counts adds checks moves follows answers learns keeps brings calls"
).split()
_ADJECTIVES = "small big red green blue old new happy quiet fast slow bright dark long short simple hard good".split()
_ADVERBS = "quickly slowly often today again carefully always".split()
_NAMES = "Alice Bob Carol Dave Emma Frank Grace Henry".split()
_CONNECTORS = "and but because so while when then".split()
_PUNCT = [".", "!", "?", "."]


def _sentence(rng: random.Random) -> str:
    """Returns one short English sentence."""
    subject = rng.choice([f"the {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)}", rng.choice(_NAMES)])
    obj = f"a {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)}"
    text = f"{subject} {rng.choice(_VERBS)} {obj}"
    if rng.random() < 0.4:
        text += f" {rng.choice(_ADVERBS)}"
    if rng.random() < 0.3:
        other = rng.choice(_NAMES)
        text += f" {rng.choice(_CONNECTORS)} {other} {rng.choice(_VERBS)} the {rng.choice(_NOUNS)}"
    return text[0].upper() + text[1:] + rng.choice(_PUNCT)


def _arithmetic(rng: random.Random) -> str:
    """Returns one arithmetic question with its answer."""
    a = rng.randint(0, 999)
    b = rng.randint(0, 999)
    op = rng.choice(["+", "-"])
    result = a + b if op == "+" else a - b
    style = rng.randrange(4)
    if style == 0:
        return f"What is {a} {op} {b}? Answer: {result}"
    if style == 1:
        return f"{a} {op} {b} = {result}"
    if style == 2:
        return f"Question: What is {a}{op}{b}?\nAnswer: {result}"
    return f"Compute {a} {op} {b} = ? The answer is {result}."


def _reverse(rng: random.Random) -> str:
    """Returns one word or digit reversal exercise."""
    if rng.random() < 0.5:
        word = rng.choice(_NOUNS + _ADJECTIVES + _VERBS)
    else:
        word = "".join(rng.choice("0123456789") for _ in range(rng.randint(2, 7)))
    return f"Please reverse {word}. Answer: {word[::-1]}"


def build_corpus(num_lines: int = NUM_LINES, seed: int = SEED) -> list[str]:
    """Builds the deterministic synthetic training corpus.

    Args:
        num_lines: Number of lines to generate.
        seed: Seed of the random generator.

    Returns:
        The corpus as a list of lines (some contain a newline inside).
    """
    rng = random.Random(seed)
    makers = [_sentence, _sentence, _arithmetic, _arithmetic, _reverse]
    lines = []
    for _ in range(num_lines):
        lines.append(rng.choice(makers)(rng))
    # Make sure every digit and the operators appear on their own as well.
    lines.extend(["0 1 2 3 4 5 6 7 8 9", "+ - = ? ! . , : ;", "What is", "reverse", "Answer"])
    return lines


def _write_json(path: Path, data: dict) -> None:
    """Writes ``data`` as stable, indented JSON."""
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def build_tiny_bpe(out_dir: Path, corpus: list[str]) -> None:
    """Trains and writes the byte-level BPE tokenizer folder.

    Args:
        out_dir: Folder to write ``tokenizer.json`` and the config files to.
        corpus: Training lines.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=BPE_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
    total = tokenizer.get_vocab_size(with_added_tokens=True)
    if total != VOCAB_SIZE:
        raise RuntimeError(f"tiny_bpe has {total} ids, expected {VOCAB_SIZE}; enlarge the corpus.")

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.json").write_text(tokenizer.to_str(pretty=True) + "\n", encoding="utf-8")
    ids = {tok: tokenizer.token_to_id(tok) for tok in BPE_SPECIAL_TOKENS}
    _write_json(
        out_dir / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<bos>",
            "eos_token": "<eos>",
            "pad_token": "<pad>",
            "unk_token": None,
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
            "model_max_length": 2048,
            "clean_up_tokenization_spaces": False,
            "chat_template": CHATML_TEMPLATE,
        },
    )
    _write_json(
        out_dir / "generation_config.json",
        {
            "bos_token_id": ids["<bos>"],
            "eos_token_id": [ids["<eos>"], ids["<|im_end|>"]],
            "pad_token_id": ids["<pad>"],
        },
    )


def build_tiny_sp(out_dir: Path, corpus: list[str]) -> None:
    """Trains and writes the SentencePiece tokenizer folder.

    Args:
        out_dir: Folder to write ``tokenizer.model`` and the config file to.
        corpus: Training lines.
    """
    import sentencepiece as spm

    model = io.BytesIO()
    with open(os.devnull, "w") as devnull:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(corpus),
            model_writer=model,
            logstream=devnull,
            minloglevel=2,
            model_type="bpe",
            vocab_size=VOCAB_SIZE,
            byte_fallback=True,
            character_coverage=1.0,
            split_digits=True,
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            normalization_rule_name="identity",
            user_defined_symbols=SP_USER_SYMBOLS,
            pad_id=0,
            eos_id=1,
            bos_id=2,
            unk_id=3,
            pad_piece="<pad>",
            eos_piece="<eos>",
            bos_piece="<bos>",
            unk_piece="<unk>",
            num_threads=1,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            seed_sentencepiece_size=100000,
            max_sentence_length=4096,
            hard_vocab_limit=True,
            unk_surface=" \u2047 ",
        )
    data = model.getvalue()
    processor = spm.SentencePieceProcessor(model_proto=data)
    if processor.get_piece_size() != VOCAB_SIZE:
        raise RuntimeError(f"tiny_sp has {processor.get_piece_size()} pieces, expected {VOCAB_SIZE}.")

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.model").write_bytes(data)
    # "mask_token": None keeps transformers' GemmaTokenizer from appending a
    # default "<mask>" token (which would make 513 ids).
    _write_json(
        out_dir / "tokenizer_config.json",
        {
            "tokenizer_class": "GemmaTokenizer",
            "add_bos_token": True,
            "add_eos_token": False,
            "bos_token": "<bos>",
            "eos_token": "<eos>",
            "pad_token": "<pad>",
            "unk_token": "<unk>",
            "mask_token": None,
            "additional_special_tokens": list(SP_USER_SYMBOLS),
            "model_max_length": 2048,
            "clean_up_tokenization_spaces": False,
            "chat_template": GEMMA_TEMPLATE,
        },
    )
    _write_json(
        out_dir / "generation_config.json",
        {
            "bos_token_id": processor.bos_id(),
            "eos_token_id": [processor.eos_id(), processor.piece_to_id("<end_of_turn>")],
            "pad_token_id": processor.pad_id(),
        },
    )


def build_all(out_root: Path) -> None:
    """Builds both tiny tokenizers under ``out_root``.

    Args:
        out_root: Parent folder of ``tiny_bpe/`` and ``tiny_sp/``.
    """
    corpus = build_corpus()
    build_tiny_bpe(out_root / "tiny_bpe", corpus)
    build_tiny_sp(out_root / "tiny_sp", corpus)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent,
        help="parent folder for tiny_bpe/ and tiny_sp/ (default: next to this script)",
    )
    args = parser.parse_args(argv)
    build_all(args.out)
    print(f"wrote {args.out / 'tiny_bpe'} and {args.out / 'tiny_sp'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
