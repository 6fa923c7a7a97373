"""A JAX-native sampler: KV-cached prefill and decode, greedy / top-p / top-k / beam search, streaming.

How a call runs:

1. Prompts (strings or token-id lists) are tokenized and LEFT-padded into a
   [batch bucket, prompt bucket] array, so every row's last prompt token sits in
   the same slot and each row's positions count from its first real token.
2. ``prefill`` (one jit per (batch bucket, prompt bucket, cache length)) runs the
   prompt through the model once and fills the KV cache.
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

Beam search reproduces transformers 5's ``_beam_search`` (``do_sample=False``)
step for step: each step keeps the ``max(2, 1 + len(eos)) * beam_size`` best
continuations over all beams, the best ``beam_size`` of them that did not stop
keep running, and candidates among the first ``beam_size`` that end with an EOS
(or reach the step budget) join the finished set with score
``sum(logprobs) / generated_length ** length_penalty``. The search stops when no
running beam can beat the worst finished one (``early_stopping``: False judges
at the current length, "never" at the maximum length, True stops as soon as
``beam_size`` hypotheses finished) or when the budget is spent; the best
finished hypothesis is returned.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from easytunix.layers.cache import KVCache, LayerCache, init_cache, make_decode_mask

__all__ = [
    "CacheConfig",
    "SampleState",
    "Sampler",
    "SamplerOutput",
    "StreamChunk",
    "sample_best",
    "sample_top_p",
]

# Smallest buckets: prompts are padded to at least this many tokens and the
# generated-token buffer holds at least this many steps.
MIN_PROMPT_BUCKET = 16
MIN_STEPS_BUCKET = 16
# EOS ids travel as a fixed-size runtime array (padded with -1) so that a
# different stop set does not recompile (more ids: the next power of two).
_EOS_SLOTS = 8
# The "very large negative" score of masked beam candidates (as in transformers).
_BEAM_MASK = -1.0e9
_EARLY_STOPPING = (False, True, "never")


def _round_up(n: int, minimum: int) -> int:
  """The bucket of ``n`` (at least ``minimum``): the next of 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, ...

  Two buckets per octave (powers of two and three quarters of them) keep the
  padding under a third of the work, with few distinct shapes to compile.
  """
  power = _next_power_of_two(n, minimum)
  three_quarters = power // 2 + power // 4
  return three_quarters if power >= 4 and max(n, minimum) <= three_quarters else power


def _next_power_of_two(n: int, minimum: int) -> int:
  n = max(int(n), int(minimum), 1)
  return 1 << (n - 1).bit_length()


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


@dataclasses.dataclass
class SamplerOutput:
  """What a sampler call returns; lists have one entry per prompt.

  Attributes:
    text: the generated text (the prompt too with ``echo``), EOS not included;
      empty strings when the sampler has no tokenizer.
    tokens: the generated token ids, up to and including the EOS token that
      ended the row (the prompt ids first with ``echo``).
    logprobs: with ``return_logprobs``, the log-probability of each generated
      token under the model (log-softmax of the raw logits, before temperature,
      top-k and top-p); None otherwise.
    logits: with ``return_logits``, the raw logits [n_generated, vocab] each
      generated token was chosen from; None otherwise.
    padded_prompt_tokens: the left-padded prompt ids [batch, prompt bucket].
  """

  text: list[str]
  tokens: list[np.ndarray]
  logprobs: list[np.ndarray] | None
  logits: list[np.ndarray] | None
  padded_prompt_tokens: np.ndarray


@dataclasses.dataclass
class StreamChunk:
  """One step of ``Sampler.stream``: what each row added.

  Attributes:
    step: the index of the generated token (0 for the first); -1 for the echoed prompt.
    text: per row, the new text (empty when nothing new is printable yet or the row is done).
    tokens: per row, the new token ids.
    done: per row, whether the row has finished.
  """

  step: int
  text: list[str]
  tokens: list[list[int]]
  done: list[bool]


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


# ----------------------------------------------------------------------------- token selection


def sample_best(logits: jax.Array) -> jax.Array:
  """Greedy decoding: the highest-scoring token id along the last axis (int32)."""
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def _is_python_number(x: Any) -> bool:
  return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def sample_top_p(
    logits: jax.Array,
    key: jax.Array,
    temperature: float | jax.Array = 1.0,
    top_p: float | jax.Array | None = 1.0,
    top_k: int | None = None,
) -> jax.Array:
  """Samples token ids from ``softmax(logits / temperature)`` filtered by top-k, then top-p.

  The order and the rules are those of transformers' warpers: the temperature
  scales the logits; top-k keeps the ``top_k`` largest; top-p keeps the smallest
  set of most likely tokens whose probability reaches ``top_p`` (always at least
  one token). Each row of ``logits`` [..., vocab] is sampled independently.

  Args:
    logits: unnormalised scores, vocabulary on the last axis.
    key: a JAX PRNG key.
    temperature: > 0; may be a traced scalar.
    top_p: in (0, 1]; None or a Python 1.0 skips the filter; may be a traced scalar.
    top_k: a Python int (static: it sets a shape), or None for no top-k filter.

  Returns:
    int32 token ids with the batch shape of ``logits``.
  """
  if top_k is not None and (not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool) or top_k < 1):
    raise ValueError(f"top_k must be a positive Python int or None, got {top_k!r}.")
  if _is_python_number(top_p) and not 0.0 < float(top_p) <= 1.0:
    raise ValueError(f"top_p must be in (0, 1], got {top_p!r}.")
  if _is_python_number(temperature) and float(temperature) <= 0.0:
    raise ValueError(f"temperature must be > 0 for sampling (use sample_best for greedy), got {temperature!r}.")
  logits = logits.astype(jnp.float32) / jnp.asarray(temperature, jnp.float32)
  use_top_p = top_p is not None and not (_is_python_number(top_p) and float(top_p) >= 1.0)
  vocab = logits.shape[-1]
  if top_k is None and not use_top_p:
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
  # Candidates in descending order: the k best, or the whole (sorted) vocabulary.
  values, indices = jax.lax.top_k(logits, min(int(top_k or vocab), vocab))
  if use_top_p:
    probs = jax.nn.softmax(values, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < jnp.asarray(top_p, jnp.float32)
    keep = keep.at[..., 0].set(True)
    values = jnp.where(keep, values, -jnp.inf)
  choice = jax.random.categorical(key, values, axis=-1)
  return jnp.take_along_axis(indices, choice[..., None], axis=-1)[..., 0].astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class _Mode:
  """The static (compile-time) part of a decoding setup."""

  greedy: bool = True
  top_k: int | None = None
  use_top_p: bool = False
  forbid: bool = False
  return_logprobs: bool = False
  return_logits: bool = False


class _Knobs(NamedTuple):
  """The runtime part of a decoding setup (changing it does not recompile)."""

  temperature: jax.Array  # f32 scalar
  top_p: jax.Array  # f32 scalar
  eos: jax.Array  # [n] int32, padded with -1
  pad: jax.Array  # int32 scalar
  bias: jax.Array | None  # [vocab] f32: 0 or -inf (forbidden tokens)


def _pick(logits, done, rng, mode: _Mode, knobs: _Knobs):
  """Chooses each row's next token; finished rows get the pad id.

  Returns (tokens, logprobs or None, new done, new rng).
  """
  logits = logits.astype(jnp.float32)
  if knobs.bias is not None:
    logits = logits + knobs.bias
  rng, key = jax.random.split(rng)
  if mode.greedy:
    tokens = sample_best(logits)
  else:
    tokens = sample_top_p(logits, key, knobs.temperature, knobs.top_p if mode.use_top_p else None, mode.top_k)
  tokens = jnp.where(done, knobs.pad, tokens)
  logprobs = None
  if mode.return_logprobs:
    logprobs = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[:, None], axis=-1)[:, 0]
    logprobs = jnp.where(done, 0.0, logprobs)
  new_done = done | jnp.any(tokens[:, None] == knobs.eos[None, :], axis=-1)
  return tokens, logprobs, new_done, rng


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


class _Beams(NamedTuple):
  """Beam-search state, following transformers' static-shape beam search."""

  run_seqs: jax.Array  # [B, nb, N] running beams' tokens
  run_lps: jax.Array  # [B, nb, N] their per-token log-probabilities
  run_scores: jax.Array  # [B, nb] accumulated log-probability
  fin_seqs: jax.Array  # [B, nb, N] best finished hypotheses
  fin_lps: jax.Array  # [B, nb, N]
  fin_scores: jax.Array  # [B, nb] length-normalised score
  is_fin: jax.Array  # [B, nb] slot holds a finished hypothesis
  improvable: jax.Array  # [B, 1] running beams may still beat the finished ones
  going: jax.Array  # scalar bool: the search continues


