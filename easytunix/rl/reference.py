"""Choosing the fixed reference model a policy is kept close to (DPO, GRPO's KL penalty).

In order: the reference given; with LoRA, the policy itself with its adapters
off (:func:`easytunix.sft.lora.lora_disabled`, no second copy); otherwise a
snapshot of the policy's weights as they are now (``nnx.clone``: it shares the
arrays until training replaces the policy's).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx

from easytunix.sft.lora import is_lora_enabled

KINDS = ("model", "lora_disabled", "snapshot", "none")


@dataclasses.dataclass(frozen=True)
class Reference:
  """The chosen reference.

  Attributes:
    kind: "model" (given), "lora_disabled" (the policy, adapters off),
      "snapshot" (a copy of the policy's initial weights) or "none" (not needed).
    model: the reference module ("model", "snapshot"); None otherwise.
  """

  kind: str
  model: Any = None

  def module(self, policy: nnx.Module) -> nnx.Module | None:
    """The module whose forward pass is the reference's (the policy itself when adapters are turned off)."""
    return policy if self.kind == "lora_disabled" else self.model


def choose_reference(policy: nnx.Module, reference: Any = None, *, needed: bool = True,
                     name: str = "reference") -> Reference:
  """The reference of ``policy``: ``reference`` when given, else the LoRA base weights, else a snapshot.

  Args:
    policy: the model being trained.
    reference: a separate model (or anything the caller loads, e.g. a folder path), or None.
    needed: False when the objective uses no reference (then the choice is "none").
    name: the argument's name in error messages (e.g. "ref_model").
  """
  if reference is not None and reference is policy:
    raise ValueError(
        f"{name} is the policy itself, which training changes. Pass {name}=None to use the initial "
        "weights (or, with LoRA, the base weights), or a separate model."
    )
  if not needed:
    return Reference("none")
  if reference is not None:
    return Reference("model", reference)
  if is_lora_enabled(policy):
    return Reference("lora_disabled")
  return Reference("snapshot", nnx.clone(policy))


__all__ = ["KINDS", "Reference", "choose_reference"]
