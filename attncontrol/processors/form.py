"""The interface an attention form declares: what the capture processor may ask of one way of computing a layer's
attention. The forms themselves live in :mod:`.classic` (separate q/k/v projections, one softmax over the keys)
and :mod:`.joint` (image and text tokens in one softmax); which form a layer uses is its family adapter's choice
(the ``ops`` of each :class:`~attncontrol.store.AttnLayer` it lists), never the capture processor's.

Two capabilities, each a class attribute that a form sets, and each with the methods it promises:

- ``explicit_scores``: :meth:`AttentionForm.explicit` computes the layer's whole output through an explicit
  (batch * heads, queries, keys) probability matrix, so a guidance pass records the probabilities inside that
  forward and editors rewrite its float32 scores. A form without it leaves the layer's output to the layer's own
  processor: :meth:`AttentionForm.maps` gives the maps beside it (without the full matrix) and
  :meth:`AttentionForm.edited` adds the change of the image queries' edited attention to that processor's output.
- ``observes``: :meth:`AttentionForm.observe` computes the probabilities of the conditional half of the batch
  beside the layer's own processor. A form without it is observed through the "cross" part of
  :meth:`AttentionForm.maps`.

A subclass that declares a capability without its methods (or lacks the :meth:`maps`/:meth:`edited` that stand in
for a missing one) fails when it is defined.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch


class AttentionForm:
    """One way of computing a layer's attention, as the capture processor asks it (see the module docstring)."""

    explicit_scores: ClassVar[bool] = False
    observes: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        needed = {"explicit"} if cls.explicit_scores else {"maps", "edited"}
        needed |= {"observe"} if cls.observes else {"maps"}
        missing = sorted(m for m in needed if getattr(cls, m) is getattr(AttentionForm, m))
        if missing:
            raise TypeError(f"{cls.__name__} declares capabilities without {missing} (see attncontrol.processors.form)")

    def _lacks(self, capability: str) -> NotImplementedError:
        return NotImplementedError(f"{type(self).__name__} has no {capability} path")

    # ---------------------------------------------------------------- explicit_scores

    def explicit(
        self,
        attn,
        hidden_states,
        encoder_hidden_states,
        attention_mask,
        temb,
        on_probs: Callable[[torch.Tensor, int], None] | None = None,
        on_scores: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The layer's output through explicit probabilities. ``on_scores(scores, heads)`` may turn the float32
        pre-softmax scores into the probabilities to use (attention editing); ``on_probs(probs, heads)`` then sees
        the probabilities used, (batch * heads, queries, keys), and may stop the forward by raising."""
        raise self._lacks("explicit-scores")

    # ---------------------------------------------------------------- observes

    def observe(self, attn, hidden_states, encoder_hidden_states, attention_mask, cond_half) -> torch.Tensor:
        """Probabilities of the conditional half (``cond_half`` picks it from a batch-first tensor), computed beside
        the layer's own processor: (conditional batch * heads, queries, keys)."""
        raise self._lacks("observe")

    # ---------------------------------------------------------------- beside the layer's own processor

    def maps(self, attn, args: dict, n_image: int, kinds: set[str], columns: torch.Tensor | None) -> dict[str, Any]:
        """The maps the layer gives for ``kinds`` (``args``: the call's arguments by name; ``n_image`` image
        tokens; ``columns``: the text columns wanted, None for all): ``{"cross": (P, mass), "self": P}``, heads
        not pooled."""
        raise self._lacks("maps")

    def edited(self, attn, args: dict, n_image: int, original: Callable[[], Any], edit, observe=None):
        """The layer's own output (``original()``) with the image queries' probabilities rewritten by
        ``edit(scores, heads, text_offset)``; ``observe(probs)`` sees the edited image->text probabilities."""
        raise self._lacks("edited")
