"""Prompt -> token positions: subjects as words, phrases (``"red car"``), occurrences (``"cat#2"``) or indices.

Positions are indices into the tokenised prompt as the text encoder sees it. Which positions are special (a
start token, the end token, padding) is read from the tokenizer itself: the tokens it adds around a prompt.
CLIP: 0 is start-of-text, ``1..n`` the prompt's tokens, ``n + 1`` end-of-text, then padding up to 77. T5: no
start token, ``0..n-1`` the prompt's tokens, then ``</s>`` and ``<pad>``.

Words are grouped by a small rule per tokenizer (:class:`WordRule`): CLIP's BPE marks a word's last piece with
``</w>``; sentencepiece (T5) marks a word's first piece with ``▁``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import (
    AmbiguousSubjectError,
    OptionError,
    OptionTypeError,
    SubjectError,
    SubjectNotInPromptError,
    SubjectTruncatedError,
)

_OCCURRENCE = re.compile(r"^(?P<text>.*?)#(?P<n>\d+)$")
_SURROGATE = re.compile("[\ud800-\udfff]")


def check_text(text: str, where: str = "prompt") -> str:
    """``text`` if it is valid Unicode. A lone surrogate is not: the command line turns bytes that are not UTF-8
    into them (``surrogateescape``), and a JSON escape such as ``"\\ud800"`` makes one; no tokenizer takes it."""
    m = _SURROGATE.search(text)
    if m is None:
        return text
    code = ord(m.group())
    what = (
        f"the byte 0x{code - 0xDC00:02x}, which is not UTF-8"
        if 0xDC80 <= code <= 0xDCFF
        else (f"a lone surrogate \\u{code:04x}")
    )
    raise OptionError(
        f"{where} is not valid text: {what}, at character {m.start()} of {text!r}; save or type it as UTF-8"
    )


@dataclass(frozen=True)
class WordRule:
    """How a tokenizer marks word boundaries in its tokens: ``marker`` ends a word (``at_end``) or starts one."""

    marker: str
    at_end: bool

    def text(self, token: str) -> str:
        """The token without the marker (what a user reads)."""
        return token.removesuffix(self.marker) if self.at_end else token.removeprefix(self.marker)

    def words(self, tokens: tuple[str, ...], special: tuple[bool, ...]) -> list[str]:
        """The word each token belongs to ('' for special tokens)."""
        words = [""] * len(tokens)
        group: list[int] = []

        def close():
            word = "".join(self.text(tokens[j]) for j in group)
            for j in group:
                words[j] = word
            group.clear()

        for i, (tok, sp) in enumerate(zip(tokens, special)):
            if sp:
                close()
                continue
            if not self.at_end and tok.startswith(self.marker):
                close()
            group.append(i)
            if self.at_end and tok.endswith(self.marker):
                close()
        close()
        return words


CLIP_RULE = WordRule("</w>", at_end=True)
SENTENCEPIECE_RULE = WordRule("\u2581", at_end=False)
NO_RULE = WordRule("\0", at_end=True)  # every token is its own word (unknown conventions)


def word_rule(tokenizer) -> WordRule:
    """The word rule of ``tokenizer``, read from how it tokenises two ordinary words."""
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("a photo", add_special_tokens=False).input_ids)
    if any(t.endswith(CLIP_RULE.marker) for t in tokens):
        return CLIP_RULE
    if any(t.startswith(SENTENCEPIECE_RULE.marker) for t in tokens):
        return SENTENCEPIECE_RULE
    return NO_RULE


@dataclass(frozen=True)
class TokenInfo:
    index: int
    token: str
    word: str
    text: str  # the token without its word marker


@dataclass(frozen=True)
class TokenTable:
    """The tokenised prompt, untruncated, with what the tokenizer added around it and the encoder's limit."""

    prompt: str
    ids: tuple[int, ...]
    tokens: tuple[str, ...]
    max_length: int
    prefix: int  # special tokens the tokenizer puts before the prompt (CLIP: 1, T5: 0)
    suffix: int  # and after it (end-of-text)
    rule: WordRule = CLIP_RULE

    @property
    def num_prompt_tokens(self) -> int:
        """Prompt tokens that fit in the encoder (special tokens excluded)."""
        return min(len(self.ids), self.max_length) - self.prefix - self.suffix

    @property
    def first_index(self) -> int:
        return self.prefix

    @property
    def last_index(self) -> int:
        """Position of the last prompt token that fits."""
        return self.prefix + self.num_prompt_tokens - 1

    @property
    def eot_index(self) -> int:
        """Position of the end token as the encoder sees it (after truncation)."""
        return min(len(self.ids), self.max_length) - 1

    @property
    def special_positions(self) -> list[int]:
        """Start and end tokens as the encoder sees them (padding excluded)."""
        return [*range(self.prefix), *range(self.last_index + 1, self.eot_index + 1)]

    def is_special(self, i: int) -> bool:
        return i < self.prefix or i >= len(self.ids) - self.suffix

    def rows(self) -> list[TokenInfo]:
        words = self.rule.words(self.tokens, tuple(self.is_special(i) for i in range(len(self.tokens))))
        return [TokenInfo(i, tok, w, self.rule.text(tok)) for i, (tok, w) in enumerate(zip(self.tokens, words))]

    def format(self) -> str:
        """The table a user reads to pick indices (``attncontrol tokens``)."""
        lines = [f"{'index':>5}  {'token':<20} word"]
        for row in self.rows():
            note = "  (cut off: beyond the encoder's limit)" if row.index > self.eot_index else ""
            lines.append(f"{row.index:>5}  {row.token:<20} {row.word}{note}")
        return "\n".join(lines)


