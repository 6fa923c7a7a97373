"""Attention whose memory grows linearly in the sequence length.

The dense attention in :mod:`easytunix.layers.attention` builds float32 scores
and probabilities [B, K, G, T, S] (its backward pass recomputes them rather than
keeping them, but each layer's call still holds the whole map). Here the mask is
given in factored form (key padding, causality, sliding window) and never built
as a [T, S] array:

* :func:`blockwise_attention` loops over query blocks and, inside each, over
  key blocks with an online softmax (running max / running sum, float32
  accumulation). The query-block body is wrapped in ``jax.checkpoint``, so the
  backward pass keeps only the inputs of each query block and recomputes its
  scores (and, by default, each key step too); the train step's temporary
  memory then grows linearly in T instead of as T * S.
* :func:`dense_attention` is the current layer's math on the factored mask
  (materialises [T, S]; fine for short sequences and a reference).
* :func:`attention` picks an implementation: cuDNN flash attention through
  ``jax.nn.dot_product_attention`` on NVIDIA GPUs where the case is supported,
  else the blockwise path. CPU never tries cuDNN. cuDNN takes key padding as
  lengths only; a ``key_valid`` mask is checked on the device: a batch whose
  rows are right-padded (every training batch the library builds) runs
  through cuDNN, any other (left padding) through the dense or blockwise path,
  inside one ``lax.cond``.

Layouts follow the layer: q [B, T, K, G, H] (K key/value heads, G query heads
per key/value head), k and v [B, S, K, H]; the output is [B, T, K, G, H].

Masking semantics (shared by every implementation here): query row i sits at
slot ``q_offset + i``; it may see key slot j when ``key_valid[b, j]``, and,
if ``causal``, ``j <= q_offset + i``, and, with a ``sliding_window`` W,
``q_offset + i - j < W``. Soft-capping ``tanh(s / c) * c`` is applied after the
scale and before masking. A row that sees no key gets the plain average of v
over all S keys, as the dense layer does (it fills masked logits with
``finfo.min``, so its softmax is uniform there).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

Implementation = Literal["auto", "xla", "blockwise", "cudnn"]
IMPLEMENTATIONS = ("auto", "xla", "blockwise", "cudnn")
# "auto" off cuDNN: dense scores up to this many keys (a [T, S] float32 map of at most 4 MiB per head).
DENSE_MAX_KEYS = 1024

_NEG = float(np.finfo(np.float32).min)  # the dense layer's fill for masked logits
_CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _check_shapes(q: jax.Array, k: jax.Array, v: jax.Array) -> None:
  if q.ndim != 5 or k.ndim != 4 or v.shape != k.shape:
    raise ValueError(
        f"Expected q [B, T, K, G, H] and k, v [B, S, K, H]; got q {q.shape}, k {k.shape}, v {v.shape}."
    )
  b, _, nk, _, h = q.shape
  if k.shape[0] != b or k.shape[2] != nk or k.shape[3] != h:
    raise ValueError(f"q {q.shape} and k {k.shape} disagree on batch, kv heads or head width.")


def _query_offsets(q_offset: jax.Array | int, batch: int) -> jax.Array:
  """The slot of query row 0, per batch row: int32 [B]."""
  return jnp.broadcast_to(jnp.asarray(q_offset, jnp.int32), (batch,))


def _key_ok(key_valid: jax.Array | None, batch: int, length: int) -> jax.Array:
  if key_valid is None:
    return jnp.ones((batch, length), jnp.bool_)
  if key_valid.shape != (batch, length):
    raise ValueError(f"key_valid must be [B, S] = {(batch, length)}, got {key_valid.shape}.")
  return key_valid.astype(jnp.bool_)


def _allowed(
    q_pos: jax.Array, k_pos: jax.Array, k_ok: jax.Array, causal: bool, sliding_window: int | None
) -> jax.Array:
  """Boolean [B, tq, sk] from query slots [B, tq], key slots [sk] and key validity [B, sk]."""
  allowed = k_ok[:, None, :]
  diff = q_pos[:, :, None] - k_pos[None, None, :]
  if causal:
    allowed = allowed & (diff >= 0)
  if sliding_window is not None:
    allowed = allowed & (diff < sliding_window)
  return allowed


def _scores(q: jax.Array, k: jax.Array, scale: float, softcap: float | None) -> jax.Array:
  """Float32 logits [B, K, G, tq, sk]: q.k, scaled, then soft-capped."""
  s = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32)
  s = s * scale
  if softcap is not None:
    s = jnp.tanh(s / softcap) * softcap
  return s


def dense_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float,
    key_valid: jax.Array | None = None,
    causal: bool = True,
    q_offset: jax.Array | int = 0,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> jax.Array:
  """Attention with materialised [B, K, G, T, S] scores (the layer's current math).

  Same arguments and result as :func:`blockwise_attention`; memory is quadratic.
  """
  _check_shapes(q, k, v)
  b, t = q.shape[:2]
  s = k.shape[1]
  q_pos = _query_offsets(q_offset, b)[:, None] + jnp.arange(t, dtype=jnp.int32)
  allowed = _allowed(q_pos, jnp.arange(s, dtype=jnp.int32), _key_ok(key_valid, b, s), causal, sliding_window)
  scores = jnp.where(allowed[:, None, None], _scores(q, k, scale, softcap), _NEG)
  probs = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum("bkgts,bskh->btkgh", probs.astype(v.dtype), v)
  return out.astype(q.dtype)


def blockwise_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float,
    key_valid: jax.Array | None = None,
    causal: bool = True,
    q_offset: jax.Array | int = 0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    block_q: int = 512,
    block_k: int = 512,
    remat_key_blocks: bool = True,
) -> jax.Array:
  """Memory-efficient attention: online softmax over key blocks, per query block.

  Each query block is recomputed in the backward pass (``jax.checkpoint``), so
  the gradient keeps O(T) residuals plus one query block's working set.

  Args:
    q: queries [B, T, K, G, H].
    k: keys [B, S, K, H].
    v: values [B, S, K, H].
    scale: multiplies q.k before the soft-cap.
    key_valid: bool [B, S], False for padding keys (None: all valid).
    causal: query slot ``q_offset + i`` sees only key slots ``j <= q_offset + i``.
    q_offset: slot of query row 0, an int or int32 scalar/[B] array (the cache
      index when T new queries are prefilled into an S-slot cache).
    sliding_window: a query sees keys fewer than this many slots back.
    softcap: ``tanh(s / c) * c`` on the scaled logits (Gemma 2/3).
    block_q: query rows per block (clamped to T); T need not be a multiple.
    block_k: keys per block (clamped to S); S need not be a multiple.
    remat_key_blocks: also recompute each key block's scores in the backward
      pass, keeping only the running (max, sum, accumulator) per key block
      instead of the [block_q, S] probabilities of the query block being
      differentiated: one more score computation, several times less memory
      when S * 3 >> (S / block_k) * H.

  Returns:
    [B, T, K, G, H] in q's dtype. A row with no visible key gets the mean of v
    over the S keys, as the dense layer does.
  """
  _check_shapes(q, k, v)
  b, t, nk, g, h = q.shape
  s = k.shape[1]
  if block_q < 1 or block_k < 1:
    raise ValueError(f"block sizes must be positive, got block_q={block_q}, block_k={block_k}.")
  bq, bk = min(block_q, t), min(block_k, s)
  nq, nkb = -(-t // bq), -(-s // bk)
  q_off = _query_offsets(q_offset, b)
  k_ok = _key_ok(key_valid, b, s)
  v_mean = jnp.mean(v.astype(jnp.float32), axis=1)  # [B, K, H], for rows that see nothing

  # Pad to whole blocks; padded keys are invalid, padded query rows are dropped.
  q_p = jnp.pad(q, ((0, 0), (0, nq * bq - t), (0, 0), (0, 0), (0, 0)))
  k_p = jnp.pad(k, ((0, 0), (0, nkb * bk - s), (0, 0), (0, 0)))
  v_p = jnp.pad(v, ((0, 0), (0, nkb * bk - s), (0, 0), (0, 0)))
  ok_p = jnp.pad(k_ok, ((0, 0), (0, nkb * bk - s)))
  q_blocks = q_p.reshape(b, nq, bq, nk, g, h).swapaxes(0, 1)  # [nq, B, bq, K, G, H]
  k_blocks = k_p.reshape(b, nkb, bk, nk, h).swapaxes(0, 1)  # [nkb, B, bk, K, H]
  v_blocks = v_p.reshape(b, nkb, bk, nk, h).swapaxes(0, 1)
  ok_blocks = ok_p.reshape(b, nkb, bk).swapaxes(0, 1)  # [nkb, B, bk]
  q_lo, q_hi = jnp.min(q_off), jnp.max(q_off)
  may_skip = causal or sliding_window is not None

  def query_block(q_blk: jax.Array, qi: jax.Array) -> jax.Array:
    q_pos = q_off[:, None] + qi * bq + jnp.arange(bq, dtype=jnp.int32)  # [B, bq]

    def update(carry, k_blk, v_blk, ok_blk, ki):
      m, l, acc = carry
      k_pos = ki * bk + jnp.arange(bk, dtype=jnp.int32)
      allowed = _allowed(q_pos, k_pos, ok_blk, causal, sliding_window)[:, None, None]
      scores = jnp.where(allowed, _scores(q_blk, k_blk, scale, softcap), _NEG)
      # The result does not depend on the running max, so no gradient through it.
      m_new = jax.lax.stop_gradient(jnp.maximum(m, scores.max(axis=-1)))
      p = jnp.where(allowed, jnp.exp(scores - m_new[..., None]), 0.0)
      corr = jnp.exp(m - m_new)
      pv = jnp.einsum("bkgts,bskh->bkgth", p.astype(v_blk.dtype), v_blk, preferred_element_type=jnp.float32)
      return m_new, l * corr + p.sum(axis=-1), acc * corr[..., None] + pv

    if remat_key_blocks:
      update = jax.checkpoint(update, prevent_cse=False)

    def key_step(carry, xs):
      k_blk, v_blk, ok_blk, ki = xs
      if not may_skip:
        return update(carry, k_blk, v_blk, ok_blk, ki), None
      # Skip key blocks that causality / the window hide from the whole query block.
      visible = jnp.bool_(True)
      if causal:
        visible &= ki * bk <= q_hi + qi * bq + bq - 1
      if sliding_window is not None:
        visible &= q_lo + qi * bq - (ki * bk + bk - 1) < sliding_window
      carry = jax.lax.cond(visible, lambda c: update(c, k_blk, v_blk, ok_blk, ki), lambda c: c, carry)
      return carry, None

    init = (
        jnp.full((b, nk, g, bq), _NEG, jnp.float32),
        jnp.zeros((b, nk, g, bq), jnp.float32),
        jnp.zeros((b, nk, g, bq, h), jnp.float32),
    )
    xs = (k_blocks, v_blocks, ok_blocks, jnp.arange(nkb, dtype=jnp.int32))
    (_, l, acc), _ = jax.lax.scan(key_step, init, xs)
    seen = l > 0
    out = acc / jnp.where(seen, l, 1.0)[..., None]
    out = jnp.where(seen[..., None], out, v_mean[:, :, None, None, :])
    return out.transpose(0, 3, 1, 2, 4).astype(q.dtype)  # [B, bq, K, G, H]

  # Recompute each query block's scores in the backward pass instead of storing them.
  query_block = jax.checkpoint(query_block, prevent_cse=False)

  def query_step(_, xs):
    return None, query_block(*xs)

  _, out = jax.lax.scan(query_step, None, (q_blocks, jnp.arange(nq, dtype=jnp.int32)))
  return out.swapaxes(0, 1).reshape(b, nq * bq, nk, g, h)[:, :t]


def _is_nvidia_gpu() -> bool:
  """Whether the default backend is a CUDA GPU (not ROCm, not CPU/TPU)."""
  if jax.default_backend() != "gpu":
    return False
  device = jax.devices()[0]
  if "nvidia" in device.device_kind.lower():
    return True
  try:
    return "cuda" in device.client.platform_version.lower()
  except Exception:  # noqa: BLE001 - an unknown client: do not risk cuDNN
    return False


def cudnn_unsupported_reason(
    q: jax.Array,
    k: jax.Array,
    *,
    key_valid: jax.Array | None = None,
    causal: bool = True,
    q_offset: jax.Array | int = 0,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> str | None:
  """Why cuDNN flash attention cannot serve this case (None when it can).

  Checks the case only, not the platform. Key padding is no obstacle:
  ``kv_lengths`` maps onto cuDNN's, and a ``key_valid`` mask is served by
  cuDNN when, at run time, every row is right-padded (:func:`attention`).
  """
  h = q.shape[-1]
  if softcap is not None:
    return "cuDNN attention has no logit soft-capping"
  if jnp.dtype(q.dtype) not in _CUDNN_DTYPES or k.dtype != q.dtype:
    return f"cuDNN attention needs bf16/fp16 q, k, v (got {q.dtype}, {k.dtype})"
  if h % 8 or h > 256:
    return f"cuDNN attention needs a head width that is a multiple of 8 and at most 256 (got {h})"
  if causal and not (isinstance(q_offset, (int, np.integer)) and q_offset == 0):
    return "cuDNN causal masks are aligned at slot 0: q_offset must be the static int 0"
  if sliding_window is not None and not causal:
    return "cuDNN sliding windows need a causal mask"
  return None


def select_implementation(
    q: jax.Array,
    k: jax.Array,
    *,
    implementation: Implementation = "auto",
    key_valid: jax.Array | None = None,
    causal: bool = True,
    q_offset: jax.Array | int = 0,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> str:
  """Resolves ``implementation`` to "xla", "blockwise" or "cudnn".

  "auto" picks "cudnn" on an NVIDIA GPU when :func:`cudnn_unsupported_reason`
  finds nothing against it; otherwise "xla" (dense) up to ``DENSE_MAX_KEYS``
  keys, where the [T, S] scores are small and one fused pass is fastest, and
  "blockwise" beyond, where memory must stay linear in the sequence. Raises
  ValueError for an unknown name, or for "cudnn" off an NVIDIA GPU or on an
  unsupported case.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}.")
  if implementation in ("xla", "blockwise"):
    return implementation
  reason = cudnn_unsupported_reason(
      q, k, key_valid=key_valid, causal=causal, q_offset=q_offset, sliding_window=sliding_window, softcap=softcap
  )
  if implementation == "cudnn":
    if not _is_nvidia_gpu():
      raise ValueError(
          f"implementation='cudnn' needs an NVIDIA GPU, but the default backend is {jax.default_backend()!r}."
      )
    if reason is not None:
      raise ValueError(f"implementation='cudnn' cannot serve this case: {reason}.")
    return "cudnn"
  if _is_nvidia_gpu() and reason is None:
    return "cudnn"
  return "xla" if k.shape[1] <= DENSE_MAX_KEYS else "blockwise"


