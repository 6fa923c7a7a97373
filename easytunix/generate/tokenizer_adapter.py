"""One tokenizer interface over Hugging Face ``tokenizers`` and SentencePiece.

``TokenizerAdapter`` wraps either a ``tokenizers.Tokenizer`` (loaded from a
``tokenizer.json``) or a ``sentencepiece.SentencePieceProcessor`` (loaded from a
``*.model`` file) and gives both the same small API: encode/decode, the ids of
the special tokens, and chat-template rendering.

For folders holding a ``tokenizer.json`` the ids, decoded text and rendered chat
templates are meant to match ``transformers.AutoTokenizer.from_pretrained`` on
the same folder, without importing ``transformers``.

Example:
    >>> tok = TokenizerAdapter.from_pretrained("path/to/model")
    >>> ids = tok.encode("What is 2 + 3?")
    >>> text = tok.decode(ids)
    >>> prompt = tok.apply_chat_template(
    ...     [{"role": "user", "content": "Hi"}], add_generation_prompt=True
    ... )
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

__all__ = [
    "CHAT_END_TOKENS",
    "TokenizerAdapter",
    "as_tokenizer",
    "tokenizer_eos_id",
    "tokenizer_eos_ids",
    "tokenizer_pad_id",
]

# Tokens that end an assistant turn in common chat formats. When one of them is
# in the vocabulary it is added to ``TokenizerAdapter.eos_ids`` so generation
# stops at the end of a turn even when the tokenizer's own EOS is different.
CHAT_END_TOKENS: tuple[str, ...] = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>")

_HF_FILE = "tokenizer.json"
_SP_FILE = "tokenizer.model"
_LOOKED_FOR = f"{_HF_FILE} (Hugging Face tokenizers), {_SP_FILE} or another *.model file (SentencePiece)"

# Spaces before punctuation removed by ``clean_up_tokenization_spaces`` in
# transformers (only applied to non-BPE models there, and so here too).
_CLEANUP_PAIRS: tuple[tuple[str, str], ...] = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)


def _read_json(path: Path) -> dict[str, Any]:
    """Reads a JSON file, or returns an empty dict when it does not exist."""
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as handle:
        data = json.load(handle)
    return data if isinstance(data, dict) else {}


def _token_content(value: Any) -> str | None:
    """Returns the text of a special token given as a string, dict or AddedToken."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        content = value.get("content")
        return content if isinstance(content, str) else None
    content = getattr(value, "content", None)
    return content if isinstance(content, str) else None


def _as_id_list(value: Any) -> list[int]:
    """Turns an ``eos_token_id`` style value (int, list or None) into a list."""
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value if isinstance(v, int)]
    return []


def _normalize_templates(template: Any) -> dict[str, str]:
    """Turns a ``chat_template`` config value into a {name: template} dict."""
    if template is None:
        return {}
    if isinstance(template, str):
        return {"default": template}
    if isinstance(template, Mapping):
        return {str(k): v for k, v in template.items() if isinstance(v, str)}
    if isinstance(template, (list, tuple)):
        out = {}
        for item in template:
            if isinstance(item, Mapping) and isinstance(item.get("template"), str):
                out[str(item.get("name", "default"))] = item["template"]
        return out
    raise TypeError(f"chat_template must be a string, a dict or a list of {{name, template}}, got {type(template)}")


