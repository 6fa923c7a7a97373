"""The decoder-only transformer that every family composes from shared layers.

A family (Llama 3, Qwen 3, Gemma, Gemma 3) is a :class:`DecoderConfig` subclass
with its named sizes and Hugging Face config parser, a thin :class:`CausalLM`
subclass, and a checkpoint name table (see ``easytunix.models.loader``).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from easytunix.layers.attention import LAYER_OUTPUT, Attention, AttentionConfig, should_sow
from easytunix.layers.cache import KVCache, RaggedLayout, init_cache, positions_from_mask
from easytunix.layers.embedder import Embedder
from easytunix.layers.linear import Linear
from easytunix.layers.mlp import ACTIVATIONS, MLP
from easytunix.layers.moe import MoELayer
from easytunix.layers.norm import RMSNorm
from easytunix.layers.rope import RopeConfig
from easytunix.layers.sharding import ShardingConfig, constrain
from easytunix.models.calling import logits_log_probs

FULL = "full_attention"
SLIDING = "sliding_attention"

_DTYPES = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
}


def to_dtype(dtype: Any) -> Any:
  """Accepts a jnp dtype or its name ('bfloat16', 'float32', 'float16')."""
  if dtype is None:
    return None
  if isinstance(dtype, str):
    try:
      return _DTYPES[dtype]
    except KeyError:
      raise ValueError(f"Unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}.") from None
  return jnp.dtype(dtype).type


def dtype_name(dtype: Any) -> str:
  return jnp.dtype(dtype).name


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Architecture of a decoder-only transformer.

  Attributes:
    vocab_size: number of token ids.
    hidden_size: model width (``embed_dim``).
    intermediate_size: MLP width (``hidden_dim``).
    num_layers: number of decoder layers.
    num_heads: query heads.
    num_kv_heads: key/value heads.
    head_dim: width of each head.
    norm_eps: RMSNorm epsilon.
    norm_unit_offset: Gemma's (1 + w) RMSNorm.
    activation: "silu" (SwiGLU) or "gelu_tanh" (GeGLU).
    tie_embeddings: the output projection reuses the embedding matrix.
    scale_embeddings: embeddings multiplied by sqrt(hidden_size) (Gemma).
    rope: rotary config of full-attention layers.
    local_rope: rotary config of sliding-window layers (defaults to ``rope``).
    layer_types: per layer, "full_attention" or "sliding_attention" (None: all full).
    sliding_window: window of the sliding layers.
    qk_norm: RMS-normalise query and key heads (Qwen 3, Gemma 3).
    sandwich_norms: extra norms after attention and after the MLP (Gemma 3).
    attention_bias: biases on the q/k/v projections.
    query_pre_attn_scalar: attention scale is this ** -0.5 (default head_dim).
    attn_logit_softcap: soft cap on attention logits.
    final_logit_softcap: soft cap on output logits.
    num_experts: experts per MoE layer (0: dense model).
    num_experts_per_tok: experts each token is routed to.
    moe_intermediate_size: width of each expert.
    norm_topk_prob: renormalise the top-k router weights.
    moe_layers: per layer, whether it is MoE (None: all layers when num_experts > 0).
    max_position_embeddings: longest context the model was trained for.
    dtype: compute dtype.
    param_dtype: storage dtype of parameters.
    sharding: logical partition specs for parameters and activations.
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  norm_eps: float = 1e-6
  norm_unit_offset: bool = False
  activation: str = "silu"
  tie_embeddings: bool = True
  scale_embeddings: bool = False
  rope: RopeConfig = RopeConfig()
  local_rope: RopeConfig | None = None
  layer_types: tuple[str, ...] | None = None
  sliding_window: int | None = None
  qk_norm: bool = False
  sandwich_norms: bool = False
  attention_bias: bool = False
  query_pre_attn_scalar: float | None = None
  attn_logit_softcap: float | None = None
  final_logit_softcap: float | None = None
  num_experts: int = 0
  num_experts_per_tok: int = 0
  moe_intermediate_size: int = 0
  norm_topk_prob: bool = True
  moe_layers: tuple[bool, ...] | None = None
  max_position_embeddings: int = 8192
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  sharding: ShardingConfig = ShardingConfig.default()

  # Hugging Face model_type values this config describes (set by families).
  hf_model_types: ClassVar[tuple[str, ...]] = ()

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"{type(self).__name__}.{name} must be a positive int, got {value!r}.")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})."
      )
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}.")
    if self.layer_types is not None:
      if len(self.layer_types) != self.num_layers:
        raise ValueError(
            f"layer_types has {len(self.layer_types)} entries but num_layers is {self.num_layers}."
        )
      bad = set(self.layer_types) - {FULL, SLIDING}
      if bad:
        raise ValueError(f"Unknown layer types {sorted(bad)}; use {FULL!r} or {SLIDING!r}.")
      if SLIDING in self.layer_types and not self.sliding_window:
        raise ValueError("Sliding-attention layers need sliding_window to be set (a positive int).")
    if self.num_experts:
      if not 0 < self.num_experts_per_tok <= self.num_experts:
        raise ValueError(
            f"num_experts_per_tok must be in [1, {self.num_experts}], got {self.num_experts_per_tok}."
        )
      if self.moe_intermediate_size <= 0:
        raise ValueError("An MoE config needs moe_intermediate_size > 0.")
    if self.moe_layers is not None and len(self.moe_layers) != self.num_layers:
      raise ValueError(
          f"moe_layers has {len(self.moe_layers)} entries but num_layers is {self.num_layers}."
      )
    object.__setattr__(self, "dtype", to_dtype(self.dtype))
    object.__setattr__(self, "param_dtype", to_dtype(self.param_dtype))

  # Seed-compatible names.
  @property
  def embed_dim(self) -> int:
    return self.hidden_size

  @property
  def hidden_dim(self) -> int:
    return self.intermediate_size

  @property
  def num_embed(self) -> int:
    return self.vocab_size

  @property
  def shd_config(self) -> ShardingConfig:
    return self.sharding

  def replace(self, **changes: Any) -> "DecoderConfig":
    """A copy with some fields changed (validated again)."""
    return dataclasses.replace(self, **changes)

  def layer_type(self, i: int) -> str:
    return FULL if self.layer_types is None else self.layer_types[i]

  def is_moe_layer(self, i: int) -> bool:
    if not self.num_experts:
      return False
    return True if self.moe_layers is None else bool(self.moe_layers[i])

  def attention_config(self, i: int) -> AttentionConfig:
    sliding = self.layer_type(i) == SLIDING
    return AttentionConfig(
        num_heads=self.num_heads,
        num_kv_heads=self.num_kv_heads,
        head_dim=self.head_dim,
        rope=(self.local_rope or self.rope) if sliding else self.rope,
        query_scale=(self.query_pre_attn_scalar**-0.5) if self.query_pre_attn_scalar else None,
        sliding_window=self.sliding_window if sliding else None,
        qk_norm=self.qk_norm,
        qk_norm_unit_offset=self.norm_unit_offset,
        norm_eps=self.norm_eps,
        softcap=self.attn_logit_softcap,
        use_bias=self.attention_bias,
    )

  def to_dict(self) -> dict[str, Any]:
    """JSON-friendly dict (our own preset format)."""
    out = {}
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      if f.name in ("dtype", "param_dtype"):
        v = dtype_name(v)
      elif isinstance(v, (RopeConfig, ShardingConfig)):
        v = dataclasses.asdict(v)
      out[f.name] = v
    return out

  @classmethod
  def from_dict(cls, data: dict[str, Any]) -> "DecoderConfig":
    """Inverse of :meth:`to_dict`; unknown keys are an error."""
    data = dict(data)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
      raise ValueError(f"Unknown {cls.__name__} fields {sorted(unknown)}; known fields: {sorted(names)}.")
    for key in ("rope", "local_rope"):
      if isinstance(data.get(key), dict):
        data[key] = RopeConfig(**data[key])
    if isinstance(data.get("sharding"), dict):
      data["sharding"] = ShardingConfig(**{k: tuple(v) for k, v in data["sharding"].items()})
    for key in ("layer_types", "moe_layers"):
      if data.get(key) is not None:
        data[key] = tuple(data[key])
    return cls(**data)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2)

  @classmethod
  def from_hf_config(cls, hf: dict[str, Any], **overrides: Any) -> "DecoderConfig":
    """Builds the config from a Hugging Face ``config.json`` dict (each family implements it)."""
    raise NotImplementedError(f"{cls.__name__} does not parse Hugging Face configs; use a family's config class.")

  def to_hf_config(self) -> dict[str, Any]:
    """This config as a Hugging Face ``config.json`` dict (each family implements it)."""
    raise NotImplementedError(f"{type(self).__name__} cannot be written as a Hugging Face config.")


def hf_rope_params(hf: dict[str, Any], layer_type: str | None = None) -> dict[str, Any]:
  """The rope dict of a HF config in either spelling (transformers 4 or 5).

  transformers 5 writes ``rope_parameters`` (for Gemma 3 nested per layer type);
  transformers 4 writes ``rope_theta`` plus an optional ``rope_scaling``.
  """
  params = hf.get("rope_parameters")
  if isinstance(params, dict) and layer_type is not None and layer_type in params:
    params = params[layer_type]
  if isinstance(params, dict) and ("rope_theta" in params or "rope_type" in params):
    return dict(params)
  out = dict(hf.get("rope_scaling") or {})
  if "rope_theta" in hf:
    out["rope_theta"] = hf["rope_theta"]
  return out


class DecoderLayer(nnx.Module):
  """Pre-norm attention and MLP (or MoE) blocks with residual connections.

  Sows its output hidden state as ``"layer_output"`` when a ``sow_intermediates`` request asks.
  """

  sown_intermediates: ClassVar[tuple[str, ...]] = (LAYER_OUTPUT,)

  def __init__(self, config: DecoderConfig, layer_index: int, *, rngs: nnx.Rngs):
    c = config
    shd = c.sharding
    norm = lambda: RMSNorm(  # noqa: E731
        c.hidden_size, eps=c.norm_eps, unit_offset=c.norm_unit_offset, param_dtype=c.param_dtype, partition=shd.norm
    )
    kw = dict(dtype=c.dtype, param_dtype=c.param_dtype, shd=shd, rngs=rngs)
    self.input_norm = norm()
    self.attn = Attention(c.hidden_size, c.attention_config(layer_index), **kw)
    self.post_attn_norm = norm() if c.sandwich_norms else None
    self.pre_ffw_norm = norm()
    if c.is_moe_layer(layer_index):
      self.mlp = MoELayer(
          c.hidden_size,
          c.moe_intermediate_size,
          c.num_experts,
          c.num_experts_per_tok,
          norm_topk_prob=c.norm_topk_prob,
          activation=c.activation,
          **kw,
      )
    else:
      self.mlp = MLP(c.hidden_size, c.intermediate_size, activation=c.activation, **kw)
    self.post_ffw_norm = norm() if c.sandwich_norms else None

  def __call__(self, x, positions, mask, cache=None, cache_index=None, pick=None):
    """``(output, new cache)``; ``pick`` (see ``CausalLM``) keeps some rows of the attention block's output."""
    h, new_cache = self.attn(self.input_norm(x), positions, mask, cache, cache_index)
    if self.post_attn_norm is not None:
      h = self.post_attn_norm(h)
    x = x + h
    if pick is not None:  # the MLP runs on the kept rows only: [B', hidden] -> [B', 1, hidden]
      x = pick(x)
      x = x[:, None] if x.ndim == 2 else x
    h = self.mlp(self.pre_ffw_norm(x))
    if self.post_ffw_norm is not None:
      h = self.post_ffw_norm(h)
    out = x + h
    if should_sow(self, LAYER_OUTPUT):
      self.sow(nnx.Intermediate, LAYER_OUTPUT, out)
    return out, new_cache


