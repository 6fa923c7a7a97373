"""Grouped-query attention with rotary positions, optional q/k-norm, sliding window,
logit soft-capping and a KV cache."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from easytunix.layers.blockwise_attention import _NEG, IMPLEMENTATIONS, select_implementation
from easytunix.layers.blockwise_attention import attention as attention_kernel
from easytunix.layers.cache import LayerCache, RaggedLayout, make_causal_mask
from easytunix.layers.linear import Linear
from easytunix.layers.norm import RMSNorm
from easytunix.layers.rope import RopeConfig, apply_rope, rope_inv_freq


# Intermediates the shared layers can sow (as nnx.Intermediate) when a `sow_intermediates` request asks.
ATTENTION_WEIGHTS = "attention_weights"  # Attention: softmax weights [B, heads, T, S]
LAYER_OUTPUT = "layer_output"  # a layer's output (the decoder block's hidden state [B, T, D])

SowRequest = Callable[[nnx.Module, str], bool]
"""``request(module, name) -> bool``: whether ``module`` should sow the intermediate ``name`` now."""

_SOW_REQUEST: contextvars.ContextVar[SowRequest | None] = contextvars.ContextVar("easytunix_sow_request", default=None)


@contextlib.contextmanager
def sow_intermediates(request: SowRequest) -> Iterator[None]:
  """Within the block, layers sow each intermediate they declare when ``request(module, name)``.

  Use it inside ``nnx.capture(..., nnx.Intermediate)``, which collects the sown values. The
  computation is unchanged, so outputs are identical with and without a request.
  """
  token = _SOW_REQUEST.set(request)
  try:
    yield
  finally:
    _SOW_REQUEST.reset(token)


def should_sow(module: nnx.Module, name: str) -> bool:
  """Whether the active :func:`sow_intermediates` request asks ``module`` for ``name`` (False outside one)."""
  request = _SOW_REQUEST.get()
  return request is not None and bool(request(module, name))


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """Static shape and behaviour of one attention layer.

  Attributes:
    num_heads: query heads.
    num_kv_heads: key/value heads (divides ``num_heads``; 1 is multi-query).
    head_dim: width of each head.
    rope: rotary frequencies for this layer.
    query_scale: multiplies q.k (default ``head_dim ** -0.5``).
    sliding_window: a query attends to keys fewer than this many slots back.
    qk_norm: RMS-normalise each query/key head before the rotation.
    qk_norm_unit_offset: Gemma's (1 + w) form for that norm.
    norm_eps: epsilon of the q/k norms.
    softcap: ``tanh(s / c) * c`` on the attention logits.
    use_bias: biases on the q/k/v projections.
    implementation: "auto", "xla" (dense scores), "blockwise" (memory linear in
      the sequence) or "cudnn" (NVIDIA GPUs); see
      :func:`easytunix.layers.blockwise_attention.select_implementation`. It
      applies to causal masks given as [B, S] key validity; a full [B, T, S]
      mask (decoding with a cache) and attention-map capture use dense scores.
  """

  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope: RopeConfig = RopeConfig()
  query_scale: float | None = None
  sliding_window: int | None = None
  qk_norm: bool = False
  qk_norm_unit_offset: bool = False
  norm_eps: float = 1e-6
  softcap: float | None = None
  use_bias: bool = False
  implementation: str = "auto"

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})."
      )
    if self.head_dim % 2:
      raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}.")
    if self.implementation not in IMPLEMENTATIONS:
      raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {self.implementation!r}.")

  @property
  def scale(self) -> float:
    return self.query_scale if self.query_scale is not None else self.head_dim**-0.5


class Attention(nnx.Module):
  """Multi-head attention with grouped keys/values.

  Call with ``x`` [B, T, D], ``positions`` [B, T], a boolean ``mask`` [B, T, S]
  (S = T without a cache, the cache length with one) and optionally a layer
  cache plus the slot where the T new keys go. Returns the output and the
  updated layer cache (None without a cache).

  It sows its softmax weights as ``"attention_weights"`` when a
  :func:`sow_intermediates` request asks for them, or always while
  ``capture_weights`` is True.
  """

  sown_intermediates: ClassVar[tuple[str, ...]] = (ATTENTION_WEIGHTS,)

  def __init__(
      self,
      hidden_size: int,
      config: AttentionConfig,
      *,
      dtype: jnp.dtype = jnp.float32,
      param_dtype: jnp.dtype = jnp.float32,
      shd=None,
      rngs: nnx.Rngs,
  ):
    from easytunix.layers.sharding import ShardingConfig

    shd = shd or ShardingConfig.none()
    self.config = config
    self.dtype = dtype
    c = config
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q_proj = Linear(hidden_size, c.num_heads * c.head_dim, use_bias=c.use_bias, partition=shd.attn_in, **kw)
    self.k_proj = Linear(hidden_size, c.num_kv_heads * c.head_dim, use_bias=c.use_bias, partition=shd.attn_in, **kw)
    self.v_proj = Linear(hidden_size, c.num_kv_heads * c.head_dim, use_bias=c.use_bias, partition=shd.attn_in, **kw)
    self.o_proj = Linear(c.num_heads * c.head_dim, hidden_size, partition=shd.attn_out, **kw)
    if c.qk_norm:
      norm_kw = dict(eps=c.norm_eps, unit_offset=c.qk_norm_unit_offset, param_dtype=param_dtype, partition=shd.norm)
      self.q_norm = RMSNorm(c.head_dim, **norm_kw)
      self.k_norm = RMSNorm(c.head_dim, **norm_kw)
    else:
      self.q_norm = None
      self.k_norm = None
    # True: sow the attention weights on every call (a sow_intermediates request does it per call).
    self.capture_weights = False

  def __call__(
      self,
      x: jax.Array,
      positions: jax.Array,
      mask: jax.Array | RaggedLayout,
      cache: LayerCache | None = None,
      cache_index: jax.Array | int | None = None,
  ) -> tuple[jax.Array, LayerCache | None]:
    q, k, v = self._project(x, positions)
    if isinstance(mask, RaggedLayout):
      # Tokens end to end [1, N]: attention runs on the prompts' left-padded rows, written from slot 0
      # (the padding slots' keys and values zero, as a padded prefill's gathered cache has them).
      q, k, v = (mask.to_rows(a) for a in (q, k, v))
      k, v = (jnp.where(mask.valid[:, :, None, None], a, jnp.zeros((), a.dtype)) for a in (k, v))
      new_cache = None if cache is None else self._write(cache, k, v, jnp.zeros((), jnp.int32))
      out, _ = self._attend(q, k, v, mask.valid, None, None)
      return self.o_proj(mask.to_tokens(out)), new_cache
    out, new_cache = self._attend(q, k, v, mask, cache, cache_index)
    return self.o_proj(out), new_cache

  def _project(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Queries [B, T, heads, head_dim] and keys and values [B, T, kv_heads, head_dim], normed and rotated."""
    c = self.config
    b, t, _ = x.shape
    q = self.q_proj(x).reshape(b, t, c.num_heads, c.head_dim)
    k = self.k_proj(x).reshape(b, t, c.num_kv_heads, c.head_dim)
    v = self.v_proj(x).reshape(b, t, c.num_kv_heads, c.head_dim)
    if self.q_norm is not None:
      q = self.q_norm(q)
      k = self.k_norm(k)
    inv_freq = rope_inv_freq(c.head_dim, c.rope)
    q = apply_rope(q, positions, inv_freq)
    k = apply_rope(k, positions, inv_freq)
    return q, k, v

  @staticmethod
  def _write(cache: LayerCache, k: jax.Array, v: jax.Array, start: jax.Array) -> LayerCache:
    """The cache with keys and values [B, T, K, H] written at slots ``start..start+T-1``.

    The cache is heads-major (keys [B, K, H, S], values [B, K, S, H]): both attention products
    read it as plain batched matmuls over (b, k), the keys with the slots as columns. In the
    [B, S, K, H] order every decode step would first copy each layer's whole cache into that
    layout (a tenth of a float32 decode step on CPU).
    """
    zero = jnp.zeros((), jnp.int32)
    return LayerCache(
        jax.lax.dynamic_update_slice(cache.k, k.transpose(0, 2, 3, 1).astype(cache.k.dtype), (zero, zero, zero, start)),
        jax.lax.dynamic_update_slice(cache.v, v.transpose(0, 2, 1, 3).astype(cache.v.dtype), (zero, zero, start, zero)),
    )

  def _attend(self, q, k, v, mask, cache, cache_index) -> tuple[jax.Array, LayerCache | None]:
    """``o_proj``'s input [B, T, heads * head_dim] from projected q, k, v, and the updated cache."""
    c = self.config
    b, t = q.shape[:2]
    start = jnp.asarray(0 if cache_index is None else cache_index, jnp.int32)
    new_cache = None
    if cache is not None:
      new_cache = self._write(cache, k, v, start)
      k_cols, v_heads = new_cache.k.astype(self.dtype), new_cache.v.astype(self.dtype)
      k_heads = None
    else:
      k_cols, k_heads, v_heads = None, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    s = v_heads.shape[2]

    groups = c.num_heads // c.num_kv_heads
    qg = q.reshape(b, t, c.num_kv_heads, groups, c.head_dim)
    capture = should_sow(self, ATTENTION_WEIGHTS) or self.capture_weights
    if mask.ndim == 2 and not capture:
      # Causal over the valid keys [B, S]: the mask stays factored, so the blockwise and cuDNN
      # paths never build a [T, S] map. Dense ("xla") falls through to the code below.
      k_all = k if cache is None else k_cols.transpose(0, 3, 1, 2)
      factored = dict(key_valid=mask.astype(jnp.bool_), causal=True, q_offset=0 if cache is None else start,
                      sliding_window=c.sliding_window, softcap=c.softcap)
      chosen = select_implementation(qg, k_all, implementation=c.implementation, **factored)
      if chosen != "xla":
        v_all = v if cache is None else v_heads.transpose(0, 2, 1, 3)
        out = attention_kernel(qg, k_all, v_all, scale=c.scale, implementation=c.implementation, **factored)
        return out.reshape(b, t, c.num_heads * c.head_dim), new_cache
    # A factored mask without a cache: query slot i sees no key slot beyond i.
    causal_rows = mask.ndim == 2 and cache is None
    if mask.ndim == 2:
      mask = make_causal_mask(mask) if cache is None else mask[:, None, :] & (
          jnp.arange(s)[None, None, :] <= (start + jnp.arange(t))[None, :, None])
    allowed = mask.astype(jnp.bool_)
    if c.sliding_window is not None:
      q_slots = start + jnp.arange(t)
      k_slots = jnp.arange(s)
      in_window = (q_slots[:, None] - k_slots[None, :]) < c.sliding_window
      allowed = allowed & in_window[None]

    # Heads ahead of positions, so both products are plain batched matmuls over (b, k) with the
    # query groups and positions as one row dimension: XLA:CPU then copies no [b, k, g, t, s]
    # tensor into another layout (the backward pass ran ~1.8x slower in the mixed layout); on GPU
    # the transposes are as cheap as the strides they replace. Same products, same values.
    qm = qg.transpose(0, 2, 3, 1, 4).reshape(b, c.num_kv_heads, groups * t, c.head_dim)
    if k_cols is None and not capture:
      if causal_rows and b * c.num_heads * t * t >= CAUSAL_BLOCKS_MIN_SCORES and jax.default_backend() == "cpu":
        out = causal_blocks_attention(qm, k_heads, v_heads, allowed, groups, c.scale, c.softcap)
      else:
        out = dense_attention_core(qm, k_heads, v_heads, allowed, groups, c.scale, c.softcap)
    else:
      keys, columns = (k_heads, False) if k_cols is None else (k_cols, True)
      scores, _ = _masked_scores(qm, keys, allowed, groups, c.scale, c.softcap, columns)
      probs = jax.nn.softmax(scores, axis=-1)
      if capture:
        self.sow(nnx.Intermediate, ATTENTION_WEIGHTS, probs.reshape(b, c.num_heads, t, s))
      out = jnp.einsum("bkms,bksh->bkmh", probs.astype(self.dtype).reshape(b, c.num_kv_heads, groups * t, s), v_heads)
    out = out.reshape(b, c.num_kv_heads, groups, t, c.head_dim).transpose(0, 3, 1, 2, 4)
    return out.reshape(b, t, c.num_heads * c.head_dim), new_cache


