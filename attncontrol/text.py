"""The text side of the attention maps: which key positions are text, from which tokenizer.

A model's cross-attention (or the text part of its joint attention) attends to one or more text streams laid
end to end along the maps' token axis. SD 1.x/2.x and SDXL have one stream (77 CLIP positions; SDXL's second
encoder is concatenated on channels, so it shares those positions and only has to agree on them); SD3 has CLIP
(77) then T5; FLUX has T5 only. A :class:`TextLayout` lists the streams, each a :class:`TextSegment`, and answers
the questions the controls ask: where a subject is, which positions the token softmax keeps, which are the
start/end tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from ._lazy import torch
from .errors import SubjectError
from .tokens import TokenTable, resolve_subjects, tokenize


@dataclass(frozen=True)
class TextSegment:
    """One text stream: ``length`` positions of the token axis from ``offset``, tokenised by ``tokenizer``.

    ``prompts`` (one per input prompt) are what this stream encodes; ``parallel`` are other (tokenizer, prompts)
    streams concatenated on channels with this one, whose token positions must agree (SDXL's second encoder).
    ``region``: a regional prompting sub-prompt's stream, after the prompt's own (0: the prompt itself); a subject
    it does not name has no positions there."""

    tokenizer: Any
    offset: int
    length: int
    prompts: tuple[str, ...]
    label: str = "CLIP"
    parallel: tuple[tuple[Any, tuple[str, ...]], ...] = ()
    region: int = 0

    def table(self, k: int) -> TokenTable | None:
        """The token table of input prompt ``k`` (None for a stream without a tokenizer: zeros, no tokens)."""
        return None if self.tokenizer is None else tokenize(self.tokenizer, self.prompts[k], self.length)

    def resolve(self, k: int, subjects: list) -> list[tuple[int, ...]]:
        """Positions of the subjects of input prompt ``k`` in this stream (plus the offset)."""
        if self.tokenizer is None:
            return [()] * len(subjects)
        fixed = {j: s for j, s in enumerate(subjects) if isinstance(s, _Positions)}
        if fixed:  # positions mapped from another stream's index: resolve the rest, keep these as they are
            rest = (
                self.resolve(k, [s for s in subjects if not isinstance(s, _Positions)])
                if len(fixed) < len(subjects)
                else []
            )
            rest_iter = iter(rest)
            return [
                tuple(self.offset + p for p in fixed[j]) if j in fixed else next(rest_iter)
                for j in range(len(subjects))
            ]
        mine = resolve_subjects(self.tokenizer, self.prompts[k], subjects, self.length)
        for tokenizer, prompts in self.parallel:
            theirs = resolve_subjects(tokenizer, prompts[k], subjects, self.length)
            for subject, a, b in zip(subjects, mine, theirs):
                if a != b:
                    raise SubjectError(
                        f"subject {subject!r} is at tokens {list(a)} of {self.prompts[k]!r} for the first text "
                        f"encoder but at {list(b)} of {prompts[k]!r} for the second; both encoders attend through "
                        "the same token positions, so they must agree"
                        f"\n{tokenize(self.tokenizer, self.prompts[k], self.length).format()}"
                        f"\n{tokenize(tokenizer, prompts[k], self.length).format()}"
                    )
        return [tuple(self.offset + p for p in pos) for pos in mine]


@dataclass(frozen=True)
class TextLayout:
    """The text streams of one run, in the order of the maps' token axis."""

    segments: tuple[TextSegment, ...]
    n_inputs: int = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "n_inputs", len(self.segments[0].prompts))

    @property
    def length(self) -> int:
        return sum(s.length for s in self.segments)

    @property
    def base_length(self) -> int:
        """The prompt's own tokens, before any regional sub-prompt."""
        return sum(s.length for s in self.segments if not s.region)

    def with_regions(self, regions: list[TextLayout]) -> TextLayout:
        """This layout followed by each regional sub-prompt's layout (as the pipeline encodes that sub-prompt
        alone), in order: the token axis of a run with regions. A subject is then found in the prompt and in every
        sub-prompt that names it."""
        segments, offset = list(self.segments), self.length
        for r, layout in enumerate(regions, start=1):
            segments += [replace(seg, offset=offset + seg.offset, region=r) for seg in layout.segments]
            offset += layout.length
        return TextLayout(tuple(segments))

    def resolve(self, k: int, subjects: list) -> list[tuple[int, ...]]:
        """Each subject's positions in every stream (SD3: its CLIP positions and its T5 positions).

        A token index is an index into the first stream's table (the first table ``attncontrol tokens`` shows;
        SD3: CLIP, where 0 is the start token); in every other stream it stands for the same word (the same
        occurrence of it), since the streams number their tokens differently (T5 has no start token)."""
        indexed = [s for s in subjects if isinstance(s, int) and not isinstance(s, bool)]
        streams = [seg for seg in self.segments if seg.tokenizer is not None]
        per_stream = []
        for seg in self.segments:
            if seg.region:
                per_stream.append(self._in_region(k, seg, subjects))
                continue
            mine = subjects
            if indexed and len(streams) > 1 and seg is not streams[0]:
                mine = [self._same_word(k, streams[0], seg, s) if s in indexed else s for s in subjects]
            try:
                per_stream.append(seg.resolve(k, mine))
            except SubjectError as err:
                if len(self.segments) == 1:
                    raise
                raise type(err)(f"in the {seg.label} tokens: {err}") from None
        return [tuple(p for stream in per_stream for p in stream[j]) for j in range(len(subjects))]

    @staticmethod
    def _in_region(k: int, seg: TextSegment, subjects: list) -> list[tuple[int, ...]]:
        """Each subject's positions in a sub-prompt's stream: none where the sub-prompt does not name it (a token
        index always means the prompt's own token)."""
        out: list[tuple[int, ...]] = []
        for subject in subjects:
            if isinstance(subject, (int, _Positions)):
                out.append(())
                continue
            try:
                out += seg.resolve(k, [subject])
            except SubjectError:  # not there, or not that occurrence: the sub-prompt does not name it
                out.append(())
        return out

    @staticmethod
    def _same_word(k: int, first: TextSegment, other: TextSegment, index: int) -> _Positions | int:
        """Token ``index`` of ``first``'s table as positions of the same word (same occurrence) in ``other``'s
        table, returned as a phrase subject those streams resolve (or the index itself when it is invalid, so the
        first stream's check reports it, or when either stream has no tokenizer and so no words)."""
        table = first.table(k)
        if table is None or not table.first_index <= index <= table.last_index:
            return index
        word, ordinal = _word_at(table, index)
        theirs = other.table(k)
        if theirs is None:  # a stream of zeros: its resolve gives no positions whatever the subject
            return index
        hits = [pos for text, pos in _word_groups(theirs) if text == word]
        if len(hits) < ordinal:
            raise SubjectError(
                f"token index {index} is the word {word!r} in the {first.label} tokens, which the {other.label} "
                f"tokens do not have (as occurrence {ordinal}); name the word instead\n{table.format()}\n"
                f"{theirs.format()}"
            )
        return _Positions(hits[ordinal - 1])

    def keep(self, k: int, exclude_eot: bool) -> torch.Tensor:
        """(length,) positions kept in a token softmax for input prompt ``k``.

        ``exclude_eot=False``: diffusers' A&E slice ``[1:-1]`` per stream (drops the start token and the last
        slot; keeps the end token and padding). ``True``: only the prompt's own tokens. A regional sub-prompt's
        stream keeps only its own tokens either way: its padding would add hundreds of columns that no image token
        outside its box reads to every token softmax."""
        keep = torch.zeros(self.length, dtype=torch.bool)
        for seg in self.segments:
            table = seg.table(k)
            if table is None:  # a stream of zeros: padding
                keep[seg.offset : seg.offset + seg.length] = not exclude_eot and not seg.region
            elif exclude_eot or seg.region:
                keep[seg.offset + table.first_index : seg.offset + table.last_index + 1] = True
            else:
                keep[seg.offset + table.prefix : seg.offset + seg.length - 1] = True
        return keep

    def special_positions(self, k: int) -> list[int]:
        """Start/end-token positions of input prompt ``k`` (padding excluded), over all streams."""
        tables = [(seg, seg.table(k)) for seg in self.segments]
        return [seg.offset + p for seg, table in tables if table is not None for p in table.special_positions]

    def words(self, k: int, positions: tuple[int, ...]) -> list[tuple[int, ...]]:
        """``positions`` of input prompt ``k`` grouped into words (each stream's word rule; the n-th word of every
        stream joined)."""
        per_stream = []
        for seg in self.segments:
            table = seg.table(k)
            mine = [p - seg.offset for p in positions if seg.offset <= p < seg.offset + seg.length]
            if table is None or not mine:
                continue
            rows = table.rows()
            groups: list[list[int]] = []
            for p in mine:
                same_word = groups and rows[groups[-1][-1]].word == rows[p].word and p == groups[-1][-1] + 1
                if same_word and not _starts_word(table, rows, p):
                    groups[-1].append(p)
                else:
                    groups.append([p])
            per_stream.append([[seg.offset + p for p in g] for g in groups])
        if not per_stream:
            return [tuple(positions)]
        n = min(len(g) for g in per_stream)
        return [tuple(p for stream in per_stream for p in stream[i]) for i in range(n)]

    def format(self, k: int) -> str:
        return "\n".join(table.format() for seg in self.segments if (table := seg.table(k)) is not None)