def _head_logits(head: nnx.Module, hidden: jax.Array, softcap: float | None) -> jax.Array:
  """The output layer: an untied ``lm_head`` (Linear) or the tied embedder's ``decode``, then the soft cap."""
  logits = head.decode(hidden) if isinstance(head, Embedder) else head(hidden)
  if softcap is not None:
    logits = jnp.tanh(logits / softcap) * softcap
  return logits


def _check_ragged(layout: RaggedLayout, tokens: jax.Array, positions: jax.Array | None, cache: KVCache | None) -> None:
  """Shapes a ``RaggedLayout`` prefill needs: one row of N tokens, their positions, a fresh cache of B rows."""
  n = tokens.shape[1]
  if tokens.shape[0] != 1 or layout.dst.shape != (n,) or layout.valid.shape != layout.src.shape:
    raise ValueError(
        f"A RaggedLayout prefill takes tokens [1, N] with dst [N] and src, valid [B, P]; got tokens "
        f"{tokens.shape}, dst {layout.dst.shape}, src {layout.src.shape}, valid {layout.valid.shape}."
    )
  if positions is None or jnp.shape(positions) != (1, n):
    raise ValueError(f"A RaggedLayout prefill needs the tokens' positions [1, {n}] (each prompt counts from 0).")
  if cache is not None and (cache.batch_size != layout.rows or cache.max_len < layout.width):
    raise ValueError(
        f"A RaggedLayout prefill of {layout.rows} prompts x {layout.width} slots needs a cache of "
        f"{layout.rows} rows and at least {layout.width} slots; got {cache.batch_size} x {cache.max_len}."
    )