# ----------------------------------------------------------------------------- tokenizers


def _as_tokenizer(tokenizer: Any) -> Any:
  """Wraps raw ``tokenizers``/SentencePiece objects in a TokenizerAdapter; keeps others."""
  if tokenizer is None:
    return None
  from easytunix.generate.tokenizer_adapter import TokenizerAdapter, _is_hf_tokenizer, _is_sp_processor

  if isinstance(tokenizer, TokenizerAdapter):
    return tokenizer
  if _is_hf_tokenizer(tokenizer) or _is_sp_processor(tokenizer):
    return TokenizerAdapter(tokenizer)
  if not (callable(getattr(tokenizer, "encode", None)) and callable(getattr(tokenizer, "decode", None))):
    raise TypeError(
        "tokenizer must be a TokenizerAdapter, a tokenizers.Tokenizer, a SentencePieceProcessor or any object "
        f"with encode(text) -> ids and decode(ids); got {type(tokenizer).__name__}."
    )
  return tokenizer


def _tokenizer_eos_ids(tokenizer: Any) -> tuple[int, ...]:
  if tokenizer is None:
    return ()
  ids = getattr(tokenizer, "eos_ids", None)
  if ids is None:
    one = getattr(tokenizer, "eos_id", None)
    one = one() if callable(one) else one
    if one is None:
      one = getattr(tokenizer, "eos_token_id", None)
    ids = [] if one is None else (one if isinstance(one, (list, tuple)) else [one])
  return tuple(int(i) for i in ids if i is not None and int(i) >= 0)


