"""``generate``: the core Sampler behind a string-in, string-out call."""

from __future__ import annotations

from typing import Any, Iterator

from flax import nnx

from easytunix.generate.sampler import CacheConfig, Sampler

SAMPLERS = ("greedy", "top_p", "top_k", "beam", "random")


def _cache_size(needed: int, limit: int) -> int:
  size = 128
  while size < needed:
    size *= 2
  return min(size, max(limit, needed))


def get_sampler(model, state: dict[str, Any], needed_len: int) -> Sampler:
  """A sampler for ``model`` big enough for the request, reused (and re-weighted) across calls."""
  graphdef = nnx.graphdef(model)
  current = state.get("sampler")
  if current is not None:
    sampler, cached_graph, cache = current
    if cached_graph == graphdef and cache.cache_size >= needed_len:
      sampler.update_params(nnx.state(model))
      return sampler
  limit = model.config.max_position_embeddings
  if needed_len > limit:
    raise ValueError(
        f"Prompt plus max_length needs {needed_len} positions, more than the model's "
        f"max_position_embeddings={limit}. Shorten the prompt or max_length."
    )
  size = _cache_size(needed_len, limit)
  cache = CacheConfig.for_model(model, cache_size=size)
  sampler = Sampler(model, model.tokenizer, cache)
  state["sampler"] = (sampler, graphdef, cache)
  return sampler


def generate(model, state: dict[str, Any], prompts: Any, *, max_length: int, sampler: str, temperature: float | None,
             top_p: float | None, top_k: int | None, beam_size: int | None, seed: int | None, stream: bool,
             strip_prompt: bool, chat: bool) -> Any:
  if sampler not in SAMPLERS:
    raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}.")
  if model.tokenizer is None:
    raise ValueError("generate needs a tokenizer: load the model with from_preset(..., tokenizer=...).")
  if max_length is None or max_length <= 0:
    raise ValueError(f"max_length (new tokens) must be a positive int, got {max_length!r}.")
  single = isinstance(prompts, str)
  batch = [prompts] if single else list(prompts)
  if not batch or not all(isinstance(p, str) for p in batch):
    raise TypeError("generate takes a string or a non-empty list of strings.")
  if chat:
    batch = [model.tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
             for p in batch]
  kwargs: dict[str, Any] = {"seed": seed}
  if sampler == "greedy":
    if temperature or top_p or top_k or beam_size:
      raise ValueError("sampler='greedy' takes no temperature/top_p/top_k/beam_size; choose sampler='top_p', 'top_k' or 'beam'.")
  elif sampler == "beam":
    if stream:
      raise ValueError("Beam search cannot stream; use stream=False or another sampler.")
    kwargs["beam_size"] = beam_size or 4
  else:
    kwargs["temperature"] = 1.0 if temperature is None else temperature
    if sampler == "top_p":
      kwargs["top_p"] = 0.9 if top_p is None else top_p
      kwargs["top_k"] = top_k
    elif sampler == "top_k":
      kwargs["top_k"] = 50 if top_k is None else top_k
      kwargs["top_p"] = top_p
  lengths = [len(model.tokenizer.encode(p)) for p in batch]
  core = get_sampler(model, state, max(lengths) + max_length)
  echo = not strip_prompt
  if stream:
    return _stream(core, batch, max_length, echo, kwargs, single)
  out = core(batch, max_generation_steps=max_length, echo=echo, **kwargs)
  return out.text[0] if single else list(out.text)


def _stream(core: Sampler, batch, max_length, echo, kwargs, single) -> Iterator[Any]:
  for chunk in core.stream(batch, max_length, echo=echo, **kwargs):
    yield chunk.text[0] if single else list(chunk.text)
