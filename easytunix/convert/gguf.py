"""Convert a GGUF checkpoint into an ordinary Hugging Face folder.

transformers reads GGUF files (dequantizing them) but refuses to
``save_pretrained`` such a model. This module rebuilds a plain model from the
config, copies the dequantized weights in, and saves a regular folder
(``config.json``, ``model.safetensors``, tokenizer files) atomically.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

_INSTALL_HINT = (
    "Converting GGUF checkpoints needs torch, transformers and gguf: "
    "pip install 'easytunix[test]' (or: pip install torch==2.13.0 transformers gguf)"
)

_VERIFY_TEXT = "The quick brown fox jumps over the lazy dog. 1 2 3"


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
            of the converted model bit for bit.

    Returns:
        The resolved path of ``out_dir``.

    Raises:
        ImportError: If torch, transformers or gguf is not installed.
        FileNotFoundError: If ``gguf_path`` does not exist.
        FileExistsError: If ``out_dir`` exists and ``overwrite`` is False.
        ValueError: If ``dtype`` is not a torch floating dtype.
        RuntimeError: If the weights do not fit the model or the saved folder
            fails verification.
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

    tokenizer = transformers.AutoTokenizer.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name
    )
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
