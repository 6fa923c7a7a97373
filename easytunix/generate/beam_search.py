"""Beam search, as transformers 5's ``_beam_search`` (``do_sample=False``), in one jittable loop.

Each step keeps the ``max(2, 1 + len(eos)) * beam_size`` best continuations over
all beams; the best ``beam_size`` of them that did not stop keep running, and
candidates among the first ``beam_size`` that end with an EOS (or reach the step
budget) join the finished set with score
``sum(logprobs) / generated_length ** length_penalty``. The search stops when no
running beam can beat the worst finished one (``early_stopping``: False judges
at the current length, "never" at the maximum length, True stops as soon as
``beam_size`` hypotheses finished) or when the budget is spent; the best
finished hypothesis is returned.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from easytunix.layers.cache import KVCache, LayerCache

__all__ = ["BEAM_MASK", "EARLY_STOPPING", "beam_search", "check_early_stopping"]

# The "very large negative" score of masked beam candidates (as in transformers).
BEAM_MASK = -1.0e9
# The values ``early_stopping`` may take.
EARLY_STOPPING = (False, True, "never")


def check_early_stopping(early_stopping: bool | str) -> None:
  """Raises a ValueError unless ``early_stopping`` is False, True or "never"."""
  if early_stopping not in EARLY_STOPPING:
    raise ValueError(f"early_stopping must be False, True or 'never', got {early_stopping!r}.")


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


def beam_search(
    forward: Callable[..., tuple[jax.Array, KVCache, jax.Array]],
    cache: KVCache,
    logits: jax.Array,
    key_valid: jax.Array,
    positions: jax.Array,
    real_rows: jax.Array,
    max_steps: jax.Array,
    eos: jax.Array,
    pad: jax.Array,
    length_penalty: jax.Array,
    *,
    beam_size: int,
    out_len: int,
    early_stopping: bool | str,
    return_logprobs: bool,
) -> tuple[jax.Array, jax.Array | None, jax.Array]:
  """Beam search over every row, step for step as transformers' ``_beam_search`` (static shapes; jittable).

  Args:
    forward: ``forward(cache, token [R], key_valid [R, S], position [R]) -> (logits [R, V], cache, key_valid)``
      feeds one token per row at slot ``cache.index`` (``R`` = rows times beams).
    cache: the prefilled KV cache [B, S].
    logits: the logits of each row's last prompt token [B, V].
    key_valid: which cache slots hold real tokens [B, S].
    positions: the position of each row's next token [B].
    real_rows: [B] False for rows that only pad the batch bucket.
    max_steps: the step budget (int32 scalar).
    eos: the ids that end a hypothesis [n] (int32).
    pad: the id written after a hypothesis ends (int32 scalar).
    length_penalty: finished scores are divided by ``generated_length ** length_penalty``.
    beam_size: beams per row (static).
    out_len: the width of the token buffers (static).
    early_stopping: False, True or "never", as in transformers (static).
    return_logprobs: return the best hypothesis' per-token log-probabilities (static).

  Returns:
    (best finished tokens [B, out_len], their log-probabilities or None, steps run).
  """
  b, vocab = logits.shape
  nb = beam_size
  k = max(2, 1 + eos.shape[0]) * nb
  n = out_len
  layers = tuple(LayerCache(jnp.repeat(c.k, nb, 0), jnp.repeat(c.v, nb, 0)) for c in cache.layers)
  cache = KVCache(layers, cache.index)
  key_valid = jnp.repeat(key_valid, nb, 0)
  positions = jnp.repeat(positions, nb, 0)
  logits = jnp.repeat(logits, nb, 0)
  neg = jnp.float32(BEAM_MASK)
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
    step_logits, cache, key_valid = forward(reordered, tok, key_valid, position)
    s, src, tok = select(t, step_logits, s)
    return t + 1, cache, key_valid, position + 1, src, tok, s

  t, *_, beams = jax.lax.while_loop(cond, body, (jnp.int32(1), cache, key_valid, positions, src, tok, beams))
  return beams.fin_seqs[:, 0], (beams.fin_lps[:, 0] if return_logprobs else None), t
