"""Convert a GGUF checkpoint into an ordinary Hugging Face folder.

transformers reads GGUF files (dequantizing them) but refuses to
``save_pretrained`` such a model. This module rebuilds a plain model from the
config, copies the dequantized weights in, and saves a regular folder
(``config.json``, ``model.safetensors``, tokenizer files) atomically.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_INSTALL_HINT = (
    "Converting GGUF checkpoints needs torch, transformers and gguf: "
    "pip install 'easytunix[test]' (or: pip install torch==2.13.0 transformers gguf)"
)

_VERIFY_TEXT = "The quick brown fox jumps over the lazy dog. 1 2 3"

# Strings every converted tokenizer encodes at conversion time; their ids must equal the
# GGUF's own (recorded per model in ``real_models``) and carry its BOS/EOS policy.
TOKENIZER_PROBES = (
    "Once upon a time, there was a",
    _VERIFY_TEXT,
    "  Hello\n\nworld  <eos> émoji 🙂 12345",
)


@dataclass(frozen=True)
class GgufTokenizerSpec:
    """The tokenizer facts a GGUF file states about itself (``tokenizer.ggml.*``).

    Attributes:
        tokens: The vocabulary, indexed by token id.
        bos_id: Id of the beginning-of-sequence token, or None.
        eos_id: Id of the end-of-sequence token, or None.
        add_bos: Whether encoding prepends ``bos_id``.
        add_eos: Whether encoding appends ``eos_id``.
    """

    tokens: tuple[str, ...]
    bos_id: int | None
    eos_id: int | None
    add_bos: bool
    add_eos: bool


# GGUF metadata value types (little-endian): scalar struct formats by type id; 8 is a string, 9 an array.
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def read_gguf_metadata(gguf_path: str | Path, prefix: str = "") -> dict[str, Any]:
    """Reads the key/value header of a GGUF file (v2/v3), keeping keys that start with ``prefix``.

    A small reader of our own: ``gguf.GGUFReader`` also maps every tensor and
    takes ~18 s on Gemma 3's 262k-token vocabulary, this takes well under one.

    Raises:
        ValueError: If the file is not a GGUF file or its header is cut short.
    """
    import struct

    path = Path(gguf_path)
    with open(path, "rb") as handle:
        data = handle.read(4 << 20)
        while True:  # grow the window until the header parses (vocabularies can be tens of MB)
            try:
                return _parse_gguf_header(data, prefix, struct)
            except (struct.error, IndexError) as exc:
                more = handle.read(len(data))
                if not more:
                    raise ValueError(f"{path}: truncated GGUF header ({exc})") from None
                data += more


def _parse_gguf_header(data: bytes, prefix: str, struct: Any) -> dict[str, Any]:
    if data[:4] != b"GGUF":
        raise ValueError("not a GGUF file (no 'GGUF' magic at the start)")
    version, _tensors, count = struct.unpack_from("<IQQ", data, 4)
    if version < 2:
        raise ValueError(f"GGUF version {version} is not supported (2 or 3 is)")
    offset = 24

    def string() -> str:
        nonlocal offset
        (length,) = struct.unpack_from("<Q", data, offset)
        start, offset = offset + 8, offset + 8 + length
        if offset > len(data):
            raise IndexError("string past the read window")
        return data[start:offset].decode("utf-8", errors="replace")

    def value(kind: int) -> Any:
        nonlocal offset
        if kind == _GGUF_STRING:
            return string()
        if kind == _GGUF_ARRAY:
            item_kind, n = struct.unpack_from("<IQ", data, offset)
            offset += 12
            if item_kind in _GGUF_SCALARS:
                fmt = "<" + _GGUF_SCALARS[item_kind] * n
                items = list(struct.unpack_from(fmt, data, offset))
                offset += struct.calcsize(fmt)
                return items
            return [value(item_kind) for _ in range(n)]
        fmt = "<" + _GGUF_SCALARS[kind]
        (scalar,) = struct.unpack_from(fmt, data, offset)
        offset += struct.calcsize(fmt)
        return scalar

    found = {}
    for _ in range(count):
        key = string()
        (kind,) = struct.unpack_from("<I", data, offset)
        offset += 4
        item = value(kind)
        if key.startswith(prefix):
            found[key] = item
    return found


def read_gguf_tokenizer_spec(gguf_path: str | Path) -> GgufTokenizerSpec:
    """Reads the tokenizer metadata (``tokenizer.ggml.*``) of a GGUF file.

    A missing ``add_bos_token`` / ``add_eos_token`` means False, as llama.cpp
    reads it for the BPE vocabularies these models use.

    Raises:
        ValueError: If the file is not GGUF or has no ``tokenizer.ggml.tokens``.
    """
    fields = read_gguf_metadata(gguf_path, prefix="tokenizer.ggml.")

    def value(key: str, default: Any = None) -> Any:
        return fields.get(f"tokenizer.ggml.{key}", default)

    tokens = value("tokens")
    if not tokens:
        raise ValueError(f"{gguf_path} holds no tokenizer.ggml.tokens: it cannot be converted with its tokenizer")
    bos, eos = value("bos_token_id"), value("eos_token_id")
    return GgufTokenizerSpec(
        tokens=tuple(tokens),
        bos_id=None if bos is None else int(bos),
        eos_id=None if eos is None else int(eos),
        add_bos=bool(value("add_bos_token", False)),
        add_eos=bool(value("add_eos_token", False)),
    )


def _write_special_token_policy(folder: Path, spec: GgufTokenizerSpec) -> None:
    """Makes the saved tokenizer add BOS/EOS exactly as the GGUF says.

    transformers' GGUF tokenizer conversion differs between versions (5.19 drops
    Gemma 3's ``<bos>``), so the post-processor in ``tokenizer.json`` and the
    ``add_bos_token`` / ``add_eos_token`` flags in ``tokenizer_config.json`` are
    rewritten from the GGUF's own metadata.
    """
    tokenizer_json = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    special: dict[str, dict[str, Any]] = {}

    def special_token(token_id: int | None, type_id: int) -> dict[str, Any]:
        if token_id is None:
            raise ValueError("the GGUF asks to add a BOS/EOS token but names no id for it")
        token = spec.tokens[token_id]
        special[token] = {"id": token, "ids": [token_id], "tokens": [token]}
        return {"SpecialToken": {"id": token, "type_id": type_id}}

    def template(sequence: str, type_id: int) -> list[dict[str, Any]]:
        return ([special_token(spec.bos_id, type_id)] if spec.add_bos else []) + [
            {"Sequence": {"id": sequence, "type_id": type_id}}
        ] + ([special_token(spec.eos_id, type_id)] if spec.add_eos else [])

    single, pair = template("A", 0), template("A", 0) + template("B", 1)
    tokenizer_json["post_processor"] = {
        "type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": special,
    }
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False), encoding="utf-8")
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["add_bos_token"], config["add_eos_token"] = spec.add_bos, spec.add_eos
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def verify_tokenizer(
    tokenizer: Any,
    spec: GgufTokenizerSpec,
    expected: Mapping[str, Sequence[int]] | None = None,
) -> None:
    """Checks a converted tokenizer against the GGUF's own tokenizer facts.

    Args:
        tokenizer: A transformers tokenizer loaded from the converted folder.
        spec: What the GGUF says (vocabulary, special ids, BOS/EOS policy).
        expected: Optional ``text -> ids`` the GGUF's tokenizer gives.

    Raises:
        RuntimeError: If the vocabulary, a special id, the BOS/EOS policy or an
            expected encoding differs, naming what differs.
    """
    problems = []
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(spec.tokens))))
    # SentencePiece vocabularies spell a space "▁"; some GGUF files store a few such pieces with plain spaces.
    wrong = [i for i, (ours, theirs) in enumerate(zip(vocab, spec.tokens))
             if ours is None or ours.replace("▁", " ") != theirs.replace("▁", " ")]
    if wrong:
        i = wrong[0]
        problems.append(f"{len(wrong)} vocabulary entries differ (id {i}: {vocab[i]!r} != {spec.tokens[i]!r})")
    for name, want in (("bos_token_id", spec.bos_id), ("eos_token_id", spec.eos_id)):
        if want is not None and getattr(tokenizer, name, None) != want:
            problems.append(f"{name} is {getattr(tokenizer, name, None)}, the GGUF says {want}")
    for text in TOKENIZER_PROBES:
        ids = list(tokenizer(text).input_ids)
        if spec.add_bos != (bool(ids) and ids[0] == spec.bos_id):
            problems.append(f"{text!r} encodes to {ids[:3]}...: BOS {spec.bos_id} must be "
                            f"{'prepended' if spec.add_bos else 'absent'} (tokenizer.ggml.add_bos_token)")
        if spec.add_eos != (bool(ids) and ids[-1] == spec.eos_id):
            problems.append(f"{text!r} encodes to ...{ids[-3:]}: EOS {spec.eos_id} must be "
                            f"{'appended' if spec.add_eos else 'absent'} (tokenizer.ggml.add_eos_token)")
    for text, want_ids in (expected or {}).items():
        ids = list(tokenizer(text).input_ids)
        if ids != list(want_ids):
            problems.append(f"{text!r} encodes to {ids}, the GGUF's tokenizer gives {list(want_ids)}")
    if problems:
        raise RuntimeError("the converted tokenizer differs from the GGUF's: " + "; ".join(problems))


def _import_backends() -> tuple[Any, Any]:
    """Imports torch and transformers, checking that gguf is present too.

    Returns:
        The ``torch`` and ``transformers`` modules.

    Raises:
        ImportError: If any of torch, transformers or gguf is missing.
    """
    try:
        import gguf  # noqa: F401
        import torch
        import transformers
    except ImportError as exc:
        raise ImportError(f"{_INSTALL_HINT} ({exc})") from exc
    return torch, transformers


def _load_dequantized(gguf_path: Path, torch: Any, transformers: Any) -> tuple[Any, dict[str, Any]]:
    """Reads the config and the float32 weights of a GGUF file.

    ``from_pretrained(..., gguf_file=...)`` is used when ``accelerate`` is
    installed (transformers demands it there). Without it, the same transformers
    GGUF reader that ``from_pretrained`` uses for Llama and Gemma 3 is called
    directly on a model built from the GGUF config.

    Args:
        gguf_path: Absolute path of the ``.gguf`` file.
        torch: The torch module.
        transformers: The transformers module.

    Returns:
        The model config (without ``quantization_config``) and a state dict.
    """
    folder, name = str(gguf_path.parent), gguf_path.name
    if importlib.util.find_spec("accelerate") is not None:
        kwargs: dict[str, Any] = {"dtype": torch.float32}
        gguf_config_cls = getattr(transformers, "GgufConfig", None)
        if gguf_config_cls is not None:  # transformers>=5: never keep packed blocks
            kwargs["quantization_config"] = gguf_config_cls(dequantize=True)
        source = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, **kwargs)
        config = source.config
        state = source.state_dict()
    else:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        config = transformers.AutoConfig.from_pretrained(folder, gguf_file=name)
        skeleton = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        parsed = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=skeleton)
        state = {k: v.to(torch.float32) for k, v in parsed["tensors"].items()}
        del skeleton
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config, state


class _PlainMapNumpy:
    """numpy, except that ``memmap(...)`` returns a plain ndarray view of the map (see ``_parse_gguf_once``)."""

    def __init__(self, numpy_module: Any) -> None:
        self._numpy = numpy_module

    def memmap(self, *args: Any, **kwargs: Any) -> Any:
        return self._numpy.memmap(*args, **kwargs).view(self._numpy.ndarray)  # .base keeps the map open

    def __getattr__(self, name: str) -> Any:
        return getattr(self._numpy, name)


@contextlib.contextmanager
def _parse_gguf_once() -> Iterator[None]:
    """Lets transformers read and parse each GGUF file once instead of three times.

    transformers builds a fresh ``gguf.GGUFReader`` for the config, the
    tokenizer and the weights; on Gemma 3's vocabulary each build takes ~25 s
    of the conversion's ~140 s. Within this context the readers (read-only
    memory maps) are shared per file.
    """
    import gguf
    import gguf.gguf_reader as gguf_reader

    original = gguf.GGUFReader
    readers: dict[tuple[str, str], Any] = {}

    def shared_reader(path: Any, mode: str = "r") -> Any:
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    # The reader slices its map once per metadata item (a million slices on Gemma 3's vocabulary). Slicing an
    # ``np.memmap`` runs memmap's Python ``__getitem__``/``__array_finalize__`` each time, two thirds of the
    # parse; a plain ndarray view of the same map reads the same bytes without them.
    numpy_module = gguf_reader.np
    gguf_reader.np = _PlainMapNumpy(numpy_module)

    # transformers asks gguf for the tensor-name table once per submodule (~700 times per model, 17 ms each);
    # the table depends only on the architecture and the layer count.
    name_map = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(name_map)

    # The metadata (config and tokenizer fields: Gemma 3's 262k-token vocabulary as Python values, ~8 s per
    # parse) is parsed once too: transformers asks for it for the config and again for the tokenizer.
    import copy
    import importlib

    utils = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    load = utils.load_gguf_checkpoint
    metadata: dict[str, Any] = {}

    def load_once(path: Any, return_tensors: bool = False, **kwargs: Any) -> Any:
        if return_tensors or kwargs:
            return load(path, return_tensors=return_tensors, **kwargs)
        key = os.path.realpath(path)
        if key not in metadata:
            metadata[key] = load(path, return_tensors=False)
        return copy.deepcopy(metadata[key])  # callers may change what they get

    patched = []
    for name in ("transformers.modeling_gguf_pytorch_utils", "transformers.configuration_utils",
                 "transformers.models.auto.tokenization_auto", "transformers.tokenization_utils_base",
                 "transformers.models.auto.configuration_auto"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if getattr(module, "load_gguf_checkpoint", None) is load:
            patched.append(module)
            module.load_gguf_checkpoint = load_once
    gguf.GGUFReader = shared_reader
    try:
        yield
    finally:
        gguf.GGUFReader = original
        gguf_reader.np = numpy_module
        gguf.get_tensor_name_map = name_map
        for module in patched:
            module.load_gguf_checkpoint = load


def _make_readable(folder: Path) -> None:
    """Gives ``folder`` and its files the permissions the umask allows.

    ``tempfile.mkdtemp`` (and safetensors) create owner-only entries; a shared
    cache should be as readable as any other file the user writes.
    """
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)


def _logits(model: Any, input_ids: Any) -> Any:
    """Returns the logits of ``model`` for one batch of token ids."""
    import torch

    with torch.no_grad():
        return model(input_ids=input_ids).logits


def convert_gguf_to_hf(
    gguf_path: str | Path,
    out_dir: str | Path,
    *,
    dtype: str = "float32",
    overwrite: bool = False,
    verify: bool = True,
    expected_encodings: Mapping[str, Sequence[int]] | None = None,
    stamp: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """Converts a GGUF file into a Hugging Face checkpoint folder.

    The weights are dequantized by transformers, copied into a freshly built
    model without ``quantization_config`` and saved with the tokenizer. The
    folder is written to a temporary sibling directory and renamed into place,
    so an interrupted conversion never leaves a partial ``out_dir``. With tied
    embeddings the saved safetensors holds no ``lm_head.weight``.

    Args:
        gguf_path: Path of the ``.gguf`` file.
        out_dir: Destination folder; must not exist unless ``overwrite``.
        dtype: torch dtype name of the saved weights ("float32", "bfloat16", ...).
        overwrite: Replace an existing ``out_dir``.
        verify: Reload the saved folder and check that its logits equal those
            of the converted model bit for bit. The tokenizer is always checked
            against the GGUF's metadata (vocabulary, special ids, BOS/EOS).
        expected_encodings: ``text -> ids`` that the GGUF's own tokenizer gives;
            the saved tokenizer must reproduce them exactly.
        stamp: ``file name -> JSON object`` written into the folder with the
            rest (a cache records what the folder was built from).

    Returns:
        The resolved path of ``out_dir``.

    Raises:
        ImportError: If torch, transformers or gguf is not installed.
        FileNotFoundError: If ``gguf_path`` does not exist.
        FileExistsError: If ``out_dir`` exists and ``overwrite`` is False.
        ValueError: If ``dtype`` is not a torch floating dtype.
        RuntimeError: If the weights do not fit the model, or the saved folder
            (weights or tokenizer) fails verification.
    """
    torch, transformers = _import_backends()
    gguf_path = Path(gguf_path).expanduser().resolve()
    out_dir = Path(out_dir).expanduser().resolve()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists (pass overwrite=True to replace it)")
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
        raise ValueError(f"dtype must name a torch floating dtype, got {dtype!r}")

    tokenizer_spec = read_gguf_tokenizer_spec(gguf_path)
    with _parse_gguf_once():
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        config, state = _load_dequantized(gguf_path, torch, transformers)
    config.dtype = torch_dtype
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    tied = set()
    if getattr(config, "tie_word_embeddings", False):
        tied = {"lm_head.weight"}
    result = model.load_state_dict({k: v.to(torch_dtype) for k, v in state.items()}, strict=False)
    missing = set(result.missing_keys) - tied
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"GGUF weights do not fit {type(model).__name__}: missing {sorted(missing)}, "
            f"unexpected {sorted(result.unexpected_keys)}"
        )
    del state
    model.tie_weights()
    model.eval()

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _write_special_token_policy(tmp, tokenizer_spec)
        for file_name, content in (stamp or {}).items():
            (tmp / file_name).write_text(json.dumps(content, indent=2) + "\n")
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp))
        verify_tokenizer(tokenizer, tokenizer_spec, expected_encodings)
        _make_readable(tmp)
        saved_config = json.loads((tmp / "config.json").read_text())
        if "quantization_config" in saved_config:
            raise RuntimeError("the saved config.json still holds a quantization_config")
        if verify:
            ids = tokenizer(_VERIFY_TEXT, return_tensors="pt").input_ids
            expected = _logits(model, ids)
            reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch_dtype)
            reloaded.eval()
            if not torch.equal(expected, _logits(reloaded, ids)):
                raise RuntimeError(f"reloading {tmp} does not reproduce the converted logits")
            del reloaded
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / out_dir.name)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