def _jax_nn_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float,
    kv_lengths: jax.Array | None,
    causal: bool,
    sliding_window: int | None,
    implementation: Literal["xla", "cudnn"],
) -> jax.Array:
  """Our arguments mapped onto ``jax.nn.dot_product_attention`` (q_offset 0, no soft-cap)."""
  b, t, nk, g, h = q.shape
  out = jax.nn.dot_product_attention(
      q.reshape(b, t, nk * g, h),  # head n = k * G + g: jax's grouping for GQA
      k,
      v,
      scale=scale,
      is_causal=causal,
      key_value_seq_lengths=None if kv_lengths is None else jnp.asarray(kv_lengths, jnp.int32),
      # jax's (left, right) window sees i - left <= j <= i + right: ours is i - j < W.
      local_window_size=None if sliding_window is None else (sliding_window - 1, 0),
      implementation=implementation,
  )
  return out.reshape(q.shape)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float,
    key_valid: jax.Array | None = None,
    kv_lengths: jax.Array | None = None,
    causal: bool = True,
    q_offset: jax.Array | int = 0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    implementation: Implementation = "auto",
    block_q: int = 512,
    block_k: int = 512,
) -> jax.Array:
  """Attention through the implementation :func:`select_implementation` picks.

  Args:
    q, k, v, scale, key_valid, causal, q_offset, sliding_window, softcap,
      block_q, block_k: as in :func:`blockwise_attention`.
    kv_lengths: int [B]; keys at slots >= length are padding (right padding).
      Combined with ``key_valid`` when both are given. Both reach cuDNN:
      lengths as they are, a ``key_valid`` mask after a check on the device
      that its rows are right-padded (else the dense or blockwise path runs).
    implementation: "auto", "xla" (dense, materialised scores), "blockwise"
      or "cudnn" (NVIDIA GPUs, bf16/fp16, no soft-cap; see
      :func:`cudnn_unsupported_reason`).

  Returns:
    [B, T, K, G, H] in q's dtype. Under cuDNN a fully padded row (length 0)
    attends to its first key, the other paths give the mean of v there: what a
    row that sees no key holds is not defined (a loss masks it out).
  """
  impl = select_implementation(
      q,
      k,
      implementation=implementation,
      key_valid=key_valid,
      causal=causal,
      q_offset=q_offset,
      sliding_window=sliding_window,
      softcap=softcap,
  )
  lengths_only = key_valid is None  # cuDNN then takes kv_lengths (or no padding) as they are
  if kv_lengths is not None:
    in_length = jnp.arange(k.shape[1])[None, :] < jnp.asarray(kv_lengths)[:, None]
    key_valid = in_length if key_valid is None else key_valid & in_length
  kw = dict(
      scale=scale, key_valid=key_valid, causal=causal, q_offset=q_offset, sliding_window=sliding_window,
      softcap=softcap,
  )
  if impl == "cudnn":
    fallback = "xla" if k.shape[1] <= DENSE_MAX_KEYS else "blockwise"

    def cudnn(q, k, v, lengths):
      return _jax_nn_attention(
          q, k, v, scale=scale, kv_lengths=lengths, causal=causal, sliding_window=sliding_window,
          implementation="cudnn",
      )

    def other(q, k, v, _):
      return _fallback(q, k, v, fallback, block_q, block_k, kw)

    try:
      if lengths_only:
        return cudnn(q, k, v, kv_lengths)
      lengths, right_padded = _as_lengths(key_valid)
      # A fully padded row sees no key on every path; cuDNN's kernel wants at least one.
      return jax.lax.cond(right_padded, cudnn, other, q, k, v, jnp.maximum(lengths, 1))
    except (NotImplementedError, ValueError, RuntimeError):
      if implementation == "cudnn":
        raise
      # "auto": a case this cuDNN / jax version turns down at trace time.
      impl = fallback
  return _fallback(q, k, v, impl, block_q, block_k, kw)


def _as_lengths(key_valid: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``key_valid`` [B, S] as lengths [B], and whether every row is right padding (keys ``0 .. len - 1``)."""
  lengths = jnp.sum(key_valid, axis=-1, dtype=jnp.int32)
  prefix = jnp.arange(key_valid.shape[1])[None, :] < lengths[:, None]
  return lengths, jnp.all(key_valid == prefix)


def _fallback(q, k, v, impl: str, block_q: int, block_k: int, kw: dict) -> jax.Array:
  if impl == "xla":
    return dense_attention(q, k, v, **kw)
  return blockwise_attention(q, k, v, block_q=block_q, block_k=block_k, **kw)
