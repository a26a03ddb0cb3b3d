"""SynGen (Rassin et al., NeurIPS 2023, arXiv:2306.08877): bind each modifier to its noun (a symmetric KL between
their attention maps) and keep both apart from the other prompt tokens. Constants from the official code
(RoyiRa/Linguistic-Binding-in-Diffusion-Models: ``compute_loss.py``, ``syngen_diffusion_pipeline.py``, ``run.py``).
The (modifier, noun) pairs come from the subjects, not from a parser."""

from __future__ import annotations

from dataclasses import dataclass

from .._lazy import torch
from .base import ControlContext, PreparedControl, register, subjects_field, window_stop
from .common import GuidanceOptions, TokenMaps, binding_groups, bindings_field
from .fields import POSITIVE, option
from .vocabulary import Evaluation, StepInfo, StepPlan

# -- the loss ----------------------------------------------------------------------------------------------------

FLOAT32_EPS = 2.0**-23  # torch.finfo(torch.float32).eps: the official pipeline's maps are float32


def symmetric_kl(a: torch.Tensor, b: torch.Tensor, eps: float = FLOAT32_EPS) -> torch.Tensor:
    """``(KL(p_a || p_b) + KL(p_b || p_a)) / 2`` of the maps normalised to spatial distributions (natural log).

    As the official ``compute_loss.py:_symmetric_kl`` (``torch.distributions.Categorical(probs=...)`` and
    ``kl_divergence``): the weights are the probabilities themselves, unclamped; only the logs are taken of the
    probabilities clamped to ``[eps, 1 - eps]`` (``clamp_probs``, float32's eps). One difference, kept: where one
    map is exactly 0 and the other is not, the official KL is infinite; here it stays finite (the log of eps)."""
    p = a.flatten() / a.sum()
    q = b.flatten() / b.sum()
    log_p, log_q = p.clamp(eps, 1 - eps).log(), q.clamp(eps, 1 - eps).log()
    return 0.5 * ((p * (log_p - log_q)).sum() + (q * (log_q - log_p)).sum())


def _word_distance(x: list[torch.Tensor], y: list[torch.Tensor]) -> torch.Tensor:
    """A multi-piece word against another: the largest distance over piece pairs."""
    return torch.stack([symmetric_kl(a, b) for a in x for b in y]).max()


def syngen_group_loss(
    modifiers: list[list[torch.Tensor]], noun: list[torch.Tensor], others: list[torch.Tensor]
) -> torch.Tensor:
    """One (modifiers, noun) group: for each modifier m,
    ``d(m, n) + 1/2 (-mean_u d(m, u) - mean_u d(n, u))`` over ``others``, the group's outside tokens u (each word a
    list of its pieces' maps). A noun without modifiers: ``-mean_u d(n, u)``."""

    def outside(word):
        if not others:
            return noun[0].new_zeros(())
        return torch.stack([_word_distance(word, [u]) for u in others]).mean()

    if not modifiers:
        return -outside(noun)
    total = noun[0].new_zeros(())
    for m in modifiers:
        total = total + _word_distance(m, noun) + 0.5 * (-outside(m) - outside(noun))
    return total


# -- the options -------------------------------------------------------------------------------------------------


@register("syngen", order=7)
@dataclass
class SynGen(GuidanceOptions):
    """SynGen: ``L = sum_groups sum_m [d(m, n) - 1/2 (mean_u d(m, u) + mean_u d(n, u))]``, d the symmetric KL of
    spatially normalised maps, u every prompt token outside the group (the other groups' words included; no
    start/end token, no padding); ``z <- z - step_size * grad L``. The map options choose the maps' level and
    layers; SynGen itself reads the raw averaged attention (no token softmax, no smoothing), as the official code."""

    subjects: list = subjects_field(
        "phrases whose leading words modify their last word ('red car': red -> car); a "
        "single word is a noun without modifiers (only the push away from the other "
        "tokens)."
    )
    bindings: dict[str, tuple[str, ...]] = bindings_field("more modifiers per noun, {'car': ['red', 'shiny']}.")
    step_size: float = option(20.0, "constant step (official: 20; no sqrt schedule, no refinement).", range=POSITIVE)
    stop: int | float | None = window_stop(25, "updates at steps start .. stop - 1 (official: 25 of 50).")

    def prepare(self, ctx: ControlContext) -> PreparedSynGen:
        return PreparedSynGen(self, ctx)


# -- the step plan and the evaluation ----------------------------------------------------------------------------


class PreparedSynGen(PreparedControl):
    def __init__(self, cfg: SynGen, ctx: ControlContext):
        self.cfg = cfg
        self.bind_window(cfg, ctx.num_steps)
        self.groups = binding_groups(ctx, cfg.subjects, dict(cfg.bindings))
        prompt_tokens = ctx.keep_mask(True)  # every prompt token, without start/end tokens and padding
        nouns = [[noun for _, noun in g] for g in self.groups]
        columns = prompt_tokens.any(0)  # its loss reads every prompt token, not only the nouns
        self.bind_maps(TokenMaps(cfg, ctx, cfg.subjects, positions=nouns), cfg, ctx, columns=lambda: columns)
        # Per image, per group: the tokens that group is pushed away from -- every prompt token outside the group,
        # the other groups' modifiers and nouns included (official: compute_loss.py:_get_outside_indices over
        # get_attention_map_index_to_wordpiece's positions 1 .. len(ids) - 2, i.e. no start/end token, no padding).
        self.others = []
        for b, groups in enumerate(self.groups):
            tokens = prompt_tokens[b].nonzero().flatten().tolist()
            outside = []
            for mods, noun in groups:
                mine = {p for w in (*mods, noun) for p in w}
                outside.append([p for p in tokens if p not in mine])
            self.others.append(outside)

    def plan(self, step: int) -> StepPlan:
        return self.make_plan(step, self.cfg.step_size)

    def evaluate(self, maps, images: list[int], step: StepInfo, carry: list) -> Evaluation:
        m = maps[self.maps.key]
        losses = []
        for row, b in enumerate(images):
            a = m[row]  # (rows, cols, tokens): raw averaged attention

            def word(w, a=a):
                return [a[..., p] for p in w]

            total = a.new_zeros(())
            for (mods, noun), outside in zip(self.groups[b], self.others[b]):
                others = [a[..., p] for p in outside]
                total = total + syngen_group_loss([word(w) for w in mods], word(noun), others)
            losses.append(total)
        return Evaluation(torch.stack(losses))