class _Positions(tuple[int, ...]):
    """Token positions already resolved in a stream (how a first-stream index reaches the other streams)."""


def _word_groups(table: TokenTable) -> list[tuple[str, tuple[int, ...]]]:
    """The prompt's words in ``table``, in order: (lower-cased text, positions)."""
    groups: list[tuple[str, list[int]]] = []
    rows = table.rows()
    for p in range(table.first_index, table.last_index + 1):
        if groups and groups[-1][1][-1] == p - 1 and not _starts_word(table, rows, p):
            groups[-1][1].append(p)
        else:
            groups.append((rows[p].word.lower(), [p]))
    return [(text, tuple(pos)) for text, pos in groups]


def _word_at(table: TokenTable, index: int) -> tuple[str, int]:
    """The word token ``index`` belongs to, and which occurrence of that word it is (1-based)."""
    seen: dict[str, int] = {}
    for text, pos in _word_groups(table):
        seen[text] = seen.get(text, 0) + 1
        if index in pos:
            return text, seen[text]
    raise SubjectError(f"token index {index} is not a prompt token of {table.prompt!r}\n{table.format()}")


def _starts_word(table: TokenTable, rows, p: int) -> bool:
    """Whether token ``p`` starts a new word (the previous token ends one, by the tokenizer's word rule)."""
    rule = table.rule
    if rule.at_end:
        return rows[p - 1].token.endswith(rule.marker)
    return rows[p].token.startswith(rule.marker)