def _tokenizer_pad_id(tokenizer: Any) -> int:
  for name in ("pad_id", "pad_token_id"):
    value = getattr(tokenizer, name, None)
    value = value() if callable(value) else value
    if value is not None and int(value) >= 0:
      return int(value)
  return 0


# ----------------------------------------------------------------------------- the sampler


class Sampler:
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
    self.transformer = transformer
    self.tokenizer = _as_tokenizer(tokenizer)
    self.cache_config = cache_config
    self._graphdef, self._state = nnx.split(transformer)
    self._signature = self._abstract(self._state)
    config = getattr(transformer, "config", None)
    self.vocab_size = getattr(config, "vocab_size", None)
    model_dtype = getattr(config, "dtype", None)
    self.cache_dtype = jnp.dtype(cache_config.dtype if cache_config.dtype is not None else model_dtype or jnp.float32)
    self._rng = jax.random.key(0)
    self._trace_counts: collections.Counter = collections.Counter()
    self._prefill_jit = jax.jit(self._prefill_impl, static_argnames=("cache_len",))
    self._decode_jit = jax.jit(self._decode_impl, static_argnames=("mode", "out_len"), donate_argnames=("cache",))
    self._beam_jit = jax.jit(
        self._beam_impl,
        static_argnames=("beam_size", "out_len", "early_stopping", "return_logprobs"),
    )
    self._first_jit = jax.jit(self._first_impl, static_argnames=("mode",))
    self._step_jit = jax.jit(self._step_impl, static_argnames=("mode",), donate_argnames=("cache",))

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

  def update_params(self, new: Any) -> None:
    """Uses new weights from now on, without recompiling.

    Args:
      new: a model of the same architecture (its variables are used from now
        on), or an ``nnx.State`` / nested dict of arrays (all or some of the
        variables, e.g. only the LoRA ones), which is written into
        ``self.transformer`` in place.

    Raises:
      ValueError: if a shape or dtype differs from the current weights (that
        would be another model and would recompile; build a new Sampler).
    """
    if isinstance(new, nnx.Module):
      graphdef, state = nnx.split(new)
      if graphdef != self._graphdef:
        raise ValueError(
            "update_params got a model with a different structure (another architecture, or LoRA "
            "added/removed); build a new Sampler for it."
        )
      self._check_signature(state)
      self.transformer, self._state = new, state
      return
    before = jax.tree.map(lambda x: x, self._state)  # a snapshot to roll back to
    nnx.update(self.transformer, new)
    try:
      self._check_signature(self._state)
    except ValueError:
      nnx.update(self.transformer, before)
      raise

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

  @property
  def trace_counts(self) -> dict[str, int]:
    """How many times each jitted function was traced (= compiled): prefill, decode, beam, first, step."""
    return dict(self._trace_counts)

  # ------------------------------------------------------------------ tokens in

  def tokenize(self, input_string: str) -> list[int]:
    """The token ids of a prompt (with the tokenizer's special tokens, e.g. BOS)."""
    if self.tokenizer is None:
      raise ValueError("This sampler has no tokenizer; pass prompts as lists of token ids.")
    return [int(i) for i in self.tokenizer.encode(input_string)]

  def _prompt_ids(self, prompts: Any) -> list[list[int]]:
    if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and _is_token_id(prompts[0])):
      raise TypeError(
          "prompts must be a list of prompts (strings or lists of token ids), e.g. ['Hi'] or [[1, 2, 3]], "
          f"not a single {'string' if isinstance(prompts, str) else 'list of ids'}."
      )
    if isinstance(prompts, np.ndarray) and prompts.ndim == 2:
      prompts = prompts.tolist()
    if not isinstance(prompts, Sequence) or isinstance(prompts, (bytes, dict)):
      raise TypeError(f"prompts must be a list of strings or of token-id lists, got {type(prompts).__name__}.")
    if len(prompts) == 0:
      raise ValueError("prompts is empty: pass at least one prompt.")
    out = []
    for i, prompt in enumerate(prompts):
      if isinstance(prompt, str):
        if self.tokenizer is None:
          raise ValueError(
              f"prompt {i} is a string but this sampler has no tokenizer; pass a tokenizer to Sampler(...) "
              "or give prompts as lists of token ids."
          )
        ids = self.tokenize(prompt)
      else:
        try:
          if isinstance(prompt, (np.ndarray, jax.Array)):
            array = np.asarray(prompt)
            if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
              raise TypeError
            ids = array.astype(np.int64).tolist()
          else:
            ids = [_as_id(t) for t in prompt]
        except TypeError:
          raise TypeError(f"prompt {i} must be a string or a list of int token ids, got {prompt!r:.80}.") from None
      if not ids:
        raise ValueError(f"prompt {i} is empty (no tokens): every prompt needs at least one token.")
      if self.vocab_size is not None and (min(ids) < 0 or max(ids) >= self.vocab_size):
        bad = next(t for t in ids if t < 0 or t >= self.vocab_size)
        raise ValueError(f"prompt {i} has token id {bad}, outside the model's vocabulary [0, {self.vocab_size}).")
      out.append(ids)
    return out

  def _eos_array(self, eos_tokens: Any) -> tuple[np.ndarray, tuple[int, ...]]:
    if eos_tokens is None:
      eos = _tokenizer_eos_ids(self.tokenizer)
    else:
      if isinstance(eos_tokens, (int, np.integer)):
        eos_tokens = [eos_tokens]
      try:
        eos = tuple(dict.fromkeys(_as_id(t) for t in eos_tokens))
      except (TypeError, ValueError):
        raise TypeError(f"eos_tokens must be a list of int token ids, got {eos_tokens!r}.") from None
      if any(t < 0 for t in eos):
        raise ValueError(f"eos_tokens must be non-negative ids, got {list(eos)}.")
    slots = _next_power_of_two(len(eos), _EOS_SLOTS)
    arr = np.full((slots,), -1, np.int32)
    arr[: len(eos)] = eos
    return arr, eos

  def _pad_id(self) -> int:
    return _tokenizer_pad_id(self.tokenizer) if self.tokenizer is not None else 0

  # ------------------------------------------------------------------ buckets

  def _plan(self, lengths: list[int], max_generation_steps: int) -> tuple[int, int, int]:
    """(batch bucket, prompt bucket, steps bucket) for these prompts; validates the sizes."""
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
    batch_bucket = _round_up(batch, 1)
    if cfg.max_batch_size is not None:
      batch_bucket = min(batch_bucket, cfg.max_batch_size)
    prompt_bucket = _round_up(longest, MIN_PROMPT_BUCKET)
    # The step budget only sizes buffers (the loop bound is a runtime value): powers of two suffice.
    steps_bucket = _next_power_of_two(max_generation_steps, MIN_STEPS_BUCKET)
    if prompt_bucket + steps_bucket > cfg.cache_size:
      steps_bucket = max(max_generation_steps, cfg.cache_size - prompt_bucket)
      prompt_bucket = min(prompt_bucket, cfg.cache_size - steps_bucket)
    return batch_bucket, prompt_bucket, steps_bucket

  # ------------------------------------------------------------------ jitted pieces

  def _model(self, state):
    return nnx.merge(self._graphdef, state)

  def _prefill_impl(self, state, tokens, valid, *, cache_len: int):
    """Runs the left-padded prompts [B, P] through the model into a fresh cache of ``cache_len`` slots."""
    self._trace_counts["prefill"] += 1
    model = self._model(state)
    b, p = tokens.shape
    cfg = self.cache_config
    cache = init_cache(cfg.num_layers, b, cache_len, cfg.num_kv_heads, cfg.head_dim, self.cache_dtype)
    key_valid = jnp.zeros((b, cache_len), jnp.bool_).at[:, :p].set(valid)
    positions = jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=-1) - 1, 0)
    mask = make_decode_mask(key_valid, 0, p)
    last_logits, cache = _last_token_logits(model, tokens, positions, cache, mask)
    return cache, last_logits.astype(jnp.float32), key_valid, jnp.sum(valid, axis=-1).astype(jnp.int32)

  @staticmethod
  def _forward_one(model, cache, token, key_valid, position):
    """Feeds one token per row at slot ``cache.index``; returns its logits and the new state."""
    slot = cache.index
    b = token.shape[0]
    key_valid = jax.lax.dynamic_update_slice(key_valid, jnp.ones((b, 1), jnp.bool_), (jnp.int32(0), slot))
    mask = make_decode_mask(key_valid, slot, 1)
    logits, cache = model(token[:, None], position[:, None], cache, mask)
    return logits[:, 0].astype(jnp.float32), cache, key_valid

  def _decode_impl(self, state, cache, logits, key_valid, positions, done, rng, max_steps, knobs, *, mode, out_len):
    """Samples up to ``max_steps`` tokens per row in one while loop; stops early when every row is done."""
    self._trace_counts["decode"] += 1
    model = self._model(state)
    b = logits.shape[0]
    token, logprob, done, rng = _pick(logits, done, rng, mode, knobs)
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
      tok, lp, new_done, new_rng = _pick(step_logits, c.done, c.rng, mode, knobs)
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
    return _pick(logits, done, rng, mode, knobs)

  def _step_impl(self, state, cache, token, key_valid, position, done, rng, knobs, *, mode):
    """Streaming: feed the last token, pick the next one."""
    self._trace_counts["step"] += 1
    model = self._model(state)
    logits, cache, key_valid = self._forward_one(model, cache, token, key_valid, position)
    tok, lp, done, rng = _pick(logits, done, rng, mode, knobs)
    return tok, lp, (logits if mode.return_logits else None), cache, key_valid, position + 1, done, rng

  def _beam_impl(
      self, state, cache, logits, key_valid, positions, real_rows, max_steps, eos, pad, length_penalty, *,
      beam_size, out_len, early_stopping, return_logprobs,
  ):
    """Beam search over every row, step for step as transformers' ``_beam_search`` (static shapes)."""
    self._trace_counts["beam"] += 1
    model = self._model(state)
    b, vocab = logits.shape
    nb = beam_size
    k = max(2, 1 + eos.shape[0]) * nb
    n = out_len
    layers = tuple(LayerCache(jnp.repeat(c.k, nb, 0), jnp.repeat(c.v, nb, 0)) for c in cache.layers)
    cache = KVCache(layers, cache.index)
    key_valid = jnp.repeat(key_valid, nb, 0)
    positions = jnp.repeat(positions, nb, 0)
    logits = jnp.repeat(logits, nb, 0)
    neg = jnp.float32(_BEAM_MASK)
    first_slots = jnp.arange(k) < nb
    lp_pow = lambda length: jnp.asarray(length, jnp.float32) ** length_penalty  # noqa: E731

    def gather(x, idx):  # x [B, m, ...], idx [B, j] -> [B, j, ...]
      idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
      return jnp.take_along_axis(x, idx, axis=1)

    def select(t, step_logits, s: _Beams):
      logp = jax.nn.log_softmax(step_logits.astype(jnp.float32), axis=-1).reshape(b, nb * vocab)
      acc = (logp.reshape(b, nb, vocab) + s.run_scores[:, :, None]).reshape(b, nb * vocab)
      topk_scores, topk_idx = jax.lax.top_k(acc, k)
      src = topk_idx // vocab
      tok = (topk_idx % vocab).astype(jnp.int32)
      at_t = (jnp.arange(n) == t)[None, None, :]
      seqs_k = jnp.where(at_t, tok[:, :, None], gather(s.run_seqs, src))
      tok_lp = jnp.take_along_axis(logp, topk_idx, axis=1)
      lps_k = jnp.where(at_t, tok_lp[:, :, None], gather(s.run_lps, src))
      hits = jnp.any(tok[:, :, None] == eos[None, None, :], axis=-1) | (t + 1 >= max_steps)
      # Running beams for the next step: the best candidates that did not stop.
      run_cand = topk_scores + hits.astype(jnp.float32) * neg
      nxt = jax.lax.top_k(run_cand, nb)[1]
      run_seqs, run_lps = gather(seqs_k, nxt), gather(lps_k, nxt)
      run_scores, run_src, run_tok = gather(run_cand, nxt), gather(src, nxt), gather(tok, nxt)
      # Finished hypotheses: merge the ones that just stopped (among the first nb candidates).
      just = hits & first_slots[None, :]
      cand = topk_scores / lp_pow(t + 1)
      if early_stopping is True:
        cand = cand + jnp.all(s.is_fin, axis=-1, keepdims=True).astype(jnp.float32) * neg
      cand = cand + (~s.improvable).astype(jnp.float32) * neg
      cand = cand + (~just).astype(jnp.float32) * neg
      merged_scores = jnp.concatenate([s.fin_scores, cand], axis=1)
      best = jax.lax.top_k(merged_scores, nb)[1]
      fin_seqs = gather(jnp.concatenate([s.fin_seqs, seqs_k], axis=1), best)
      fin_lps = gather(jnp.concatenate([s.fin_lps, lps_k], axis=1), best)
      fin_scores = gather(merged_scores, best)
      is_fin = gather(jnp.concatenate([s.is_fin, just], axis=1), best)
      # Can the running beams still beat the worst finished one?
      length = jnp.where((early_stopping == "never") & (length_penalty > 0.0), max_steps, t + 1)
      best_running = run_scores[:, :1] / lp_pow(length)
      worst_fin = jnp.where(is_fin, jnp.min(fin_scores, axis=1, keepdims=True), neg)
      improvable = s.improvable & jnp.any(best_running > worst_fin, axis=-1, keepdims=True)
      going = jnp.any(improvable) & ~jnp.all(hits)
      if early_stopping is True:
        going = going & ~jnp.all(is_fin)
      new = _Beams(run_seqs, run_lps, run_scores, fin_seqs, fin_lps, fin_scores, is_fin, improvable, going)
      flat_src = (jnp.arange(b)[:, None] * nb + run_src).reshape(-1)
      return new, flat_src, run_tok.reshape(-1)

    init_scores = jnp.where(jnp.arange(nb) == 0, 0.0, neg).astype(jnp.float32)
    pad_seqs = jnp.full((b, nb, n), pad, jnp.int32)
    zeros = jnp.zeros((b, nb, n), jnp.float32)
    # Rows that only pad the batch bucket start finished, so they never keep the loop going.
    real = real_rows[:, None]
    beams = _Beams(
        pad_seqs, zeros, jnp.broadcast_to(init_scores, (b, nb)), pad_seqs, zeros, jnp.full((b, nb), neg),
        jnp.broadcast_to(~real, (b, nb)), real, jnp.bool_(True),
    )
    beams, src, tok = select(jnp.int32(0), logits, beams)

    def cond(c):
      t, _, _, _, _, _, s = c
      return (t < max_steps) & s.going

    def body(c):
      t, cache, key_valid, position, src, tok, s = c
      reordered = KVCache(
          tuple(LayerCache(jnp.take(l.k, src, axis=0), jnp.take(l.v, src, axis=0)) for l in cache.layers), cache.index
      )
      step_logits, cache, key_valid = self._forward_one(model, reordered, tok, key_valid, position)
      s, src, tok = select(t, step_logits, s)
      return t + 1, cache, key_valid, position + 1, src, tok, s

    t, *_, beams = jax.lax.while_loop(cond, body, (jnp.int32(1), cache, key_valid, positions, src, tok, beams))
    return beams.fin_seqs[:, 0], (beams.fin_lps[:, 0] if return_logprobs else None), t

  # ------------------------------------------------------------------ public API

  def init_sample_state(self, prompts: Any, max_generation_steps: int) -> SampleState:
    """Tokenizes, left-pads and prefills the prompts: the state decoding starts from."""
    steps = _check_steps(max_generation_steps)
    ids = self._prompt_ids(prompts)
    lengths = [len(x) for x in ids]
    batch_bucket, prompt_bucket, steps_bucket = self._plan(lengths, steps)
    pad = self._pad_id()
    tokens = np.full((batch_bucket, prompt_bucket), pad, np.int32)
    valid = np.zeros((batch_bucket, prompt_bucket), bool)
    for row, x in enumerate(ids):
      tokens[row, prompt_bucket - len(x) :] = x
      valid[row, prompt_bucket - len(x) :] = True
    cache, logits, key_valid, positions = self._prefill_jit(
        self._params(), jnp.asarray(tokens), jnp.asarray(valid), cache_len=prompt_bucket + steps_bucket
    )
    return SampleState(cache, logits, key_valid, positions, tokens, lengths, len(ids), steps_bucket)

  def _setup(self, temperature, top_p, top_k, beam_size, eos_tokens, forbidden_tokens, return_logprobs, return_logits):
    """Validates the decoding options; returns (mode, knobs, eos tuple)."""
    if temperature is not None and (not _is_python_number(temperature) or temperature < 0):
      raise ValueError(f"temperature must be a number >= 0 (0 or None: greedy), got {temperature!r}.")
    greedy = not temperature
    if top_p is not None and (not _is_python_number(top_p) or not 0.0 < top_p <= 1.0):
      raise ValueError(f"top_p must be in (0, 1], got {top_p!r}.")
    if top_k is not None and (not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool) or top_k < 1):
      raise ValueError(f"top_k must be a positive int, got {top_k!r}.")
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
      forbidden = [_as_id(t) for t in forbidden_tokens]
      if min(forbidden) < 0 or max(forbidden) >= self.vocab_size:
        raise ValueError(f"forbidden_tokens must be ids in [0, {self.vocab_size}), got {forbidden}.")
      bias_np = np.zeros((self.vocab_size,), np.float32)
      bias_np[forbidden] = -np.inf
      bias = jnp.asarray(bias_np)
    use_top_p = (not greedy) and top_p is not None and top_p < 1.0
    mode = _Mode(
        greedy=greedy,
        top_k=None if greedy else (int(top_k) if top_k is not None else None),
        use_top_p=use_top_p,
        forbid=bias is not None,
        return_logprobs=bool(return_logprobs),
        return_logits=bool(return_logits),
    )
    knobs = _Knobs(
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
      prompts: Sequence[str] | Sequence[Sequence[int]],
      max_generation_steps: int,
      *,
      temperature: float | None = None,
      top_p: float | None = None,
      top_k: int | None = None,
      beam_size: int | None = None,
      seed: int | jax.Array | None = None,
      eos_tokens: Sequence[int] | None = None,
      echo: bool = False,
      return_logprobs: bool = False,
      return_logits: bool = False,
      forbidden_tokens: Sequence[int] | None = None,
      early_stopping: bool | str = False,
      length_penalty: float = 1.0,
  ) -> SamplerOutput:
    """Generates a continuation of each prompt.

    Args:
      prompts: strings (needs a tokenizer) or lists of token ids.
      max_generation_steps: the most tokens to generate per prompt.
      temperature: 0 or None for greedy decoding; > 0 samples.
      top_p: nucleus sampling mass in (0, 1] (sampling only).
      top_k: sample among the k most likely tokens (sampling only).
      beam_size: beam search with this many beams (greedy only); returns the best beam.
      seed: an int or PRNG key for sampling; None draws a fresh key from the
        sampler's own stream (different samples on every call).
      eos_tokens: ids that end a row (default: the tokenizer's ``eos_ids``;
        ``[]`` never stops early).
      echo: put the prompt in front of ``text`` and ``tokens``.
      return_logprobs: fill ``SamplerOutput.logprobs``.
      return_logits: fill ``SamplerOutput.logits`` (vocabulary-sized per token).
      forbidden_tokens: ids that are never generated.
      early_stopping: beam search only, as in transformers: False (default:
        stop when no running beam can beat the finished ones, judged at the
        current length), True (stop once ``beam_size`` hypotheses finished) or
        "never" (judge at the maximum length).
      length_penalty: beam search only: finished scores are divided by
        ``generated_length ** length_penalty``.

    Returns:
      A SamplerOutput.
    """
    mode, knobs, eos = self._setup(
        temperature, top_p, top_k, beam_size, eos_tokens, forbidden_tokens, return_logprobs, return_logits
    )
    if beam_size is not None:
      if early_stopping not in _EARLY_STOPPING:
        raise ValueError(f"early_stopping must be False, True or 'never', got {early_stopping!r}.")
      if return_logits:
        raise ValueError("return_logits is not supported with beam search; use return_logprobs.")
      if forbidden_tokens:
        raise ValueError("forbidden_tokens is not supported with beam search.")
    state = self.init_sample_state(prompts, max_generation_steps)
    steps = int(max_generation_steps)
    real_rows = np.arange(state.logits.shape[0]) < state.num_prompts
    if beam_size is not None:
      seqs, lps, _ = self._beam_jit(
          self._params(), state.cache, state.logits, state.key_valid, state.positions, jnp.asarray(real_rows),
          jnp.int32(steps), jnp.asarray(np.asarray(eos, np.int32)), knobs.pad, jnp.float32(length_penalty),
          beam_size=int(beam_size), out_len=state.steps_bucket, early_stopping=early_stopping,
          return_logprobs=bool(return_logprobs),
      )
      tokens, logprobs, logits, ran = seqs, lps, None, steps
    else:
      tokens, logprobs, logits, ran, _ = self._decode_jit(
          self._params(), state.cache, state.logits, state.key_valid, state.positions, jnp.asarray(~real_rows),
          self._next_rng(seed), jnp.int32(steps), knobs, mode=mode, out_len=state.steps_bucket,
      )
    state.cache = None  # donated
    return self._finish(state, tokens, logprobs, logits, int(ran), eos, echo)

  def _finish(self, state: SampleState, tokens, logprobs, logits, ran: int, eos, echo: bool) -> SamplerOutput:
    """Cuts each row at its EOS and decodes the text."""
    n = state.num_prompts
    tokens = np.asarray(tokens[:n, :ran])
    logprobs = None if logprobs is None else np.asarray(logprobs[:n, :ran])
    logits = None if logits is None else np.asarray(logits[:n, :ran])
    eos_set = np.asarray(list(eos), np.int32)
    out_tokens, out_lps, out_logits, texts = [], [], [], []
    prompt_width = state.padded_prompt_tokens.shape[1]
    for row in range(n):
      hit = np.flatnonzero(np.isin(tokens[row], eos_set)) if eos_set.size else np.array([], int)
      length = int(hit[0]) + 1 if hit.size else ran
      generated = tokens[row, :length]
      body = generated[:-1] if hit.size else generated
      prompt = state.padded_prompt_tokens[row, prompt_width - state.prompt_lengths[row] :]
      out_tokens.append(np.concatenate([prompt, generated]).astype(np.int32) if echo else generated.astype(np.int32))
      if logprobs is not None:
        out_lps.append(logprobs[row, :length])
      if logits is not None:
        out_logits.append(logits[row, :length])
      texts.append(self._decode_text(np.concatenate([prompt, body]) if echo else body))
    return SamplerOutput(
        text=texts,
        tokens=out_tokens,
        logprobs=out_lps if logprobs is not None else None,
        logits=out_logits if logits is not None else None,
        padded_prompt_tokens=state.padded_prompt_tokens[:n],
    )

  def _decode_text(self, ids: Sequence[int]) -> str:
    if self.tokenizer is None:
      return ""
    return self.tokenizer.decode([int(i) for i in ids])

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
    n = state.num_prompts
    width = state.padded_prompt_tokens.shape[1]
    prompts = [state.padded_prompt_tokens[i, width - state.prompt_lengths[i] :].tolist() for i in range(n)]
    eos_set = set(eos)
    shown_ids: list[list[int]] = [list(p) if echo else [] for p in prompts]
    shown_text = ["" for _ in range(n)]
    finished = [False] * n
    if echo:
      first = [self._decode_text(p) for p in prompts]
      shown_text = list(first)
      yield StreamChunk(-1, first, [list(p) for p in prompts], [False] * n)
    done = jnp.asarray(np.arange(state.logits.shape[0]) >= n)
    token, _, done, rng = self._first_jit(state.logits, done, rng, knobs, mode=mode)
    cache, key_valid, position = state.cache, state.key_valid, state.positions
    state.cache = None
    for step in range(steps):
      if step > 0:
        token, _, _, cache, key_valid, position, done, rng = self._step_jit(
            self._params(), cache, token, key_valid, position, done, rng, knobs, mode=mode
        )
      host = np.asarray(token)
      texts, new_ids = [], []
      for row in range(n):
        if finished[row]:
          texts.append("")
          new_ids.append([])
          continue
        tid = int(host[row])
        new_ids.append([tid])
        shown_ids[row].append(tid)
        stopped = tid in eos_set
        text_ids = shown_ids[row][:-1] if stopped else shown_ids[row]
        full = self._decode_text(text_ids)
        last = stopped or step == steps - 1
        texts.append(_new_text(full, shown_text[row], last))
        shown_text[row] += texts[-1]
        finished[row] = stopped
      yield StreamChunk(step, texts, new_ids, [f or step == steps - 1 for f in finished])
      if all(finished):
        break