def _call_layer(layer, x, positions, mask, layer_cache, cache_index):
  return layer(x, positions, mask, layer_cache, cache_index)


# remat policy -> what a rematerialised block keeps for the backward pass (None: nothing but its input).
REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "block": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


CPU_REMAT_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def warn_if_cpu_scheduler_defeats_remat() -> None:
  """Warns when remat cannot save memory: XLA:CPU's default scheduler runs every block's recomputation
  as early as it can (for concurrency), so all of them are alive at once, as without remat (measured:
  8 blocks, the same temporary memory with and without). Its memory-aware scheduler keeps remat's saving;
  it is chosen by ``XLA_FLAGS`` before JAX starts, which a library cannot do later. GPUs and TPUs
  schedule for memory already.
  """
  import os
  import warnings

  if jax.default_backend() == "cpu" and CPU_REMAT_FLAG not in os.environ.get("XLA_FLAGS", ""):
    warnings.warn(
        f"remat saves no memory on CPU with XLA's default scheduler, which recomputes every block up front. "
        f"Start Python with XLA_FLAGS='{CPU_REMAT_FLAG}' (set before JAX is imported) so the recomputation "
        "runs block by block in the backward pass.", stacklevel=3)


def _remat_layer(policy: str):
  return nnx.remat(_call_layer, policy=REMAT_POLICIES[policy])