def _affixes(tokenizer, ids: list[int], bare: list[int]) -> tuple[int, int]:
    """How many special tokens the tokenizer put before and after the prompt's own tokens."""
    n = len(bare)
    for prefix in range(len(ids) - n + 1):
        if ids[prefix : prefix + n] == bare:
            return prefix, len(ids) - n - prefix
    raise SubjectError(f"cannot locate the prompt's tokens inside what {type(tokenizer).__name__} returns")


def tokenize(tokenizer, prompt: str, max_length: int | None = None) -> TokenTable:
    """Tokenise ``prompt`` as the pipeline does, but without truncation so cut-off subjects can be detected.
    ``max_length``: the encoder's limit (default: the tokenizer's ``model_max_length``)."""
    if not isinstance(prompt, str):
        raise OptionTypeError(f"prompt must be a str, got {type(prompt).__name__}")
    check_text(prompt, "the prompt")
    ids = tokenizer(prompt, add_special_tokens=True, truncation=False).input_ids
    bare = tokenizer(prompt, add_special_tokens=False, truncation=False).input_ids
    prefix, suffix = _affixes(tokenizer, ids, bare)
    tokens = tokenizer.convert_ids_to_tokens(ids)
    limit = int(max_length if max_length is not None else tokenizer.model_max_length)
    return TokenTable(prompt, tuple(ids), tuple(tokens), limit, prefix, suffix, word_rule(tokenizer))


def _find(seq: tuple[int, ...], sub: list[int], start: int) -> list[int]:
    n = len(sub)
    return [i for i in range(start, len(seq) - n + 1) if list(seq[i : i + n]) == sub]


def _index_subject(table: TokenTable, subject: int) -> tuple[int, ...]:
    if not table.first_index <= subject <= table.last_index:
        specials = ", ".join(str(i) for i in table.special_positions)
        raise SubjectError(
            f"token index {subject} is not a prompt token of {table.prompt!r}: valid indices are "
            f"{table.first_index}..{table.last_index} (special tokens: {specials})\n{table.format()}"
        )
    return (subject,)


def resolve_subject(tokenizer, table: TokenTable, subject: str | int) -> tuple[int, ...]:
    """Positions of one subject in ``table``. Raises a :class:`SubjectError` naming it and showing the tokens."""
    if isinstance(subject, bool) or not isinstance(subject, (int, str)):
        raise SubjectError(f"a subject must be a word, a phrase or a token index, got {subject!r}")
    if isinstance(subject, int):
        return _index_subject(table, subject)
    text = check_text(subject, "the subject").strip()
    occurrence = None
    m = _OCCURRENCE.match(text)
    if m:
        text, occurrence = m.group("text").strip(), int(m.group("n"))
    if not text:
        raise SubjectError(f"empty subject {subject!r}")
    sub_ids = tokenizer(text, add_special_tokens=False).input_ids
    hits = _find(table.ids[: len(table.ids) - table.suffix], sub_ids, table.prefix) if sub_ids else []
    if not hits:
        raise SubjectNotInPromptError(f"subject {subject!r} is not in the prompt {table.prompt!r}\n{table.format()}")
    if occurrence is None:
        if len(hits) > 1:
            raise AmbiguousSubjectError(
                f"subject {subject!r} occurs {len(hits)} times in {table.prompt!r} (at token indices "
                f"{hits}); name one occurrence, e.g. '{text}#1' or '{text}#{len(hits)}', or pass an index"
                f"\n{table.format()}"
            )
        start = hits[0]
    else:
        if not 1 <= occurrence <= len(hits):
            raise SubjectNotInPromptError(
                f"subject {subject!r}: {text!r} occurs {len(hits)} time(s) in {table.prompt!r}, "
                f"so occurrence #{occurrence} does not exist\n{table.format()}"
            )
        start = hits[occurrence - 1]
    positions = tuple(range(start, start + len(sub_ids)))
    if positions[-1] > table.last_index:
        raise SubjectTruncatedError(
            f"subject {subject!r} sits at token {positions[-1]}, beyond the text encoder's limit of "
            f"{table.max_length} tokens, so the model never sees it; shorten the prompt {table.prompt!r}"
            f"\n{table.format()}"
        )
    return positions


def resolve_subjects(
    tokenizer, prompt: str, subjects: list[str | int], max_length: int | None = None
) -> list[tuple[int, ...]]:
    """Positions of every subject of ``prompt``; rejects an empty list and a subject named twice."""
    if not subjects:
        raise SubjectError(f"no subjects given for the prompt {prompt!r}")
    table = tokenize(tokenizer, prompt, max_length)
    resolved = [resolve_subject(tokenizer, table, s) for s in subjects]
    seen: dict[tuple[int, ...], str | int] = {}
    for s, pos in zip(subjects, resolved):
        if pos in seen:
            raise SubjectError(
                f"subjects {seen[pos]!r} and {s!r} name the same tokens {list(pos)} of {prompt!r}\n{table.format()}"
            )
        seen[pos] = s
    return resolved