def _new_text(full: str, shown: str, last: bool) -> str:
  """The part of ``full`` not shown yet; waits while it ends in an incomplete character."""
  if not full.startswith(shown):
    return full[len(shown) :] if last else ""
  if not last and full.endswith("\ufffd"):
    return ""
  return full[len(shown) :]


def _last_token_logits(model, tokens, positions, cache, mask):
  """Runs the prompt and returns (logits of the last slot [B, V], cache), computing only that slot's logits.

  Projecting every prompt position onto the vocabulary would cost more than the
  rest of the prefill for a big vocabulary, so the hidden state is taken from
  the model and projected for the last slot only (the dead full projection is
  removed by XLA).
  """
  if hasattr(model, "logits_from_hidden"):
    _, cache, hidden = model(tokens, positions, cache, mask, return_hidden_states=True)
    return model.logits_from_hidden(hidden[:, -1:])[:, 0], cache
  lm_head = getattr(model, "lm_head", None)
  embedder = getattr(model, "embedder", None)
  config = getattr(model, "config", None)
  if embedder is None or not hasattr(config, "final_logit_softcap"):
    logits, cache = model(tokens, positions, cache, mask)
    return logits[:, -1], cache
  _, cache, hidden = model(tokens, positions, cache, mask, return_hidden_states=True)
  last = hidden[:, -1]
  logits = lm_head(last) if lm_head is not None else embedder.decode(last)
  if config.final_logit_softcap is not None:
    cap = config.final_logit_softcap
    logits = jnp.tanh(logits / cap) * cap
  return logits, cache


def _is_token_id(x: Any) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _as_id(x: Any) -> int:
  if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
    if isinstance(x, np.ndarray) and x.ndim == 0 and np.issubdtype(x.dtype, np.integer):
      return int(x)
    raise TypeError(f"token ids must be ints, got {x!r}")
  return int(x)


def _check_steps(steps: Any) -> int:
  if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
    raise ValueError(f"max_generation_steps must be a positive int, got {steps!r}.")
  return int(steps)