@functools.lru_cache(maxsize=32)
def _compile_template(source: str) -> Any:
    """Compiles a chat template in a sandboxed jinja2 environment (cached)."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _GenerationBlock(jinja2.ext.Extension):
        """Accepts ``{% generation %}...{% endgeneration %}`` and renders the body as is."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

        def _render_body(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    def tojson(
        value: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: tuple[str, str] | None = None,
        sort_keys: bool = False,
    ) -> str:
        # Unlike jinja's own filter, this one does not HTML-escape.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationBlock, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


class TokenizerAdapter:
    """Tokenizer over Hugging Face ``tokenizers`` or SentencePiece with one API.

    Attributes:
        kind: ``"tokenizers"`` or ``"sentencepiece"``.
        name_or_path: Where the tokenizer was loaded from, if known.
        bos_token: BOS token text, or None.
        eos_token: EOS token text, or None.
        pad_token: Padding token text, or None.
        unk_token: Unknown token text, or None.
        add_bos: Whether ``encode`` prepends BOS (for ``tokenizers`` this is
            read off the post-processor, setting it changes nothing).
        add_eos: Whether ``encode`` appends EOS (as ``add_bos``).
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        bos_token: Any = None,
        eos_token: Any = None,
        pad_token: Any = None,
        unk_token: Any = None,
        chat_template: str | Sequence[Mapping[str, str]] | Mapping[str, str] | None = None,
        add_bos: bool | None = None,
        add_eos: bool | None = None,
        additional_special_tokens: Iterable[Any] = (),
        extra_eos_ids: Iterable[int] = (),
        clean_up_tokenization_spaces: bool = False,
        name_or_path: str | None = None,
        copy: bool = True,
    ) -> None:
        """Wraps a tokenizer object.

        Args:
            tokenizer: A ``tokenizers.Tokenizer`` (copied, see ``copy``) or a
                ``sentencepiece.SentencePieceProcessor``.
            bos_token: BOS token (string, or for ``tokenizers`` an
                ``AddedToken``/dict). SentencePiece defaults to the model's BOS piece.
            eos_token: EOS token, as ``bos_token``.
            pad_token: Padding token, as ``bos_token``.
            unk_token: Unknown token, as ``bos_token``.
            chat_template: Jinja chat template, a {name: template} dict or a
                list of {"name", "template"} dicts (the one named "default" is used).
            add_bos: SentencePiece only: prepend BOS in ``encode`` (default True).
                For ``tokenizers`` the post-processor of ``tokenizer.json`` decides.
            add_eos: SentencePiece only: append EOS in ``encode`` (default False).
            additional_special_tokens: More special tokens (recognized in text,
                dropped by ``decode(skip_special_tokens=True)``).
            extra_eos_ids: More ids that end generation (see ``eos_ids``).
            clean_up_tokenization_spaces: Remove spaces before punctuation when
                decoding (ignored for BPE models, as in transformers).
            name_or_path: Where the tokenizer came from, shown in ``repr``.
            copy: Work on a copy of a ``tokenizers.Tokenizer``, since the adapter
                turns off its padding and truncation and may add special tokens.
                False changes the given object in place (faster for big vocabularies).

        Raises:
            TypeError: If ``tokenizer`` is of neither supported type.
        """
        self.name_or_path = name_or_path
        self._templates = _normalize_templates(chat_template)
        self._extra_eos_ids = [int(i) for i in extra_eos_ids]
        self._clean_up = bool(clean_up_tokenization_spaces)
        additional = [t for t in additional_special_tokens if _token_content(t)]
        self._sp_fixed: dict[str, int | None] | None = None

        if _is_hf_tokenizer(tokenizer):
            self.kind = "tokenizers"
            self._init_hf(tokenizer, bos_token, eos_token, pad_token, unk_token, additional, copy)
            # Informative only: the tokenizer.json post-processor decides.
            probe = self._hf.encode("a", add_special_tokens=True).ids
            self.add_bos = bool(probe) and self.bos_id is not None and probe[0] == self.bos_id
            self.add_eos = bool(probe) and self.eos_id is not None and probe[-1] == self.eos_id
        elif _is_sp_processor(tokenizer):
            self.kind = "sentencepiece"
            self.add_bos = True if add_bos is None else bool(add_bos)
            self.add_eos = False if add_eos is None else bool(add_eos)
            self._init_sp(tokenizer, bos_token, eos_token, pad_token, unk_token, additional)
        else:
            raise TypeError(
                "TokenizerAdapter needs a tokenizers.Tokenizer or a sentencepiece.SentencePieceProcessor, "
                f"got {type(tokenizer).__name__}"
            )

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides: Any) -> TokenizerAdapter:
        """Loads a tokenizer from a folder or a SentencePiece model file.

        A folder is read as a Hugging Face tokenizer when it holds
        ``tokenizer.json``, else as SentencePiece when it holds
        ``tokenizer.model`` (or another ``*.model`` file). The optional files
        ``tokenizer_config.json``, ``special_tokens_map.json``,
        ``chat_template.jinja``, ``generation_config.json`` and ``config.json``
        supply special tokens, the chat template and extra EOS ids.

        Args:
            path: A folder, a ``tokenizer.json`` file or a ``*.model`` file.
            **overrides: Keyword arguments of ``TokenizerAdapter.__init__`` that
                replace the values read from the config files.

        Returns:
            The adapter.

        Raises:
            FileNotFoundError: If ``path`` does not exist or holds no tokenizer file.
        """
        path = Path(path).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"Tokenizer path {str(path)!r} does not exist (looked for {_LOOKED_FOR}).")
        if path.is_file():
            folder = path.parent
            hf_file = path if path.suffix == ".json" else None
            sp_file = path if path.suffix == ".model" else None
            if hf_file is None and sp_file is None:
                raise FileNotFoundError(
                    f"{str(path)!r} is not a tokenizer file; expected a folder or a file among {_LOOKED_FOR}."
                )
        else:
            folder = path
            hf_file = folder / _HF_FILE if (folder / _HF_FILE).is_file() else None
            sp_file = None
            if hf_file is None:
                if (folder / _SP_FILE).is_file():
                    sp_file = folder / _SP_FILE
                else:
                    models = sorted(p for p in folder.glob("*.model") if p.is_file())
                    sp_file = models[0] if models else None
            if hf_file is None and sp_file is None:
                present = sorted(p.name for p in folder.iterdir())[:20]
                raise FileNotFoundError(
                    f"No tokenizer found in {str(folder)!r}: looked for {_LOOKED_FOR}. "
                    f"The folder holds: {present or 'nothing'}."
                )

        config = _read_json(folder / "tokenizer_config.json")
        if "added_tokens_decoder" not in config:
            # Older saves keep the special tokens in special_tokens_map.json,
            # which then wins over tokenizer_config.json (as in transformers).
            config.update(_read_json(folder / "special_tokens_map.json"))
        generation_config = _read_json(folder / "generation_config.json")
        model_config = _read_json(folder / "config.json")

        kwargs: dict[str, Any] = {}
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            kwargs[name] = _added_token_from_config(config.get(name))
        additional = list(config.get("additional_special_tokens") or [])
        extra = config.get("extra_special_tokens")
        if isinstance(extra, Mapping):  # named model-specific tokens, e.g. {"image_token": "<image>"}
            additional.extend(extra.values())
        elif isinstance(extra, (list, tuple)):
            additional.extend(extra)
        kwargs["additional_special_tokens"] = [_added_token_from_config(t) for t in additional]

        template_file = folder / "chat_template.jinja"
        if template_file.is_file():
            # A separate template file takes priority over the config entry.
            templates = _normalize_templates(config.get("chat_template"))
            templates["default"] = template_file.read_text(encoding="utf-8")
            kwargs["chat_template"] = templates
        else:
            kwargs["chat_template"] = config.get("chat_template")

        extra_eos: list[int] = []
        for source in (generation_config, model_config):
            extra_eos.extend(_as_id_list(source.get("eos_token_id")))
        kwargs["extra_eos_ids"] = extra_eos
        kwargs["clean_up_tokenization_spaces"] = bool(config.get("clean_up_tokenization_spaces", False))
        kwargs["name_or_path"] = str(path)

        if hf_file is not None:
            from tokenizers import Tokenizer

            tokenizer: Any = Tokenizer.from_file(str(hf_file))
            kwargs["copy"] = False  # the adapter owns this object
        else:
            import sentencepiece as spm

            tokenizer = spm.SentencePieceProcessor(model_file=str(sp_file))
            if "add_bos_token" in config:
                kwargs["add_bos"] = bool(config["add_bos_token"])
            if "add_eos_token" in config:
                kwargs["add_eos"] = bool(config["add_eos_token"])
            # When neither the tokenizer config nor the model names a special
            # token, take its id from generation_config.json / config.json.
            own_ids = {
                "bos_token": tokenizer.bos_id(),
                "eos_token": tokenizer.eos_id(),
                "pad_token": tokenizer.pad_id(),
            }
            for name, own_id in own_ids.items():
                key = f"{name}_id"
                ids = _as_id_list(generation_config.get(key, model_config.get(key)))
                if kwargs[name] is None and own_id < 0 and ids and 0 <= ids[0] < tokenizer.get_piece_size():
                    kwargs[name] = tokenizer.id_to_piece(ids[0])
        kwargs.update(overrides)
        return cls(tokenizer, **kwargs)

    def _init_hf(
        self,
        tokenizer: Any,
        bos_token: Any,
        eos_token: Any,
        pad_token: Any,
        unk_token: Any,
        additional: list[Any],
        copy: bool,
    ) -> None:
        """Sets up the Hugging Face ``tokenizers`` backend."""
        from tokenizers import AddedToken, Tokenizer

        tok = Tokenizer.from_str(tokenizer.to_str()) if copy else tokenizer
        tok.no_padding()
        tok.no_truncation()
        # Like transformers, make sure every named special token is an added
        # special token, so it is matched in text and skipped when decoding.
        existing = {t.content for t in tok.get_added_tokens_decoder().values()}
        to_add = []
        for value in (bos_token, eos_token, unk_token, pad_token, *additional):
            content = _token_content(value)
            if content is None or content in existing:
                continue
            existing.add(content)
            if isinstance(value, AddedToken):
                to_add.append(value)
            else:
                to_add.append(AddedToken(content, special=True))
        if to_add:
            tok.add_tokens(to_add)
        self._hf = tok
        self._sp = None

        self.bos_token = _token_content(bos_token)
        self.eos_token = _token_content(eos_token)
        self.pad_token = _token_content(pad_token)
        self.unk_token = _token_content(unk_token)
        vocab = tok.get_vocab(with_added_tokens=True)
        self._vocab_size = max(vocab.values(), default=-1) + 1
        special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        for value in (self.bos_token, self.eos_token, self.pad_token, self.unk_token, *additional):
            tid = tok.token_to_id(_token_content(value)) if _token_content(value) else None
            if tid is not None:
                special.add(tid)
        self._special_ids = frozenset(special)
        self._model_is_bpe = type(tok.model).__name__ == "BPE"

    def _init_sp(
        self,
        processor: Any,
        bos_token: Any,
        eos_token: Any,
        pad_token: Any,
        unk_token: Any,
        additional: list[Any],
    ) -> None:
        """Sets up the SentencePiece backend.

        A subclass that overrides ``EncodeAsIds`` / ``DecodeIds`` is encoded and
        decoded through them. One with no model loaded (a test vocabulary such
        as Tunix's ``MockVocab``) also gives its special ids through its own
        ``bos_id()`` / ``eos_id()`` / ``pad_id()`` / ``unk_id()`` and its size
        through ``GetPieceSize()``; it has no token strings.
        """
        self._sp = processor
        self._hf = None
        self._model_is_bpe = False
        encode_override = _overrides(processor, "EncodeAsIds")
        self._sp_encode_fn = processor.EncodeAsIds if encode_override else processor.encode
        self._sp_decode_fn = processor.DecodeIds if _overrides(processor, "DecodeIds") else processor.decode
        if not _sp_model_loaded(processor):
            if not encode_override:
                raise ValueError(
                    "The SentencePieceProcessor has no model loaded: load one (SentencePieceProcessor(model_file=...)) "
                    "or, for a vocabulary of your own, override EncodeAsIds and DecodeIds."
                )
            self._init_sp_without_model(processor, bos_token, eos_token, pad_token, unk_token)
            return
        self._vocab_size = processor.get_piece_size()

        def piece_or_default(value: Any, default_id: int) -> str | None:
            content = _token_content(value)
            if content is not None:
                return content
            return processor.id_to_piece(default_id) if 0 <= default_id < self._vocab_size else None

        self.bos_token = piece_or_default(bos_token, processor.bos_id())
        self.eos_token = piece_or_default(eos_token, processor.eos_id())
        self.pad_token = piece_or_default(pad_token, processor.pad_id())
        self.unk_token = piece_or_default(unk_token, processor.unk_id())

        special = {i for i in range(self._vocab_size) if processor.is_control(i) or processor.is_unknown(i)}
        names = [self.bos_token, self.eos_token, self.pad_token, self.unk_token]
        names += [_token_content(t) for t in additional]
        names += list(CHAT_END_TOKENS) + ["<start_of_turn>", "<|im_start|>"]
        for name in names:
            tid = self.token_to_id(name) if name else None
            if tid is not None:
                special.add(tid)
        self._special_ids = frozenset(special)
        # SentencePiece does not match control pieces such as "<bos>" in text,
        # so split them out before encoding (transformers matches them too).
        strings = sorted({processor.id_to_piece(i) for i in special}, key=len, reverse=True)
        self._special_pattern = re.compile("(" + "|".join(re.escape(s) for s in strings) + ")") if strings else None

    def _init_sp_without_model(
        self, processor: Any, bos_token: Any, eos_token: Any, pad_token: Any, unk_token: Any
    ) -> None:
        """Special ids and size from the methods of a SentencePiece subclass that has no model."""

        def method_id(name: str) -> int | None:
            if not _overrides(processor, name):
                return None  # the base method would read the missing model
            value = getattr(processor, name)()
            return None if value is None or int(value) < 0 else int(value)

        self._sp_fixed = {name: method_id(f"{name}_id") for name in ("bos", "eos", "pad", "unk")}
        self._vocab_size = int(processor.GetPieceSize())
        self.bos_token = _token_content(bos_token)
        self.eos_token = _token_content(eos_token)
        self.pad_token = _token_content(pad_token)
        self.unk_token = _token_content(unk_token)
        self._special_ids = frozenset(i for i in self._sp_fixed.values() if i is not None)
        self._special_pattern = None

    # ----------------------------------------------------------------- encoding

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Turns text into token ids.

        Args:
            text: The text. Special token strings in it (such as ``<|im_end|>``)
                become their ids.
            add_special_tokens: Add BOS/EOS: for ``tokenizers`` as the
                ``tokenizer.json`` post-processor says, for SentencePiece
                following ``add_bos``/``add_eos``.

        Returns:
            The token ids.
        """
        if self._hf is not None:
            return list(self._hf.encode(text, add_special_tokens=add_special_tokens).ids)
        return self._sp_encode(text, add_special_tokens)

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Encodes several texts; see ``encode``.

        Args:
            texts: The texts.
            add_special_tokens: As in ``encode``.

        Returns:
            One list of ids per text.
        """
        texts = list(texts)
        if self._hf is not None:
            return [list(e.ids) for e in self._hf.encode_batch(texts, add_special_tokens=add_special_tokens)]
        return [self._sp_encode(t, add_special_tokens) for t in texts]

    def _sp_encode(self, text: str, add_special_tokens: bool) -> list[int]:
        """Encodes with SentencePiece, matching special token strings first."""
        sp = self._sp
        ids: list[int] = []
        if self._special_pattern is None:
            ids = [int(i) for i in self._sp_encode_fn(text)]
        else:
            for i, part in enumerate(self._special_pattern.split(text)):
                if not part:
                    continue
                if i % 2 == 1:
                    ids.append(sp.piece_to_id(part))
                else:
                    ids.extend(int(t) for t in self._sp_encode_fn(part))
        if add_special_tokens:
            if self.add_bos and self.bos_id is not None:
                ids.insert(0, self.bos_id)
            if self.add_eos and self.eos_id is not None:
                ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Turns token ids back into text.

        Args:
            ids: Token ids (a list, tuple or 1-D array).
            skip_special_tokens: Drop the special tokens (``special_ids``).

        Returns:
            The text.
        """
        ids = [int(i) for i in ids]
        if self._hf is not None:
            text = self._hf.decode(ids, skip_special_tokens=skip_special_tokens)
            if self._clean_up and not self._model_is_bpe:
                for before, after in _CLEANUP_PAIRS:
                    text = text.replace(before, after)
            return text
        return self._sp_decode(ids, skip_special_tokens)

    def decode_batch(self, batch: Iterable[Iterable[int]], skip_special_tokens: bool = True) -> list[str]:
        """Decodes several id sequences; see ``decode``.

        Args:
            batch: Sequences of token ids.
            skip_special_tokens: As in ``decode``.

        Returns:
            One string per sequence.
        """
        return [self.decode(ids, skip_special_tokens=skip_special_tokens) for ids in batch]

    def _sp_decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        """Decodes with SentencePiece, writing special tokens as their text."""
        pieces: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in self._special_ids:
                if skip_special_tokens:
                    continue
                if run:
                    pieces.append(self._sp_decode_fn(run))
                    run = []
                pieces.append(self._sp_decode_fn([i]) if self._sp_fixed is not None else self._sp.id_to_piece(i))
            else:
                run.append(i)
        if run:
            pieces.append(self._sp_decode_fn(run))
        return "".join(pieces)

    # ------------------------------------------------------------------- tokens

    def token_to_id(self, token: str) -> int | None:
        """Returns the id of a token string, or None if it is not in the vocabulary."""
        if self._hf is not None:
            return self._hf.token_to_id(token)
        if self._sp_fixed is not None:
            return None  # no model: no token strings
        tid = self._sp.piece_to_id(token)
        if 0 <= tid < self._vocab_size and self._sp.id_to_piece(tid) == token:
            return tid
        return None

    def id_to_token(self, token_id: int) -> str | None:
        """Returns the token string of an id, or None if the id is out of range."""
        token_id = int(token_id)
        if self._hf is not None:
            return self._hf.id_to_token(token_id)
        if self._sp_fixed is not None:
            return None
        if 0 <= token_id < self._vocab_size:
            return self._sp.id_to_piece(token_id)
        return None

    def _id_of(self, token: str | None) -> int | None:
        return self.token_to_id(token) if token else None

    @property
    def bos_id(self) -> int | None:
        """Id of the BOS token, or None if there is none."""
        if self._sp_fixed is not None:
            return self._sp_fixed["bos"]
        return self._id_of(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        """Id of the EOS token, or None if there is none."""
        if self._sp_fixed is not None:
            return self._sp_fixed["eos"]
        return self._id_of(self.eos_token)

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """All ids that end generation, without duplicates, ``eos_id`` first.

        The rule: ``eos_id``; then the ``eos_token_id`` values (int or list) of
        ``generation_config.json`` and ``config.json`` (or ``extra_eos_ids``);
        then each of ``CHAT_END_TOKENS`` (``<|im_end|>``, ``<end_of_turn>``,
        ``<|eot_id|>``, ``<|end|>``) that is in the vocabulary.
        """
        out: list[int] = []
        candidates = [self.eos_id, *self._extra_eos_ids, *(self.token_to_id(t) for t in CHAT_END_TOKENS)]
        for tid in candidates:
            if tid is not None and 0 <= tid < self._vocab_size and tid not in out:
                out.append(tid)
        return tuple(out)

    @property
    def pad_id(self) -> int | None:
        """Id of the padding token; ``eos_id`` when no padding token is defined."""
        pid = self._sp_fixed["pad"] if self._sp_fixed is not None else self._id_of(self.pad_token)
        return self.eos_id if pid is None else pid

    @property
    def unk_id(self) -> int | None:
        """Id of the unknown token, or None if there is none."""
        if self._sp_fixed is not None:
            return self._sp_fixed["unk"]
        return self._id_of(self.unk_token)

    @property
    def vocab_size(self) -> int:
        """Size of the whole id range, added tokens included (largest id + 1)."""
        return self._vocab_size

    def __len__(self) -> int:
        return self._vocab_size

    @property
    def special_ids(self) -> set[int]:
        """Ids of the special tokens (BOS, EOS, pad, unk, control and added special tokens)."""
        return set(self._special_ids)

    # --------------------------------------------------------------------- chat

    @property
    def chat_template(self) -> str | None:
        """The default chat template, or None when the tokenizer has none."""
        if "default" in self._templates:
            return self._templates["default"]
        return next(iter(self._templates.values()), None)

    @property
    def chat_templates(self) -> dict[str, str]:
        """All chat templates by name (most tokenizers have only "default")."""
        return dict(self._templates)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str | list[int]:
        """Renders a conversation with the chat template.

        The template sees ``messages``, ``add_generation_prompt``, ``tools`` and
        ``documents`` (None unless given), the special token strings
        (``bos_token``, ``eos_token``, ``pad_token``, ``unk_token``, when
        defined) and ``kwargs``, as in transformers.

        Args:
            messages: Messages such as ``{"role": "user", "content": "Hi"}``.
            add_generation_prompt: Append the prompt that starts the assistant turn.
            tokenize: Return token ids instead of text. BOS is added as
                ``encode`` would, except when the rendered text already starts
                with the BOS token string.
            chat_template: A template (or the name of one of ``chat_templates``)
                to use instead of the tokenizer's own.
            **kwargs: More template variables.

        Returns:
            The rendered text, or its token ids when ``tokenize`` is True.

        Raises:
            ValueError: If there is no chat template.
        """
        if chat_template is not None and chat_template in self._templates:
            source = self._templates[chat_template]
        elif chat_template is not None:
            source = chat_template
        else:
            source = self.chat_template
        if source is None:
            where = f" loaded from {self.name_or_path!r}" if self.name_or_path else ""
            raise ValueError(
                f"This tokenizer{where} has no chat template (no 'chat_template' in tokenizer_config.json "
                "and no chat_template.jinja). Pass one with TokenizerAdapter(..., chat_template=...), "
                "TokenizerAdapter.from_pretrained(path, chat_template=...) or "
                "apply_chat_template(messages, chat_template=...)."
            )
        variables: dict[str, Any] = {
            name: value
            for name, value in (
                ("bos_token", self.bos_token),
                ("eos_token", self.eos_token),
                ("unk_token", self.unk_token),
                ("pad_token", self.pad_token),
            )
            if value is not None
        }
        variables.update(tools=None, documents=None)
        variables.update(kwargs)
        variables["messages"] = [dict(m) for m in messages]
        variables["add_generation_prompt"] = add_generation_prompt
        text = _compile_template(source).render(**variables)
        if not tokenize:
            return text
        starts_with_bos = bool(self.bos_token) and text.startswith(self.bos_token)
        return self.encode(text, add_special_tokens=not starts_with_bos)

    # --------------------------------------------------------------------- misc

    def __repr__(self) -> str:
        def show(token: str | None, tid: int | None) -> str:
            return "None" if token is None else f"{token!r}({tid})"

        where = f", path={self.name_or_path!r}" if self.name_or_path else ""
        extra = f", add_bos={self.add_bos}" if self.kind == "sentencepiece" else ""
        return (
            f"TokenizerAdapter(kind={self.kind!r}, vocab_size={self.vocab_size}, "
            f"bos={show(self.bos_token, self.bos_id)}, eos={show(self.eos_token, self.eos_id)}, "
            f"pad={show(self.pad_token, self.pad_id)}, eos_ids={list(self.eos_ids)}"
            f"{extra}, chat_template={'yes' if self.chat_template else 'no'}{where})"
        )


def _added_token_from_config(value: Any) -> Any:
    """Turns a special token config entry into a string or ``tokenizers.AddedToken``."""
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        from tokenizers import AddedToken

        flags = {k: bool(value[k]) for k in ("single_word", "lstrip", "rstrip", "normalized") if k in value}
        return AddedToken(value["content"], special=True, **flags)
    return value


def _is_hf_tokenizer(obj: Any) -> bool:
    try:
        from tokenizers import Tokenizer
    except ImportError:  # pragma: no cover - tokenizers is a dependency
        return False
    return isinstance(obj, Tokenizer)


def _overrides(processor: Any, name: str) -> bool:
    """Whether ``processor``'s class replaces SentencePieceProcessor's method ``name``."""
    import sentencepiece as spm

    return getattr(type(processor), name, None) is not getattr(spm.SentencePieceProcessor, name, None)


def _sp_model_loaded(processor: Any) -> bool:
    """Whether a SentencePieceProcessor has a model (an unloaded one serializes to nothing)."""
    import sentencepiece as spm

    try:
        return bool(spm.SentencePieceProcessor.serialized_model_proto(processor))
    except Exception:  # noqa: BLE001 - a subclass that never called the base __init__
        return False


def _is_sp_processor(obj: Any) -> bool:
    try:
        import sentencepiece as spm
    except ImportError:  # pragma: no cover - sentencepiece is a dependency
        return False
    return isinstance(obj, spm.SentencePieceProcessor)


# ----------------------------------------------------------------- any tokenizer
#
# Samplers and data pipelines take a TokenizerAdapter or any object with the
# usual attributes (``eos_id`` / ``eos_ids`` / ``pad_id`` as values or methods,
# or transformers' ``eos_token_id`` / ``pad_token_id``). These read them in one place.


def _attribute(tokenizer: Any, name: str) -> Any:
    """``tokenizer.<name>``, called when it is a method (SentencePiece's ``eos_id()``); None when absent."""
    value = getattr(tokenizer, name, None)
    return value() if callable(value) else value


def as_tokenizer(tokenizer: Any) -> Any:
    """Wraps a raw ``tokenizers.Tokenizer`` / SentencePieceProcessor in a TokenizerAdapter; keeps others.

    Args:
        tokenizer: A TokenizerAdapter, a raw tokenizer, any object with
            ``encode(text)`` and ``decode(ids)``, or None.

    Returns:
        The tokenizer to use (None stays None).

    Raises:
        TypeError: If ``tokenizer`` can neither encode nor decode.
    """
    if tokenizer is None or isinstance(tokenizer, TokenizerAdapter):
        return tokenizer
    if _is_hf_tokenizer(tokenizer) or _is_sp_processor(tokenizer):
        return TokenizerAdapter(tokenizer)
    if not (callable(getattr(tokenizer, "encode", None)) and callable(getattr(tokenizer, "decode", None))):
        raise TypeError(
            "tokenizer must be a TokenizerAdapter, a tokenizers.Tokenizer, a SentencePieceProcessor or any object "
            f"with encode(text) -> ids and decode(ids); got {type(tokenizer).__name__}."
        )
    return tokenizer


def tokenizer_eos_id(tokenizer: Any) -> int | None:
    """The tokenizer's EOS id (``eos_id``, else ``eos_token_id``; the first of a list), or None."""
    if tokenizer is None:
        return None
    value = _attribute(tokenizer, "eos_id")
    if value is None:
        value = _attribute(tokenizer, "eos_token_id")
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return None if value is None or int(value) < 0 else int(value)


def tokenizer_eos_ids(tokenizer: Any) -> tuple[int, ...]:
    """Every id that ends generation: ``eos_ids`` when the tokenizer has them, else its single EOS id.

    Returns:
        The non-negative ids, in order; empty when there is no tokenizer or no EOS.
    """
    if tokenizer is None:
        return ()
    ids = _attribute(tokenizer, "eos_ids")
    if not ids:
        value = _attribute(tokenizer, "eos_id")
        if value is None:
            value = _attribute(tokenizer, "eos_token_id")
        ids = [] if value is None else (value if isinstance(value, (list, tuple)) else [value])
    return tuple(int(i) for i in ids if i is not None and int(i) >= 0)


def tokenizer_pad_id(tokenizer: Any, fallback_to_eos: bool = False) -> int:
    """The id that pads token arrays: ``pad_id`` (or ``pad_token_id``) when set and >= 0.

    Args:
        tokenizer: Any tokenizer, or None.
        fallback_to_eos: Without a pad id use the EOS id (as transformers does),
            instead of 0.

    Returns:
        The pad id; 0 when the tokenizer defines none (and no EOS with ``fallback_to_eos``).
    """
    if tokenizer is None:
        return 0
    for name in ("pad_id", "pad_token_id"):
        value = _attribute(tokenizer, name)
        if value is not None and int(value) >= 0:
            return int(value)
    eos = tokenizer_eos_id(tokenizer) if fallback_to_eos else None
    return 0 if eos is None else eos
