"""Bad checkpoints and configs fail early with messages that say what was expected."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from easytunix.models import load_model
from easytunix.models.llama3 import ModelConfig


def _copy(folder, tmp_path):
  dst = tmp_path / "ckpt"
  shutil.copytree(folder, dst)
  return dst


def test_missing_folder(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_model(tmp_path / "nope")


def test_folder_without_config(tmp_path):
  with pytest.raises(FileNotFoundError, match="has no config.json"):
    load_model(tmp_path)


def test_folder_without_weights(hf_tiny, tmp_path):
  folder, _ = hf_tiny("llama3")
  dst = tmp_path / "w"
  dst.mkdir()
  shutil.copy(folder / "config.json", dst / "config.json")
  with pytest.raises(FileNotFoundError, match=r"No \*\.safetensors files"):
    load_model(dst)


def test_missing_tensor_is_named(hf_tiny, tmp_path):
  folder, _ = hf_tiny("llama3")
  dst = _copy(folder, tmp_path)
  tensors = load_file(dst / "model.safetensors")
  del tensors["model.layers.1.self_attn.k_proj.weight"]
  save_file(tensors, dst / "model.safetensors")
  with pytest.raises(ValueError, match=r"lacks 1 tensor.*model\.layers\.1\.self_attn\.k_proj\.weight -> layers\.1\.attn\.k_proj\.kernel"):
    load_model(dst)


def test_shape_mismatch_names_tensor_and_expectation(hf_tiny, tmp_path):
  folder, _ = hf_tiny("qwen3")
  dst = _copy(folder, tmp_path)
  tensors = load_file(dst / "model.safetensors")
  tensors["model.layers.0.mlp.up_proj.weight"] = np.zeros((96, 64), np.float32)
  save_file(tensors, dst / "model.safetensors")
  with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj\.weight .* shape \(96, 64\).*expects \(64, 128\)"):
    load_model(dst)


def test_unknown_model_type(hf_tiny, tmp_path):
  folder, _ = hf_tiny("llama3")
  dst = _copy(folder, tmp_path)
  config = json.loads((dst / "config.json").read_text())
  config["model_type"] = "mamba"
  (dst / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match=r"Unsupported model_type 'mamba'.*supports \["):
    load_model(dst)


def test_config_validation_messages():
  with pytest.raises(ValueError, match=r"num_heads \(6\) must be a multiple of num_kv_heads \(4\)"):
    ModelConfig.tiny(num_heads=6, num_kv_heads=4)
  with pytest.raises(ValueError, match="layer_types has 1 entries but num_layers is 2"):
    ModelConfig.tiny(layer_types=("full_attention",))
  with pytest.raises(ValueError, match="need sliding_window"):
    ModelConfig.tiny(layer_types=("sliding_attention", "full_attention"))
  with pytest.raises(ValueError, match="hidden_size must be a positive int"):
    ModelConfig.tiny(hidden_size=0)