def _masked_scores(qm, keys, allowed, groups: int, scale: float, softcap: float | None, columns: bool):
  """float32 logits [B, K, G, T, S] (scaled, soft-capped, masked) and the scaled ones before the cap.

  ``qm`` [B, K, G*T, H]; ``keys`` [B, K, S, H], or [B, K, H, S] with ``columns``; ``allowed`` [B, T, S].
  """
  b, nk, m, _ = qm.shape
  equation = "bkmh,bkhs->bkms" if columns else "bkmh,bksh->bkms"
  scaled = jnp.einsum(equation, qm, keys, preferred_element_type=jnp.float32)
  scaled = scaled.reshape(b, nk, groups, m // groups, scaled.shape[-1]) * scale
  capped = scaled if softcap is None else jnp.tanh(scaled / softcap) * softcap
  return jnp.where(allowed[:, None, None, :, :], capped, _NEG), scaled


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def dense_attention_core(qm, k, v, allowed, groups: int, scale: float, softcap: float | None):
  """``softmax(mask(cap(q.k * scale))) . v`` with a backward pass that recomputes the probabilities.

  Args: ``qm`` [B, K, G*T, H] (the G query heads of each key/value head, then positions), ``k``
  and ``v`` [B, K, S, H], ``allowed`` [B, T, S] bool. Returns [B, K, G*T, H] in ``v``'s dtype.

  Autodiff of the same expression keeps the float32 probabilities [B, K, G, T, S] of every layer
  until the backward pass (SmolLM2-135M, 4 x 256 tokens: 270 MB of a full fine-tuning step's
  2.6 GB); here only the output and each row's max and sum are kept, and the backward pass
  recomputes the scores from q and k (one more q.k product; the flash-attention backward, in
  one dense block). Same forward values; gradients equal up to float rounding. Reverse mode only
  (``jax.grad``, ``jax.vjp``): forward-mode ``jax.jvp`` through it raises, as for any ``custom_vjp``.
  """
  return _core_forward(qm, k, v, allowed, groups, scale, softcap)[0]


def _core_forward(qm, k, v, allowed, groups, scale, softcap):
  b, nk, m, _ = qm.shape
  scores, _ = _masked_scores(qm, k, allowed, groups, scale, softcap, False)
  top = jnp.max(scores, axis=-1, keepdims=True)
  weights = jnp.exp(scores - top)
  total = jnp.sum(weights, axis=-1, keepdims=True)
  probs = (weights / total).reshape(b, nk, m, -1)
  out = jnp.einsum("bkms,bksh->bkmh", probs.astype(v.dtype), v)
  # Each row's max and sum [B, K, G, T, 1], not their log-sum-exp: a row that sees no key has
  # max = float32 min, which absorbs log(S), and its uniform probabilities would come back as 1.
  return out, (qm, k, v, allowed, out, top, total)


def _core_backward(groups, scale, softcap, residuals, d_out):
  qm, k, v, allowed, out, top, total = residuals
  # The recomputation waits for the output's gradient, whatever the scheduler prefers: XLA:CPU's
  # default one ran jax.checkpoint's recomputations as early as it could (in the forward pass),
  # which would keep every layer's probabilities alive again.
  qm, k, d_out = jax.lax.optimization_barrier((qm, k, d_out))
  b, nk, m, _ = qm.shape
  scores, scaled = _masked_scores(qm, k, allowed, groups, scale, softcap, False)
  probs = (jnp.exp(scores - top) / total).reshape(b, nk, m, -1)  # the forward pass's values
  d_v = jnp.einsum("bkms,bkmh->bksh", probs.astype(v.dtype), d_out.astype(v.dtype))
  d_probs = jnp.einsum("bkmh,bksh->bkms", d_out, v, preferred_element_type=jnp.float32)
  rows = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  d_scores = (probs * (d_probs - rows)).reshape(scores.shape)
  d_scores = jnp.where(allowed[:, None, None, :, :], d_scores, 0.0)
  if softcap is not None:
    d_scores = d_scores * (1.0 - jnp.square(jnp.tanh(scaled / softcap)))
  d_scores = (d_scores * scale).reshape(b, nk, m, -1)
  d_q = jnp.einsum("bkms,bksh->bkmh", d_scores.astype(qm.dtype), k, preferred_element_type=jnp.float32)
  d_k = jnp.einsum("bkms,bkmh->bksh", d_scores.astype(qm.dtype), qm, preferred_element_type=jnp.float32)
  return d_q.astype(qm.dtype), d_k.astype(k.dtype), d_v, None


dense_attention_core.defvjp(_core_forward, _core_backward)

# Causal dense attention on CPU runs in query blocks of at least this many rows, at most this many blocks,
# when a layer's scores have at least this many elements (below, the few milliseconds saved per step do not
# pay for the longer compilation: a 4 x 256-token SmolLM2 step has 2.4M, a tiny test model's far fewer).
CAUSAL_BLOCK_ROWS = 64
CAUSAL_MAX_BLOCKS = 8
CAUSAL_BLOCKS_MIN_SCORES = 1 << 20


def causal_blocks_attention(qm, k, v, allowed, groups: int, scale: float, softcap: float | None):
  """``dense_attention_core`` for a causal ``allowed`` (query slot i sees no key slot beyond i), by blocks.

  The queries are split into blocks of ``CAUSAL_BLOCK_ROWS`` or more rows (at most
  ``CAUSAL_MAX_BLOCKS``), each attending densely to the keys up to its last row, so the hidden
  upper triangle is mostly not computed: 4 blocks of 64 over 256 keys do 10/16 of the work, forward
  and backward. Each block's row sees all its visible keys, so no online softmax is needed and the
  values equal the one-block result up to float rounding, except in a row that sees no key at all
  (padding), which averages v over its block's keys rather than all of them. On XLA:CPU, where the
  scores and their element-wise work are a sixth of a SmolLM2 LoRA step at 4 x 256 tokens, the step
  ran 6-9% faster; its compilation takes longer (~7 s more for that step, once). Same arguments as
  ``dense_attention_core`` (keys and queries have the same slots).
  """
  b, nk, m, h = qm.shape
  t = m // groups
  rows = max(CAUSAL_BLOCK_ROWS, -(-t // CAUSAL_MAX_BLOCKS))
  if t <= rows or k.shape[2] != t:
    return dense_attention_core(qm, k, v, allowed, groups, scale, softcap)
  q5 = qm.reshape(b, nk, groups, t, h)
  outs = []
  for start in range(0, t, rows):
    end = min(start + rows, t)
    block = q5[:, :, :, start:end].reshape(b, nk, groups * (end - start), h)
    out = dense_attention_core(block, k[:, :, :end], v[:, :, :end], allowed[:, start:end, :end], groups, scale, softcap)
    outs.append(out.reshape(b, nk, groups, end - start, h))
  return jnp.concatenate(outs, axis=3).reshape(b, nk, m, h)


def set_attention_implementation(model: nnx.Module, implementation: str) -> int:
  """Sets ``implementation`` ("auto", "xla", "blockwise" or "cudnn") on every :class:`Attention` in ``model``.

  Returns:
    How many attention layers were changed (the model's jitted functions retrace once).

  Raises:
    ValueError: for an unknown implementation, or a model without easytunix attention layers.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention must be one of {IMPLEMENTATIONS}, got {implementation!r}.")
  layers = [m for _, m in nnx.iter_modules(model) if isinstance(m, Attention)]
  if not layers:
    raise ValueError(f"{type(model).__name__} has no easytunix Attention layers to configure.")
  for layer in layers:
    layer.config = dataclasses.replace(layer.config, implementation=implementation)
  return len(layers)
