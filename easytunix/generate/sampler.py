"""A JAX-native sampler: KV-cached prefill and decode, greedy / top-p / top-k / beam search, streaming.

How a call runs:

1. Prompts (strings or token-id lists) are tokenized and LEFT-padded into a
   [batch bucket, prompt bucket] array, so every row's last prompt token sits in
   the same slot and each row's positions count from its first real token.
2. ``prefill`` (one jit per (batch bucket, prompt bucket, cache length)) runs the
   prompt through the model once and fills the KV cache. A large batch of prompts
   of different lengths is packed end to end into fewer, wider rows for this pass
   (``Sampler._pack``; without it padding can be a quarter of the work), and its
   keys and values are gathered into the same left-padded cache.
3. The decode loop (one jit: a ``jax.lax.while_loop``) samples one token per row
   per step and stops when every row has emitted an EOS token or the step budget
   is spent. Streaming drives a jitted single step from Python instead; beam
   search has its own jitted loop.

Shapes are rounded up to buckets (powers of two and 3/4 of them) so that a later call with other
prompts of a similar size reuses the compiled programs. The model's parameters
are an *argument* of every jitted function (split off with ``nnx.split``), never
a constant baked into it, so new weights (``update_params``, or an optimizer
updating the model in place) are used without recompiling. Sampling settings
(temperature, top-p, EOS ids, seed) are runtime arguments too; only the decoding
kind (greedy / sampling, ``top_k``, which outputs are returned) is compiled in.

The pieces live in their own modules: token picking in ``sampling``, beam
search (transformers' ``_beam_search``, step for step) in ``beam_search``,
streamed text in ``streaming``, buckets in ``utils``, and the prompt / EOS /
output handling shared with ``VllmSampler`` in ``base_sampler``. This module
re-exports their public names.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import weakref
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from easytunix.generate.base_sampler import BaseSampler, SamplerOutput
from easytunix.generate.beam_search import beam_search, check_early_stopping
from easytunix.generate.sampling import DecodeKnobs, DecodeMode, pick_tokens, sample_best, sample_top_p
from easytunix.generate.streaming import StreamChunk, stream_chunks
from easytunix.generate.utils import (
    MIN_PROMPT_BUCKET,
    MIN_STEPS_BUCKET,
    as_id,
    bucket,
    check_steps,
    fine_bucket,
    pack_rows,
    share_prefixes,
)
from easytunix.host_memory import release_memory_after_compiles
from easytunix.layers.cache import (
    KVCache,
    RaggedLayout,
    gather_slots,
    init_cache,
    make_decode_mask,
    positions_from_mask,
)
from easytunix.layers.linear import out_major_copies, out_major_kernels, out_major_targets
from easytunix.layers.sharding import commit_model, mesh_context, module_mesh

__all__ = [
    "CacheConfig",
    "SampleState",
    "Sampler",
    "SamplerOutput",
    "StreamChunk",
    "sample_best",
    "sample_top_p",
]

# EOS ids travel as a fixed-size runtime array (padded with -1) so that a
# different stop set does not recompile (more ids: the next power of two).
_EOS_SLOTS = 8


# ----------------------------------------------------------------------------- configs and outputs


@dataclasses.dataclass(frozen=True)
class CacheConfig:
  """Static shape of the KV cache the sampler allocates.

  Attributes:
    cache_size: the most tokens one row can hold: prompt plus generated tokens
      (also readable as ``max_sequence_length``).
    num_layers: transformer layers of the model.
    num_kv_heads: key/value heads per layer.
    head_dim: width of each head.
    max_batch_size: the most prompts one call may take (None: no limit).
    dtype: storage dtype of the cache (None: the model's compute dtype).
  """

  cache_size: int
  num_layers: int
  num_kv_heads: int
  head_dim: int
  max_batch_size: int | None = None
  dtype: Any = None

  def __post_init__(self):
    for name in ("cache_size", "num_layers", "num_kv_heads", "head_dim"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"CacheConfig.{name} must be a positive int, got {value!r}.")
    if self.max_batch_size is not None and (
        isinstance(self.max_batch_size, bool)
        or not isinstance(self.max_batch_size, (int, np.integer))
        or self.max_batch_size <= 0
    ):
      raise ValueError(f"CacheConfig.max_batch_size must be a positive int or None, got {self.max_batch_size!r}.")
    if self.dtype is not None:
      try:
        dtype = jnp.dtype(self.dtype)
      except TypeError:
        raise ValueError(
            f"CacheConfig.dtype must be a floating dtype such as jnp.bfloat16, got {self.dtype!r}."
        ) from None
      if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"CacheConfig.dtype must be a floating dtype, got {dtype}.")
      object.__setattr__(self, "dtype", dtype)

  @property
  def max_sequence_length(self) -> int:
    return self.cache_size

  @classmethod
  def for_model(
      cls, model: Any, cache_size: int, max_batch_size: int | None = None, dtype: Any = None
  ) -> "CacheConfig":
    """The cache of ``model`` (anything with a ``config`` holding the layer sizes)."""
    config = getattr(model, "config", model)
    try:
      sizes = dict(num_layers=config.num_layers, num_kv_heads=config.num_kv_heads, head_dim=config.head_dim)
    except AttributeError:
      raise TypeError(
          f"CacheConfig.for_model needs a model whose .config has num_layers, num_kv_heads and head_dim; "
          f"got {type(model).__name__}. Build CacheConfig(...) by hand instead."
      ) from None
    if dtype is None:
      dtype = getattr(config, "dtype", None)
    return cls(cache_size=cache_size, max_batch_size=max_batch_size, dtype=dtype, **sizes)


# Prefills of fewer padded slots (batch bucket x prompt bucket) are never packed, and at most this many
# packed layouts are compiled per prefill shape (see Sampler._pack).
PACK_MIN_SLOTS = 512
PACK_MAX_LAYOUTS = 4
# On CPU the sampler keeps an [out, in] copy of every Linear kernel for the decode steps' few-row
# products (``easytunix.layers.linear.out_major_kernels``: ~13% off a SmolLM2-135M decode step at 16
# rows), made once per weights (again only after they change), when all the copies together take at
# most this many bytes. 0 turns the copies off (the programs then retrace once).
OUT_MAJOR_MAX_BYTES = 2 << 30


@dataclasses.dataclass
class SampleState:
  """A prefilled batch, ready to decode (see ``Sampler.init_sample_state``).

  Attributes:
    cache: the KV cache with the prompts written, [batch bucket, cache length].
    logits: the logits of each row's last prompt token [batch bucket, vocab].
    key_valid: which cache slots hold real tokens [batch bucket, cache length].
    positions: the position of each row's next token [batch bucket].
    padded_prompt_tokens: the left-padded prompts [batch bucket, prompt bucket].
    prompt_lengths: the real length of each prompt.
    num_prompts: how many prompts (the first rows; the rest pad the bucket).
    steps_bucket: how many generated tokens the output buffers hold.
  """

  cache: KVCache
  logits: jax.Array
  key_valid: jax.Array
  positions: jax.Array
  padded_prompt_tokens: np.ndarray
  prompt_lengths: list[int]
  num_prompts: int
  steps_bucket: int


class _Packed(NamedTuple):
  """A packed prefill's inputs (see ``Sampler._pack``).

  ``ragged``: one row for the projections, attention in the left-padded rows (``RaggedLayout``);
  otherwise several rows with a block-diagonal mask. ``tokens``, ``positions`` and ``segments``
  (the prompt of each slot, -1 for an empty one) are [rows, width]; ``src`` [batch bucket, prompt
  bucket] the packed slot (``row * width + col``) each left-padded slot takes, ``dst`` [rows * width]
  the left-padded slot (``b * prompt bucket + p``) each packed slot's output comes from, and
  ``last`` [batch bucket] the packed slot of each prompt's last token.
  """

  ragged: bool
  tokens: np.ndarray
  positions: np.ndarray
  segments: np.ndarray
  src: np.ndarray
  last: np.ndarray
  dst: np.ndarray


class _Decode(NamedTuple):
  """The loop carry of the greedy / sampling decode loop."""

  step: jax.Array  # tokens emitted so far (int32 scalar)
  cache: KVCache
  token: jax.Array  # [B] the last emitted token
  key_valid: jax.Array  # [B, S]
  position: jax.Array  # [B] position of ``token``
  done: jax.Array  # [B]
  rng: jax.Array
  tokens: jax.Array  # [B, N]
  logprobs: jax.Array | None  # [B, N]
  logits: jax.Array | None  # [B, N, V]


# ----------------------------------------------------------------------------- the sampler


class Sampler(BaseSampler):
  """Generates text with a KV-cached transformer.

  Args:
    transformer: an NNX causal LM called as ``model(tokens, positions, cache,
      attention_mask) -> (logits, cache)`` (every easytunix model).
    tokenizer: a TokenizerAdapter (or a ``tokenizers.Tokenizer``, a
      SentencePieceProcessor, or any object with ``encode``/``decode``); may be
      None when prompts are given as token ids.
    cache_config: the KV cache shape; ``CacheConfig.for_model(model, cache_size)``.

  Weights: the sampler holds the model's variables (not copies), so an
  optimizer updating ``transformer`` in place is seen by the next call. To swap
  in other weights use ``update_params(model_or_state)``; shapes and dtypes must
  stay the same, and nothing recompiles.

  Memory: on CPU (one device) the sampler also keeps an [out, in] copy of each
  Linear kernel, which its decode steps and short prefills (up to 64 tokens, see
  ``OUT_MAJOR_ROWS`` in ``easytunix.layers.linear``) multiply by (SmolLM2-135M,
  16 rows: ~13% faster); it is made at the first call and again after the
  kernels change, and skipped when the copies would exceed ``OUT_MAJOR_MAX_BYTES`` (2 GiB; set the
  module's constant to 0 to turn them off).
  """

  def __init__(self, transformer: nnx.Module, tokenizer: Any, cache_config: CacheConfig):
    if not isinstance(transformer, nnx.Module):
      raise TypeError(f"transformer must be an nnx.Module (an easytunix model), got {type(transformer).__name__}.")
    if not isinstance(cache_config, CacheConfig):
      raise TypeError(
          f"cache_config must be a CacheConfig (e.g. CacheConfig.for_model(model, cache_size=1024)), "
          f"got {type(cache_config).__name__}."
      )
    self._check_cache_matches(transformer, cache_config)
    release_memory_after_compiles()
    config = getattr(transformer, "config", None)
    super().__init__(tokenizer, getattr(config, "vocab_size", None))
    self.transformer = commit_model(transformer)  # the same programs before and after a trainer's steps
    self.cache_config = cache_config
    self._graphdef, self._state = nnx.split(transformer)
    self._signature = self._abstract(self._state)
    model_dtype = getattr(config, "dtype", None)
    self.cache_dtype = jnp.dtype(cache_config.dtype if cache_config.dtype is not None else model_dtype or jnp.float32)
    self._rng = jax.random.key(0)
    self._trace_counts: collections.Counter = collections.Counter()
    # (batch bucket, prompt bucket, cache length) -> the compiled packed layouts (rows, width); see _pack
    self._packed_layouts: dict[tuple[int, int, int], list[tuple[int, int]]] = {}
    # On a mesh, every program is traced under it (as the trainers' steps are), so the model's activation
    # constraints apply: the batch stays split over the data axes instead of being left to propagation.
    self.mesh = module_mesh(transformer)
    on_mesh = self._on_mesh
    self._prefill_jit = jax.jit(on_mesh(self._prefill_impl), static_argnames=("cache_len",))
    self._prefill_packed_jit = jax.jit(on_mesh(self._prefill_packed_impl), static_argnames=("cache_len",))
    self._prefill_ragged_jit = jax.jit(on_mesh(self._prefill_ragged_impl), static_argnames=("cache_len",))
    # Models that take a RaggedLayout as their attention mask (every easytunix model) prefill in it.
    self._ragged = bool(getattr(transformer, "accepts_ragged_layout", False))
    self._decode_jit = jax.jit(
        on_mesh(self._decode_impl), static_argnames=("mode", "out_len"), donate_argnames=("cache",))
    self._beam_jit = jax.jit(
        on_mesh(self._beam_impl),
        static_argnames=("beam_size", "out_len", "early_stopping", "return_logprobs"),
    )
    # The [out, in] kernel copies (see OUT_MAJOR_MAX_BYTES) and weak references to the kernels they copy.
    self._out_major: dict[str, jax.Array] | None = None
    self._out_major_source: list[weakref.ref] = []
    self._out_major_targets: tuple[nnx.Module | None, list] = (None, [])
    self._first_jit = jax.jit(self._first_impl, static_argnames=("mode",))
    self._step_jit = jax.jit(on_mesh(self._step_impl), static_argnames=("mode",), donate_argnames=("cache",))

  def _on_mesh(self, fn):
    """``fn`` traced under the model's mesh (:func:`~easytunix.layers.sharding.mesh_context`)."""

    @functools.wraps(fn)
    def traced(*args, **kwargs):
      with mesh_context(self.mesh):
        return fn(*args, **kwargs)

    return traced

  # ------------------------------------------------------------------ weights

  @staticmethod
  def _check_cache_matches(model: Any, cache: CacheConfig) -> None:
    config = getattr(model, "config", None)
    for name in ("num_layers", "num_kv_heads", "head_dim"):
      want = getattr(config, name, None)
      if want is not None and want != getattr(cache, name):
        raise ValueError(
            f"CacheConfig.{name}={getattr(cache, name)} does not match the model ({want}); "
            "build it with CacheConfig.for_model(model, cache_size=...)."
        )

  @staticmethod
  def _abstract(state: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)), state)

  @property
  def transformer_state(self) -> nnx.State:
    """The model's variables, as passed to the jitted functions."""
    return self._state

  @transformer_state.setter
  def transformer_state(self, state: Any) -> None:
    self.update_params(state)

  def update_params(self, new: Any, filter_types: tuple[Any, ...] | None = None) -> None:
    """Uses new weights from now on, without recompiling.

    ``filter_types`` (Tunix): only the variables of these types (e.g.
    ``(nnx.LoRAParam,)``) of ``new`` are taken.

    Args:
      new: a model of the same architecture (its variables are used from now
        on), or an ``nnx.State`` / nested dict of arrays (all or some of the
        variables, e.g. only the LoRA ones), which is written into
        ``self.transformer`` in place.

    Raises:
      ValueError: if a shape or dtype differs from the current weights (that
        would be another model and would recompile; build a new Sampler).
    """
    if filter_types:
      if isinstance(new, nnx.Module):
        new = nnx.state(new, *filter_types)
      elif isinstance(new, nnx.State):
        new = new.filter(*filter_types)
    if isinstance(new, nnx.Module):
      graphdef, state = nnx.split(commit_model(new))
      if graphdef != self._graphdef:
        raise ValueError(
            "update_params got a model with a different structure (another architecture, or LoRA "
            "added/removed); build a new Sampler for it."
        )
      self._check_signature(state)
      self.transformer, self._state = new, state
      self.mesh = module_mesh(new)  # a model placed elsewhere retraces (new input shardings) under its mesh
      return
    new = self._placed(new, self._check_incoming(new))
    before = jax.tree.map(lambda x: x, self._state)  # a snapshot to roll back to
    nnx.update(self.transformer, new)
    try:
      self._check_signature(self._state)
    except ValueError:
      nnx.update(self.transformer, before)
      raise

  def _check_incoming(self, new: Any) -> dict[tuple[str, ...], Any]:
    """A ValueError naming the first variable of ``new`` that the model lacks or holds in another shape/dtype.

    Returns:
      The model's current leaves by path (what ``_placed`` places ``new`` like).
    """
    if isinstance(new, nnx.State):
      new = nnx.to_pure_dict(new)
    if not isinstance(new, dict):
      raise TypeError(
          f"transformer_state / update_params takes a model, an nnx.State or a nested dict, got {type(new).__name__}."
      )
    have = _flat_leaves(nnx.to_pure_dict(self._state))
    got = _flat_leaves(new)
    unknown = [path for path in got if path not in have]
    if unknown:
      names = [".".join(p) for p in unknown[:3]]
      raise ValueError(
          f"transformer_state mismatch: {len(unknown)} variable(s) are not in the sampler's model, e.g. {names} "
          "(LoRA weights for a model without LoRA, or another architecture?). Build a new Sampler for that model."
      )
    for path, value in got.items():
      want = have[path]
      if np.shape(value) != np.shape(want) or jnp.result_type(value) != jnp.result_type(want):
        raise ValueError(
            f"transformer_state mismatch: {'.'.join(path)} is {jnp.result_type(value)}{list(np.shape(value))} but "
            f"the sampler's model has {jnp.result_type(want)}{list(np.shape(want))}; pass weights of the same "
            "shapes and dtypes, or build a new Sampler."
        )
    return have

  def _placed(self, new: Any, have: dict[tuple[str, ...], Any]) -> Any:
    """``new`` with each array where the weight it replaces lives (``have``: from ``_check_incoming``)."""
    if isinstance(new, nnx.State):
      new = nnx.to_pure_dict(new)

    def walk(tree: Any, prefix: tuple[str, ...]) -> Any:
      if isinstance(tree, dict):
        return {key: walk(value, prefix + (str(key),)) for key, value in tree.items()}
      return _placed_like(tree, have[prefix])

    return walk(new, ())

  def _check_signature(self, state: Any) -> None:
    got = self._abstract(state)
    paths_want = jax.tree_util.tree_flatten_with_path(self._signature)[0]
    paths_got = jax.tree_util.tree_flatten_with_path(got)[0]
    if len(paths_want) != len(paths_got):
      raise ValueError("update_params: the new weights have a different set of variables; build a new Sampler.")
    for (path, want), (_, have) in zip(paths_want, paths_got):
      if want.shape != have.shape or want.dtype != have.dtype:
        raise ValueError(
            f"update_params: {jax.tree_util.keystr(path)} is {have.dtype}{list(have.shape)} but the sampler was "
            f"built for {want.dtype}{list(want.shape)}; pass weights of the same shapes and dtypes."
        )

  def _params(self) -> Any:
    """The current weights; weak-typed leaves (left by in-place updates with Python scalars) are made
    strong so they hit the same compiled programs."""
    state = self._state
    if any(getattr(x, "weak_type", False) for x in jax.tree.leaves(state)):
      state = jax.tree.map(lambda x: jnp.asarray(x, x.dtype) if getattr(x, "weak_type", False) else x, state)
    return state

  def _weights(self) -> tuple[Any, dict[str, jax.Array] | None]:
    """What the jitted functions take as ``weights``: the current variables and the [out, in] kernel copies."""
    return self._params(), self._out_major_kernels()

  def _out_major_kernels(self) -> dict[str, jax.Array] | None:
    """The [out, in] copies of the current Linear kernels (see ``OUT_MAJOR_MAX_BYTES``), or None.

    Made again whenever a kernel is not the array copied last time (an optimizer step, ``update_params``
    or another model): a copy never outlives the weights it was made from.
    """
    if jax.default_backend() != "cpu" or (self.mesh is not None and self.mesh.size > 1):
      return None
    if self._out_major_targets[0] is not self.transformer:  # walking the model takes ~10 ms: once per model
      self._out_major_targets = (self.transformer, out_major_targets(self.transformer))
    targets = self._out_major_targets[1]
    kernels = [_current_array(m.kernel) for _, m in targets]
    if not kernels or sum(k.size * jnp.dtype(m.dtype).itemsize for k, (_, m) in zip(kernels, targets)) > (
        OUT_MAJOR_MAX_BYTES):
      self._out_major, self._out_major_source = None, []
      return None
    if len(kernels) == len(self._out_major_source) and all(
        ref() is k for ref, k in zip(self._out_major_source, kernels)):
      return self._out_major
    self._out_major = None  # release the stale copies before making new ones
    self._out_major = out_major_copies({path: k.astype(m.dtype) for k, (path, m) in zip(kernels, targets)})
    self._out_major_source = [weakref.ref(k) for k in kernels]
    return self._out_major

  @property
  def trace_counts(self) -> dict[str, int]:
    """How many times each jitted function was traced (= compiled): prefill, decode, beam, first, step."""
    return dict(self._trace_counts)

  # ------------------------------------------------------------------ tokens in

  def _eos_array(self, eos_tokens: Any) -> tuple[np.ndarray, tuple[int, ...]]:
    """(EOS ids padded with -1 to a fixed number of slots, the EOS ids)."""
    eos = self._eos_ids(eos_tokens)
    slots = bucket(len(eos), _EOS_SLOTS)
    arr = np.full((slots,), -1, np.int32)
    arr[: len(eos)] = eos
    return arr, eos

  # ------------------------------------------------------------------ buckets

  def _plan(
      self, lengths: list[int], max_generation_steps: int, max_prompt_length: int | None = None
  ) -> tuple[int, int, int, int]:
    """(batch bucket, prompt bucket, steps bucket, cache length) for these prompts; validates the sizes.

    ``max_prompt_length`` (when the prompts fit in it) is the prompt width, so
    calls with other prompt lengths reuse one compiled program (as Tunix).
    """
    cfg = self.cache_config
    batch = len(lengths)
    if cfg.max_batch_size is not None and batch > cfg.max_batch_size:
      raise ValueError(
          f"Got {batch} prompts but CacheConfig.max_batch_size is {cfg.max_batch_size}; "
          "split the batch or raise max_batch_size."
      )
    longest = max(lengths)
    if longest + max_generation_steps > cfg.cache_size:
      raise ValueError(
          f"The longest prompt has {longest} tokens; with max_generation_steps={max_generation_steps} that is "
          f"{longest + max_generation_steps} tokens, more than the cache holds (cache_size={cfg.cache_size}). "
          "Raise CacheConfig.cache_size, or shorten the prompt or the generation."
      )
    batch_bucket = fine_bucket(batch, 1)
    if cfg.max_batch_size is not None:
      batch_bucket = min(batch_bucket, cfg.max_batch_size)
    # The prefill's cost is its padded width: beyond 32 tokens, four widths per octave (padding
    # under a quarter); the decode program sees only the coarser cache length below.
    prompt_bucket = fine_bucket(longest, MIN_PROMPT_BUCKET, per_octave=4 if longest > 32 else 2)
    if max_prompt_length is not None and longest <= max_prompt_length <= cfg.cache_size - max_generation_steps:
      prompt_bucket = int(max_prompt_length)
    # The step budget only sizes buffers (the loop bound is a runtime value): powers of two suffice.
    steps_bucket = bucket(max_generation_steps, MIN_STEPS_BUCKET)
    if prompt_bucket + steps_bucket > cfg.cache_size:
      steps_bucket = max(max_generation_steps, cfg.cache_size - prompt_bucket)
      prompt_bucket = min(prompt_bucket, cfg.cache_size - steps_bucket)
    cache_len = min(fine_bucket(prompt_bucket + steps_bucket, 1), cfg.cache_size)
    return batch_bucket, prompt_bucket, steps_bucket, cache_len

  # ------------------------------------------------------------------ jitted pieces

  @contextlib.contextmanager
  def _model(self, weights) -> Iterator[nnx.Module]:
    """The model of ``weights`` (from ``_weights``), its Linear layers taking the kernel copies within the block."""
    params, copies = weights
    model = nnx.merge(self._graphdef, params)
    with out_major_kernels(model, copies):
      yield model

  def _prefill_impl(self, weights, tokens, valid, *, cache_len: int):
    """Runs the left-padded prompts [B, P] through the model into a fresh cache of ``cache_len`` slots."""
    self._trace_counts["prefill"] += 1
    p = tokens.shape[1]
    cache, key_valid = self._empty_cache(tokens.shape[0], cache_len), _key_valid(valid, cache_len)
    mask = make_decode_mask(key_valid, 0, p)
    with self._model(weights) as model:
      last_logits, cache = _picked_logits(model, tokens, positions_from_mask(valid), cache, mask, lambda x: x[:, -1])
    return _prefilled(cache, last_logits, valid, cache_len)

  def _empty_cache(self, rows: int, slots: int) -> KVCache:
    cfg = self.cache_config
    return init_cache(cfg.num_layers, rows, slots, cfg.num_kv_heads, cfg.head_dim, self.cache_dtype)

  def _pack(
      self, ids: list[Sequence[int]], batch_bucket: int, prompt_bucket: int, cache_len: int = 0
  ) -> _Packed | None:
    """The packed prefill's inputs for these prompts, or None when packing would not pay.

    Left-padded, the prefill computes ``batch x prompt bucket`` token slots, most of them padding
    when the prompts' lengths differ (16 chat prompts of 35-54 tokens: 896 slots for 657 tokens).
    Two packed layouts compute fewer:

    - ragged (easytunix models, see ``RaggedLayout``): the prompts end to end in one row of
      ``width`` slots for every projection and MLP, while each attention layer attends in the
      left-padded rows, gathered from and scattered back to that row. Prompts that begin alike
      share the slots of their common prefix (``share_prefixes``): those 16 chat prompts open with
      the same 24-token system prompt, so their 657 tokens take 297 slots (a bucket of 304). A
      prompt repeated for several samples takes its slots once. Attention keeps the padded cost,
      so the layout scores ``width + batch * prompt^2 / 2048``.
    - rows: the prompts end to end in fewer, wider rows (first fit, longest first), attending only
      within their own slots (a block-diagonal causal mask); their keys and values are then gathered
      into the usual left-padded cache. Wider rows cost dense attention over more slots, so
      ``rows x width`` scores ``slots * (1 + width / 2048)``. This one wins when one long prompt
      would make the left-padded attention dear.

    The best-scoring layout is used when it scores under 90% of the padded prefill. Decoding is the
    same after any of them. Every layout is one more program to compile, so: row counts and widths
    are bucketed; a layout already compiled for this shape is reused whenever it fits and scores
    within 10% of the best new one; at most ``PACK_MAX_LAYOUTS`` layouts are compiled per (batch
    bucket, prompt bucket, cache length), after which batches that fit none of them are padded;
    small prefills (under ``PACK_MIN_SLOTS`` padded slots, where a compile costs more than the
    padding) and models on a multi-device mesh (its rows are what the mesh splits) are never packed.

    Returns:
      A ``_Packed`` (its ``ragged`` flag says which layout), or None.
    """
    if batch_bucket * prompt_bucket < PACK_MIN_SLOTS or (self.mesh is not None and self.mesh.size > 1):
      return None
    lengths = [len(x) for x in ids]
    total = sum(lengths)
    attention = batch_bucket * prompt_bucket**2 / 2048  # the ragged layout's (left-padded) attention

    def cost(rows: int, width: int) -> float:  # rows == 0: the ragged layout of ``width`` slots
      return width + attention if rows == 0 else rows * width * (1 + width / 2048)

    limit = 0.9 * cost(batch_bucket, prompt_bucket)

    slots, unique = share_prefixes(ids) if self._ragged else ([], total)

    def fits(rows: int, width: int) -> list[np.ndarray] | None:  # each prompt's slots, or None
      if rows == 0:
        return slots if unique <= width else None
      if width < max(lengths):
        return None
      placed = pack_rows(lengths, width)
      if max(r for r, _ in placed) >= rows:
        return None
      return [row * width + offset + np.arange(n) for n, (row, offset) in zip(lengths, placed)]

    candidates = []  # each bucketed row count with the narrowest bucketed width that fits
    if self._ragged:
      candidates.append((0, fine_bucket(unique, MIN_PROMPT_BUCKET, per_octave=16)))
    rows = 1
    while rows < batch_bucket:
      width = fine_bucket(max(max(lengths), -(-total // rows)), MIN_PROMPT_BUCKET, per_octave=4)
      for _ in range(3):
        if fits(rows, width) is not None:
          candidates.append((rows, width))
          break
        width = fine_bucket(width + 1, MIN_PROMPT_BUCKET, per_octave=4)
      rows = fine_bucket(rows + 1, 1)
    new = min(((cost(r, w), r, w) for r, w in candidates if cost(r, w) < limit), default=None)
    known = self._packed_layouts.setdefault((batch_bucket, prompt_bucket, cache_len), [])
    old = min(((cost(r, w), r, w) for r, w in known if cost(r, w) < limit and fits(r, w) is not None), default=None)
    if old is not None and (new is None or old[0] <= 1.1 * new[0]):
      _, rows, width = old
    elif new is not None and len(known) < PACK_MAX_LAYOUTS:
      _, rows, width = new
      known.append((rows, width))
    else:
      return None
    placed = fits(rows, width)
    tokens = np.full((max(rows, 1), width), self._pad_id(), np.int32)
    positions = np.zeros((max(rows, 1), width), np.int32)
    segments = np.full((max(rows, 1), width), -1, np.int32)
    src = np.zeros((batch_bucket, prompt_bucket), np.int32)
    last = np.zeros((batch_bucket,), np.int32)
    dst = np.zeros((tokens.size,), np.int32)
    for i, (x, at) in enumerate(zip(ids, placed)):  # ``at``: the prompt's flat slots (row * width + col)
      n = len(x)
      tokens.flat[at] = x
      positions.flat[at] = np.arange(n)
      segments.flat[at] = i  # a shared slot: the last prompt that holds it (the ragged layout reads no segments)
      src[i, prompt_bucket - n :] = at
      dst[at] = i * prompt_bucket + prompt_bucket - n + np.arange(n)  # a shared slot: any row that holds it
      last[i] = at[-1]
    return _Packed(rows == 0, tokens, positions, segments, src, last, dst)

  def _prefill_ragged_impl(self, weights, tokens, positions, src, dst, last, valid, *, cache_len: int):
    """``_prefill_impl``'s result from prompts laid end to end in one row [1, N] (see ``RaggedLayout``)."""
    self._trace_counts["prefill"] += 1
    layout = RaggedLayout(src, dst, valid.astype(jnp.bool_))
    pick = lambda x: jnp.take(x[0], last, axis=0)  # noqa: E731
    cache = self._empty_cache(src.shape[0], cache_len)
    with self._model(weights) as model:
      logits, cache = _picked_logits(model, tokens, positions, cache, layout, pick)
    return _prefilled(cache, logits, valid, cache_len)

  def _prefill_packed_impl(self, weights, tokens, positions, segments, src, last, valid, *, cache_len: int):
    """``_prefill_impl``'s result from prompts packed end to end (see ``_pack``)."""
    self._trace_counts["prefill"] += 1
    rows, width = tokens.shape
    causal = jnp.tril(jnp.ones((width, width), jnp.bool_))
    mask = (segments[:, :, None] == segments[:, None, :]) & (segments[:, None, :] >= 0) & causal[None]
    pick = lambda x: jnp.take(x.reshape((-1,) + x.shape[2:]), last, axis=0)  # noqa: E731  (flat slot row * W + col)
    with self._model(weights) as model:
      logits, packed = _picked_logits(model, tokens, positions, self._empty_cache(rows, width), mask, pick)
    cache = gather_slots(packed, src, valid, cache_len)
    return _prefilled(cache, logits, valid, cache_len)

  @staticmethod
  def _forward_one(model, cache, token, key_valid, position):
    """Feeds one token per row at slot ``cache.index``; returns its logits and the new state."""
    slot = cache.index
    b = token.shape[0]
    key_valid = jax.lax.dynamic_update_slice(key_valid, jnp.ones((b, 1), jnp.bool_), (jnp.int32(0), slot))
    mask = make_decode_mask(key_valid, slot, 1)
    logits, cache = model(token[:, None], position[:, None], cache, mask)
    return logits[:, 0].astype(jnp.float32), cache, key_valid

  def _decode_impl(self, weights, cache, logits, key_valid, positions, done, rng, max_steps, knobs, *, mode, out_len):
    """Samples up to ``max_steps`` tokens per row in one while loop; stops early when every row is done."""
    self._trace_counts["decode"] += 1
    with self._model(weights) as model:  # the loop's body is traced within the block
      return self._decode_loop(model, cache, logits, key_valid, positions, done, rng, max_steps, knobs, mode, out_len)

  def _decode_loop(self, model, cache, logits, key_valid, positions, done, rng, max_steps, knobs, mode, out_len):
    b = logits.shape[0]
    token, logprob, done, rng = pick_tokens(logits, done, rng, mode, knobs)
    tokens = jnp.full((b, out_len), knobs.pad, jnp.int32).at[:, 0].set(token)
    logprobs = jnp.zeros((b, out_len), jnp.float32).at[:, 0].set(logprob) if mode.return_logprobs else None
    all_logits = None
    if mode.return_logits:
      all_logits = jnp.zeros((b, out_len, logits.shape[-1]), jnp.float32).at[:, 0].set(logits)
    carry = _Decode(jnp.int32(1), cache, token, key_valid, positions, done, rng, tokens, logprobs, all_logits)

    def cond(c: _Decode):
      return (c.step < max_steps) & ~jnp.all(c.done)

    def body(c: _Decode):
      step_logits, new_cache, new_valid = self._forward_one(model, c.cache, c.token, c.key_valid, c.position)
      tok, lp, new_done, new_rng = pick_tokens(step_logits, c.done, c.rng, mode, knobs)
      zero = jnp.int32(0)
      toks = jax.lax.dynamic_update_slice(c.tokens, tok[:, None], (zero, c.step))
      lps = None if lp is None else jax.lax.dynamic_update_slice(c.logprobs, lp[:, None], (zero, c.step))
      lgs = c.logits
      if lgs is not None:
        lgs = jax.lax.dynamic_update_slice(lgs, step_logits[:, None], (zero, c.step, zero))
      return _Decode(c.step + 1, new_cache, tok, new_valid, c.position + 1, new_done, new_rng, toks, lps, lgs)

    final = jax.lax.while_loop(cond, body, carry)
    # The cache is returned (and dropped by the caller) so that it aliases the donated input
    # and the loop updates it in place.
    return final.tokens, final.logprobs, final.logits, final.step, final.cache

  def _first_impl(self, logits, done, rng, knobs, *, mode):
    """Streaming: the first token, from the prefill logits."""
    self._trace_counts["first"] += 1
    return pick_tokens(logits, done, rng, mode, knobs)

  def _step_impl(self, weights, cache, token, key_valid, position, done, rng, knobs, *, mode):
    """Streaming: feed the last token, pick the next one."""
    self._trace_counts["step"] += 1
    with self._model(weights) as model:
      logits, cache, key_valid = self._forward_one(model, cache, token, key_valid, position)
    tok, lp, done, rng = pick_tokens(logits, done, rng, mode, knobs)
    return tok, lp, (logits if mode.return_logits else None), cache, key_valid, position + 1, done, rng

  def _beam_impl(
      self, weights, cache, logits, key_valid, positions, real_rows, max_steps, eos, pad, length_penalty, *,
      beam_size, out_len, early_stopping, return_logprobs,
  ):
    """Beam search (``easytunix.generate.beam_search``) with this model."""
    self._trace_counts["beam"] += 1
    with self._model(weights) as model:  # the search's loop is traced within the block
      forward = lambda *step: self._forward_one(model, *step)  # noqa: E731
      return beam_search(
          forward, cache, logits, key_valid, positions, real_rows, max_steps, eos, pad, length_penalty,
          beam_size=beam_size, out_len=out_len, early_stopping=early_stopping, return_logprobs=return_logprobs,
      )

  # ------------------------------------------------------------------ public API

  def init_sample_state(
      self, prompts: Any, max_generation_steps: int, max_prompt_length: int | None = None
  ) -> SampleState:
    """Tokenizes, left-pads and prefills the prompts: the state decoding starts from."""
    steps = check_steps(max_generation_steps)
    if max_prompt_length is not None and (not isinstance(max_prompt_length, (int, np.integer)) or max_prompt_length < 1):
      raise ValueError(f"max_prompt_length must be a positive int or None, got {max_prompt_length!r}.")
    ids = self._prompt_ids(prompts)
    lengths = [len(x) for x in ids]
    batch_bucket, prompt_bucket, steps_bucket, cache_len = self._plan(lengths, steps, max_prompt_length)
    tokens, valid = self._left_pad(ids, prompt_bucket, rows=batch_bucket)
    packed = None if max_prompt_length is not None else self._pack(ids, batch_bucket, prompt_bucket, cache_len)
    if packed is None:
      cache, logits, key_valid, positions = self._prefill_jit(
          self._weights(), jnp.asarray(tokens), jnp.asarray(valid), cache_len=cache_len
      )
    else:
      prefill, names = (
          (self._prefill_ragged_jit, ("tokens", "positions", "src", "dst", "last")) if packed.ragged
          else (self._prefill_packed_jit, ("tokens", "positions", "segments", "src", "last"))
      )
      cache, logits, key_valid, positions = prefill(
          self._weights(), *(jnp.asarray(getattr(packed, name)) for name in names), jnp.asarray(valid),
          cache_len=cache_len,
      )
    return SampleState(cache, logits, key_valid, positions, tokens, lengths, len(ids), steps_bucket)

  def _setup(self, temperature, top_p, top_k, beam_size, eos_tokens, forbidden_tokens, return_logprobs, return_logits):
    """Validates the decoding options; returns (mode, knobs, eos tuple)."""
    greedy = self._check_sampling(temperature, top_p, top_k)
    if beam_size is not None:
      if not isinstance(beam_size, (int, np.integer)) or isinstance(beam_size, bool) or beam_size < 1:
        raise ValueError(f"beam_size must be a positive int, got {beam_size!r}.")
      if not greedy or top_p is not None or top_k is not None:
        raise ValueError(
            "beam_size cannot be combined with sampling (temperature > 0, top_p or top_k): beam search is "
            "deterministic. Use beam_size with temperature=0, or sampling without beam_size."
        )
    if self.vocab_size is not None and top_k is not None:
      top_k = min(int(top_k), self.vocab_size)
    eos_arr, eos = self._eos_array(eos_tokens)
    bias = None
    if forbidden_tokens:
      if self.vocab_size is None:
        raise ValueError("forbidden_tokens needs a model whose config has vocab_size.")
      forbidden = [as_id(t) for t in forbidden_tokens]
      if min(forbidden) < 0 or max(forbidden) >= self.vocab_size:
        raise ValueError(f"forbidden_tokens must be ids in [0, {self.vocab_size}), got {forbidden}.")
      bias_np = np.zeros((self.vocab_size,), np.float32)
      bias_np[forbidden] = -np.inf
      bias = jnp.asarray(bias_np)
    use_top_p = (not greedy) and top_p is not None and top_p < 1.0
    mode = DecodeMode(
        greedy=greedy,
        top_k=None if greedy else (int(top_k) if top_k is not None else None),
        use_top_p=use_top_p,
        forbid=bias is not None,
        return_logprobs=bool(return_logprobs),
        return_logits=bool(return_logits),
    )
    knobs = DecodeKnobs(
        temperature=jnp.float32(temperature or 1.0),
        top_p=jnp.float32(top_p if use_top_p else 1.0),
        eos=jnp.asarray(eos_arr),
        pad=jnp.int32(self._pad_id()),
        bias=bias,
    )
    return mode, knobs, eos

  def _next_rng(self, seed: Any) -> jax.Array:
    if seed is None:
      self._rng, key = jax.random.split(self._rng)
      return key
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
      return jax.random.key(int(seed))
    if isinstance(seed, jax.Array):
      return seed if jnp.issubdtype(seed.dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(seed)
    raise TypeError(f"seed must be an int, a JAX PRNG key or None, got {type(seed).__name__}.")

  def __call__(
      self,
      prompts: Sequence[str] | Sequence[Sequence[int]] | None = None,
      max_generation_steps: int | None = None,
      max_prompt_length: int | None = None,
      echo: bool = False,
      return_logits: bool = False,
      eos_tokens: Sequence[int] | None = None,
      forbidden_tokens: Sequence[int | str] | None = None,
      temperature: float | None = None,
      top_p: float | None = None,
      top_k: int | None = None,
      beam_size: int | None = None,
      seed: int | jax.Array | None = None,
      pad_output: bool = False,
      *,
      input_strings: str | Sequence[str] | None = None,
      total_generation_steps: int | None = None,
      return_logprobs: bool = False,
      early_stopping: bool | str = False,
      length_penalty: float = 1.0,
  ) -> SamplerOutput:
    """Generates a continuation of each prompt.

    Positional arguments follow Tunix's ``Sampler.__call__`` order, and its
    keywords work: ``input_strings`` (a list, or one string) for ``prompts``
    and ``total_generation_steps`` for ``max_generation_steps``.

    Args:
      prompts: strings (needs a tokenizer) or lists of token ids.
      max_generation_steps: the most tokens to generate per prompt.
      max_prompt_length: pad prompts to this width when they fit (a fixed
        shape: other prompt lengths reuse the compiled programs).
      echo: put the prompt in front of ``text`` and ``tokens``.
      return_logits: fill ``SamplerOutput.logits`` (vocabulary-sized per token).
      eos_tokens: ids that end a row (default: the tokenizer's ``eos_ids``;
        ``[]`` never stops early).
      forbidden_tokens: ids (or token strings, each one token) never generated.
      temperature: 0 or None for greedy decoding; > 0 samples.
      top_p: nucleus sampling mass in (0, 1] (sampling only).
      top_k: sample among the k most likely tokens (sampling only).
      beam_size: beam search with this many beams (greedy only); returns the best beam.
      seed: an int or PRNG key for sampling; None draws a fresh key from the
        sampler's own stream (different samples on every call).
      pad_output: ``tokens`` (and ``logits``) as one array right-padded with the
        pad id (zeros) to ``max_generation_steps`` (plus the prompt width with ``echo``).
      input_strings: Tunix's name for ``prompts``.
      total_generation_steps: Tunix's name for ``max_generation_steps``.
      return_logprobs: fill ``SamplerOutput.logprobs``.
      early_stopping: beam search only, as in transformers: False (default:
        stop when no running beam can beat the finished ones, judged at the
        current length), True (stop once ``beam_size`` hypotheses finished) or
        "never" (judge at the maximum length).
      length_penalty: beam search only: finished scores are divided by
        ``generated_length ** length_penalty``.

    Returns:
      A SamplerOutput.
    """
    prompts, max_generation_steps = self._tunix_arguments(
        prompts, max_generation_steps, input_strings, total_generation_steps
    )
    forbidden_tokens = self._forbidden_ids(forbidden_tokens)
    mode, knobs, eos = self._setup(
        temperature, top_p, top_k, beam_size, eos_tokens, forbidden_tokens, return_logprobs, return_logits
    )
    if beam_size is not None:
      check_early_stopping(early_stopping)
      if return_logits:
        raise ValueError("return_logits is not supported with beam search; use return_logprobs.")
      if forbidden_tokens:
        raise ValueError("forbidden_tokens is not supported with beam search.")
    state = self.init_sample_state(prompts, max_generation_steps, max_prompt_length)
    steps = int(max_generation_steps)
    real_rows = np.arange(state.logits.shape[0]) < state.num_prompts
    if beam_size is not None:
      seqs, lps, _ = self._beam_jit(
          self._weights(), state.cache, state.logits, state.key_valid, state.positions, jnp.asarray(real_rows),
          jnp.int32(steps), jnp.asarray(np.asarray(eos, np.int32)), knobs.pad, jnp.float32(length_penalty),
          beam_size=int(beam_size), out_len=state.steps_bucket, early_stopping=early_stopping,
          return_logprobs=bool(return_logprobs),
      )
      tokens, logprobs, logits, ran = seqs, lps, None, steps
    else:
      tokens, logprobs, logits, ran, _ = self._decode_jit(
          self._weights(), state.cache, state.logits, state.key_valid, state.positions, jnp.asarray(~real_rows),
          self._next_rng(seed), jnp.int32(steps), knobs, mode=mode, out_len=state.steps_bucket,
      )
    state.cache = None  # donated
    out = self._finish(state, tokens, logprobs, logits, int(ran), eos, echo)
    if pad_output:
      width = steps + (state.padded_prompt_tokens.shape[1] if echo else 0)
      out = self._pad_output(out, width)
    return out

  def _finish(self, state: SampleState, tokens, logprobs, logits, ran: int, eos, echo: bool) -> SamplerOutput:
    """The SamplerOutput of the first ``ran`` steps of each real row."""
    n = state.num_prompts
    pick = lambda x: None if x is None else np.asarray(x[:n, :ran])  # noqa: E731
    return self._assemble(
        self._prompts_of(state), np.asarray(tokens[:n, :ran]), eos, echo, state.padded_prompt_tokens[:n],
        logprobs=pick(logprobs), logits=pick(logits),
    )

  @staticmethod
  def _prompts_of(state: SampleState) -> list[np.ndarray]:
    """Each real row's prompt ids, cut out of the left-padded prompts."""
    width = state.padded_prompt_tokens.shape[1]
    return [state.padded_prompt_tokens[i, width - state.prompt_lengths[i] :] for i in range(state.num_prompts)]

  def stream(
      self,
      prompts: Sequence[str] | Sequence[Sequence[int]],
      max_generation_steps: int,
      *,
      temperature: float | None = None,
      top_p: float | None = None,
      top_k: int | None = None,
      seed: int | jax.Array | None = None,
      eos_tokens: Sequence[int] | None = None,
      echo: bool = False,
      forbidden_tokens: Sequence[int] | None = None,
  ) -> Iterator[StreamChunk]:
    """Yields each step's new text and token ids per row, as they are generated.

    Joining a row's ``text`` pieces gives the ``text`` of the same non-streaming
    call (same arguments and seed). Text is held back while the last tokens end
    in an incomplete character. Beam search does not stream.
    """
    mode, knobs, eos = self._setup(temperature, top_p, top_k, None, eos_tokens, forbidden_tokens, False, False)
    state = self.init_sample_state(prompts, max_generation_steps)
    return self._stream(state, mode, knobs, eos, int(max_generation_steps), self._next_rng(seed), echo)

  def _stream(self, state, mode, knobs, eos, steps, rng, echo) -> Iterator[StreamChunk]:
    prompts = [p.tolist() for p in self._prompts_of(state)]
    cache, key_valid, position = state.cache, state.key_valid, state.positions
    logits, rows = state.logits, state.logits.shape[0]
    state.cache = None

    def step_tokens() -> Iterator[np.ndarray]:
      done = jnp.asarray(np.arange(rows) >= state.num_prompts)
      token, _, done, key = self._first_jit(logits, done, rng, knobs, mode=mode)
      cache_, valid_, position_ = cache, key_valid, position
      for step in range(steps):
        if step > 0:
          token, _, _, cache_, valid_, position_, done, key = self._step_jit(
              self._weights(), cache_, token, valid_, position_, done, key, knobs, mode=mode
          )
        yield np.asarray(token)

    return stream_chunks(prompts, step_tokens(), self._decode_text, eos, steps, echo)


def _current_array(variable: nnx.Variable) -> Any:
  """``variable.get_value()`` without its copy: the stored array itself when no hook reads it.

  ``get_value`` copies the value's pytree and runs the ``on_get_value`` hooks (~5 us a call), which
  over a model's ~200 kernels was ~1 ms of every ``Sampler`` call; the kernel check needs only the array.
  """
  raw = variable.get_raw_value() if hasattr(variable, "get_raw_value") else None
  if isinstance(raw, jax.Array) and variable.get_metadata("on_get_value", None) is None:
    return raw
  return variable.get_value()


def _placed_like(value: Any, current: Any) -> Any:
  """``value`` on the sharding of ``current``, the weight it replaces (pinned: see ``commit_model``).

  The compiled prefill/decode programs are specialised to their inputs' shardings: weights that arrive
  placed otherwise (host arrays, another sharding object for the same devices) would compile them again.
  """
  if not isinstance(current, jax.Array) or isinstance(current, jax.core.Tracer) or isinstance(value, jax.core.Tracer):
    return value
  if isinstance(value, jax.Array) and value.committed and value.sharding == current.sharding:
    return value
  return jax.device_put(value, current.sharding)


def _flat_leaves(tree: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  """``{(key, ...): leaf}`` of a nested dict (keys as strings)."""
  if isinstance(tree, dict):
    out: dict[tuple[str, ...], Any] = {}
    for key, value in tree.items():
      out.update(_flat_leaves(value, prefix + (str(key),)))
    return out
  return {prefix: tree}


def _prefilled(cache: KVCache, logits: jax.Array, valid: jax.Array, cache_len: int):
  """Every prefill's result: (cache, float32 last logits, key validity [B, cache_len], next positions [B])."""
  return cache, logits.astype(jnp.float32), _key_valid(valid, cache_len), jnp.sum(valid, axis=-1).astype(jnp.int32)


def _key_valid(valid: jax.Array, cache_len: int) -> jax.Array:
  """[B, cache_len]: the prompt slots' validity [B, P] in the first P slots, the rest not yet valid."""
  return jnp.zeros((valid.shape[0], cache_len), jnp.bool_).at[:, : valid.shape[1]].set(valid)


def _picked_logits(model, tokens, positions, cache, mask, pick):
  """Runs the prompt and returns (the logits of the slots ``pick`` takes from [B, T, ...], cache).

  Projecting every prompt position onto the vocabulary would cost more than the
  rest of the prefill for a big vocabulary, so the hidden states are taken from
  the model and only the picked ones projected with the model's own ``logits``
  (the dead full projection is removed by XLA); an easytunix model takes ``pick``
  itself and runs its last MLP on the picked slots only. The padded prefill picks
  each row's last slot with a slice (on a mesh the rows stay on their devices).
  """
  if getattr(model, "accepts_pick", False):  # easytunix models also skip the last MLP on the other slots
    logits, cache = model(tokens, positions, cache, mask, pick=pick)
    return logits[:, 0], cache
  if not callable(getattr(model, "logits", None)):
    logits, cache = model(tokens, positions, cache, mask)
    return pick(logits), cache
  _, cache, hidden = model(tokens, positions, cache, mask, return_hidden_states=True)
  return model.logits(pick(hidden)), cache
