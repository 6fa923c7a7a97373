"""A small zero-copy safetensors reader (memory-mapped numpy views, bf16 included).

The ``safetensors`` package's numpy backend cannot return bfloat16 arrays; this
reader maps the file once and hands out views, so loading a checkpoint keeps
host memory near one copy of the weights.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class SafetensorsReader:
  """Reads tensors from one ``.safetensors`` file as numpy views."""

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)
    size = self.path.stat().st_size
    if size < 8:
      raise ValueError(
          f"{self.path} is not a valid safetensors file: it is {size} bytes long (empty or truncated). "
          "Copy or download it again."
      )
    with open(self.path, "rb") as f:
      self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
      (header_len,) = struct.unpack("<Q", self._mmap[:8])
      if 8 + header_len > size:
        raise ValueError(f"its header claims {header_len} bytes but the file has {size}")
      header = json.loads(self._mmap[8 : 8 + header_len])
      if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    except Exception as e:  # noqa: BLE001
      self._mmap.close()
      raise ValueError(f"{self.path} is not a valid safetensors file ({e}); it may be truncated or damaged.") from e
    self.metadata = header.pop("__metadata__", {}) or {}
    self._entries = header
    self._data_start = 8 + header_len
    needed = max((int(e["data_offsets"][1]) for e in header.values() if isinstance(e, dict)), default=0)
    if self._data_start + needed > size:
      self._mmap.close()
      raise ValueError(
          f"{self.path} is truncated: its header describes {needed} bytes of tensor data but the file holds "
          f"{size - self._data_start}. Copy or download it again."
      )

  def keys(self) -> list[str]:
    return list(self._entries)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._entries[name]["shape"])

  def get(self, name: str) -> np.ndarray:
    entry = self._entries[name]
    dtype = _DTYPES.get(entry["dtype"])
    if dtype is None:
      raise ValueError(f"Tensor {name} in {self.path} has unsupported dtype {entry['dtype']}.")
    start, end = entry["data_offsets"]
    buf = np.frombuffer(self._mmap, dtype=np.uint8, count=end - start, offset=self._data_start + start)
    return buf.view(dtype).reshape(entry["shape"])

  def release(self, name: str) -> None:
    """Drops the pages of tensor ``name`` from memory (they are re-read if used again)."""
    start, end = self._entries[name]["data_offsets"]
    page = mmap.PAGESIZE
    lo = (self._data_start + start) // page * page
    hi = self._data_start + end
    if hasattr(self._mmap, "madvise") and hasattr(mmap, "MADV_DONTNEED") and hi > lo:
      self._mmap.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

  def close(self) -> None:
    try:
      self._mmap.close()
    except BufferError:
      pass  # views still alive; the map is released when they are

  def __enter__(self) -> "SafetensorsReader":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def current_umask() -> int:
  """The process's umask (read from /proc where it can be, without changing it)."""
  try:
    for line in Path("/proc/self/status").read_text().splitlines():
      if line.startswith("Umask:"):
        return int(line.split()[1], 8)
  except OSError:
    pass
  mask = os.umask(0)
  os.umask(mask)
  return mask


def write_safetensors(tensors: dict[str, np.ndarray], path: str | os.PathLike,
                      metadata: dict[str, str] | None = None) -> Path:
  """Writes ``tensors`` to ``path`` with the permissions the umask gives every other file.

  (The ``safetensors`` package creates owner-only files.)
  """
  from safetensors.numpy import save_file

  path = Path(path)
  save_file(tensors, str(path), metadata=metadata)
  path.chmod(0o666 & ~current_umask())
  return path


# LoRA adapters that ``save_to_preset`` keeps beside the base weights: not part of the checkpoint.
ADAPTER_FILE = "lora_adapters.safetensors"


def checkpoint_files(folder: str | os.PathLike) -> list[Path]:
  """The safetensors shards of a checkpoint folder (index file honoured)."""
  folder = Path(folder)
  if not folder.is_dir():
    raise FileNotFoundError(f"Checkpoint folder {folder} does not exist or is not a directory.")
  index = folder / "model.safetensors.index.json"
  if index.exists():
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f"{index} is not a valid safetensors index (a JSON object with a 'weight_map'): {e}") from e
    files = [folder / name for name in sorted(set(weight_map.values()))]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
      raise FileNotFoundError(f"{index} lists shards that are missing: {missing}.")
    return files
  files = sorted(f for f in folder.glob("*.safetensors") if f.name != ADAPTER_FILE)
  if not files:
    raise FileNotFoundError(
        f"No *.safetensors files (nor model.safetensors.index.json) in {folder}. "
        "Point to a Hugging Face model folder saved with safetensors."
    )
  return files