class CausalLM(nnx.Module):
  """A decoder-only language model.

  ``model(tokens, positions=None, cache=None, attention_mask=None)`` returns
  ``(logits, new_cache)``: Tunix's calling convention, positional or by keyword.
  ``attention_mask`` is either a [B, T] validity mask (padding; causal attention is
  added and the mask stays factored, so no [T, T] mask is materialised) or a full
  boolean mask as Tunix builds it: [B, T, T] without a cache (``make_causal_mask``),
  [B, T, S] with one, where S is the cache length and the T new tokens are written
  at ``cache.index``. Both forms give the same logits; the factored one is faster.
  Without ``positions``, they are counted from each row's first real token (read off
  the mask's diagonal for a [B, T, T] mask). A third form, ``RaggedLayout``, is the
  sampler's prefill of prompts laid end to end in one row (tokens and positions [1, N]):
  projections on the real tokens only, attention in left-padded rows, the cache written
  from slot 0.

  ``pick`` (keyword) serves a prefill that wants a few positions' logits: a function from the
  [B, T, hidden] states to the wanted rows, [B', hidden] (or [B', T', hidden]). It is applied after
  the last layer's attention block, so that layer's MLP, the final norm and the output head run
  on those rows only, and the logits (and hidden states) come back as [B', 1, vocab] (or
  [B', T', vocab]). Every layer's keys and values still go to the cache.
  """

  # Trainers may pass a [B, T] padding mask (see easytunix.models.calling).
  accepts_padding_mask: ClassVar[bool] = True
  # The sampler may prefill with a RaggedLayout as the attention mask (prompts end to end in one row).
  accepts_ragged_layout: ClassVar[bool] = True
  # ... and ask for a few positions' logits with ``pick`` (the last layer's MLP runs on those only).
  accepts_pick: ClassVar[bool] = True

  config_class: ClassVar[type[DecoderConfig]] = DecoderConfig
  # The family's registry key ("llama3", ...): its module is easytunix.models.<family> (model, params).
  family: ClassVar[str] = ""
  # Rematerialisation of the decoder blocks in training (see set_remat); decoding never remats.
  remat: str = "none"
  # token_log_probs takes positions in chunks of about this many tokens beyond it (0: never chunk).
  loss_chunk_tokens: int = 1024

  def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
    c = config
    self.config = c
    shd = c.sharding
    self.embedder = Embedder(
        c.vocab_size,
        c.hidden_size,
        scale_by_sqrt_dim=c.scale_embeddings,
        dtype=c.dtype,
        param_dtype=c.param_dtype,
        partition=shd.embed_vd,
        rngs=rngs,
    )
    self.layers = nnx.List([DecoderLayer(c, i, rngs=rngs) for i in range(c.num_layers)])
    self.final_norm = RMSNorm(
        c.hidden_size, eps=c.norm_eps, unit_offset=c.norm_unit_offset, param_dtype=c.param_dtype, partition=shd.norm
    )
    self.lm_head = (
        None
        if c.tie_embeddings
        else Linear(
            c.hidden_size, c.vocab_size, dtype=c.dtype, param_dtype=c.param_dtype, partition=shd.lm_head_dv, rngs=rngs
        )
    )

  def __call__(
      self,
      input_tokens: jax.Array,
      positions: jax.Array | None = None,
      cache: KVCache | None = None,
      attention_mask: jax.Array | None = None,
      *,
      return_hidden_states: bool = False,
      pick: Callable[[jax.Array], jax.Array] | None = None,
  ):
    tokens = jnp.asarray(input_tokens)
    b, t = tokens.shape
    ragged = isinstance(attention_mask, RaggedLayout)
    if ragged:
      _check_ragged(attention_mask, tokens, positions, cache)
    elif attention_mask is not None:
      attention_mask = jnp.asarray(attention_mask)
      s = t if cache is None else cache.max_len
      if attention_mask.shape not in ((b, t), (b, t, s)):
        raise ValueError(
            f"attention_mask must be [B, T] = {(b, t)} (padding) or [B, T, S] = {(b, t, s)} (causal"
            f"{', S = cache length' if cache is not None else ''}), got {attention_mask.shape}."
        )
    if positions is None:
      if attention_mask is not None and attention_mask.ndim == 2:
        positions = positions_from_mask(attention_mask)
      elif attention_mask is not None and cache is None:
        positions = positions_from_mask(jnp.diagonal(attention_mask, axis1=1, axis2=2))
      else:
        start = 0 if cache is None else cache.index
        positions = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
    if attention_mask is None:
      if cache is not None:
        raise ValueError("With a KV cache, pass the [B, T, S] attention_mask (see make_decode_mask).")
      attention_mask = jnp.ones((b, t), jnp.bool_)
    elif not ragged and attention_mask.ndim == 2 and cache is not None:
      raise ValueError("With a KV cache, pass the [B, T, S] attention_mask (see make_decode_mask).")
    # A [B, T] mask stays factored (causal over the valid keys): the attention layers then choose
    # dense, blockwise (memory linear in T) or cuDNN attention without a [T, T] mask in memory.

    # On a mesh (see easytunix.layers.sharding.mesh_context) the hidden states stay split over the batch
    # axes, as the batch is; left to itself XLA may follow the weights' FSDP sharding of the hidden
    # dimension and have every device compute the whole global batch.
    act = self.config.sharding.act_btd
    x = constrain(self.embedder.encode(tokens), act)
    new_layers = []
    run_layer = _call_layer if cache is not None or self.remat == "none" else _remat_layer(self.remat)
    for i, layer in enumerate(self.layers):
      layer_cache = None if cache is None else cache.layers[i]
      index = None if cache is None else cache.index
      if pick is not None and i == len(self.layers) - 1:
        x, new_layer_cache = layer(x, positions, attention_mask, layer_cache, index, pick=pick)
      else:
        x, new_layer_cache = run_layer(layer, x, positions, attention_mask, layer_cache, index)
      x = constrain(x, act)
      new_layers.append(new_layer_cache)
    hidden = self.final_norm(x)
    logits = constrain(self.logits(hidden), act)
    new_cache = None
    if cache is not None:
      next_slot = jnp.asarray(attention_mask.width, jnp.int32) if ragged else cache.index + t
      new_cache = KVCache(tuple(new_layers), next_slot)
    if return_hidden_states:
      return logits, new_cache, hidden
    return logits, new_cache

  def logits(self, hidden: jax.Array) -> jax.Array:
    """Vocabulary logits of final-norm hidden states [..., hidden] -> [..., vocab].

    The output head (``lm_head``, or the tied embedding) and the final soft cap: what the forward
    pass does after the last norm, so a caller holding hidden states (the sampler's prefill, which
    needs only the last slot) gets the same logits without projecting every position.
    """
    return _head_logits(self._head(), hidden, self.config.final_logit_softcap)

  def _head(self) -> nnx.Module:
    return self.lm_head if self.lm_head is not None else self.embedder

  def token_log_probs(self, hidden: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(target) per position from final-norm hidden states: [B, K, D], [B, K] -> [B, K] (float32).

    Equal to ``log_softmax(self.logits(hidden))`` at ``targets``, but beyond
    ``loss_chunk_tokens`` tokens the positions are taken in chunks of about that many
    tokens, one after another, each chunk's logits recomputed in the backward pass: the
    [B, K, vocab] float32 logits (and their gradient) never exist in memory at once.
    At 32k tokens and a 150k vocabulary that is 18 GiB per copy.
    """
    b, k, d = hidden.shape
    # Positions per chunk; every chunk keeps all rows, so the batch axis stays split over the devices.
    width = max(1, self.loss_chunk_tokens // b)
    if not self.loss_chunk_tokens or k <= width:
      return logits_log_probs(self.logits(hidden), targets)
    pad = (-k) % width
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    chunks = (hidden.reshape(b, -1, width, d).swapaxes(0, 1), targets.reshape(b, -1, width).swapaxes(0, 1))
    graphdef, state = nnx.split(self._head())
    cap = self.config.final_logit_softcap

    @jax.checkpoint
    def chunk_log_probs(state, h, t):
      return logits_log_probs(_head_logits(nnx.merge(graphdef, state), h, cap), t)

    _, out = jax.lax.scan(lambda carry, xs: (carry, chunk_log_probs(state, *xs)), None, chunks)
    return out.swapaxes(0, 1).reshape(b, -1)[:, :k]

  def set_remat(self, policy: str) -> None:
    """Recompute decoder blocks in the backward pass instead of keeping their activations.

    Args:
      policy: "none" (keep every activation: fastest, most memory), "block" (keep
        only each block's input and recompute the block: least memory, about one
        extra forward pass) or "dots" (also keep the matmul outputs, recompute the
        element-wise work: a middle ground).
    """
    if policy not in REMAT_POLICIES:
      raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {policy!r}.")
    self.remat = policy
    if policy != "none":
      warn_if_cpu_scheduler_defeats_remat()

  def set_compute_dtype(self, dtype: Any) -> None:
    """Runs every layer's matmuls in ``dtype`` (e.g. bfloat16) while parameters keep their own dtype.

    With float32 parameters this is mixed precision: bf16 compute, float32 master
    weights, gradients and optimizer state; norms, softmax and the loss still
    accumulate in float32.
    """
    compute = to_dtype(dtype)
    for _, module in nnx.iter_modules(self):
      if module is not self and isinstance(getattr(module, "dtype", None), type | jnp.dtype):
        module.dtype = compute

  def init_cache(self, batch_size: int, max_len: int, dtype: Any = None) -> KVCache:
    """An empty KV cache sized for this model."""
    c = self.config
    return init_cache(c.num_layers, batch_size, max_len, c.num_kv_heads, c.head_dim, to_dtype(dtype) or c.dtype)

  @property
  def num_embed(self) -> int:
    return self.config.vocab_size

  @property
  def num_params(self) -> int:
    """Parameters of the model, quantized kernels (QLoRA's frozen base) counted as the weights they stand for."""
    from easytunix.layers.quantization import quantized_kernels

    quantized = sum(k.size for k in quantized_kernels(self).values())
    return sum(x.size for x in jax.tree.leaves(nnx.state(self, nnx.Param))) + quantized
