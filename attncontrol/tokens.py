"""Prompt -> token positions: subjects as words, phrases (``"red car"``), occurrences (``"cat#2"``) or indices.

Positions are indices into the tokenised prompt as the text encoder sees it: 0 is the start-of-text
token, ``1..n`` are the prompt's tokens, ``n + 1`` is end-of-text, then padding up to 77.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import AmbiguousSubjectError, SubjectError, SubjectNotInPromptError, SubjectTruncatedError

_OCCURRENCE = re.compile(r"^(?P<text>.*?)#(?P<n>\d+)$")


@dataclass(frozen=True)
class TokenInfo:
    index: int
    token: str
    word: str


@dataclass(frozen=True)
class TokenTable:
    """The tokenised prompt: ids with SOT/EOT, untruncated, and the model's limit."""

    prompt: str
    ids: tuple[int, ...]
    tokens: tuple[str, ...]
    max_length: int

    @property
    def num_prompt_tokens(self) -> int:
        """Prompt tokens that fit in the encoder (SOT and EOT excluded)."""
        return min(len(self.ids), self.max_length) - 2

    @property
    def eot_index(self) -> int:
        """Position of the end-of-text token as the encoder sees it (after truncation)."""
        return min(len(self.ids), self.max_length) - 1

    def rows(self) -> list[TokenInfo]:
        words = _token_words(self.tokens)
        return [TokenInfo(i, tok, w) for i, (tok, w) in enumerate(zip(self.tokens, words))]

    def format(self) -> str:
        """The table a user reads to pick indices (``attncontrol tokens``)."""
        lines = [f"{'index':>5}  {'token':<20} word"]
        for row in self.rows():
            note = "  (cut off: beyond the encoder's limit)" if row.index > self.eot_index else ""
            lines.append(f"{row.index:>5}  {row.token:<20} {row.word}{note}")
        return "\n".join(lines)


def _token_words(tokens: tuple[str, ...]) -> list[str]:
    """The word each token belongs to (CLIP BPE marks a word's last piece with ``</w>``)."""
    words: list[str] = []
    pending: list[int] = []
    for i, tok in enumerate(tokens):
        if tok.startswith("<|") and tok.endswith("|>"):
            words.append("")
            continue
        pending.append(i)
        words.append("")
        if tok.endswith("</w>") or i == len(tokens) - 1:
            word = "".join(tokens[j].removesuffix("</w>") for j in pending)
            for j in pending:
                words[j] = word
            pending = []
    return words


def tokenize(tokenizer, prompt: str) -> TokenTable:
    """Tokenise ``prompt`` as the pipeline does, but without truncation so cut-off subjects can be detected."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    ids = tokenizer(prompt, add_special_tokens=True, truncation=False).input_ids
    tokens = tokenizer.convert_ids_to_tokens(ids)
    return TokenTable(prompt, tuple(ids), tuple(tokens), int(tokenizer.model_max_length))


def _find(seq: tuple[int, ...], sub: list[int]) -> list[int]:
    n = len(sub)
    return [i for i in range(1, len(seq) - n + 1) if list(seq[i : i + n]) == sub]


def resolve_subject(tokenizer, table: TokenTable, subject: str | int) -> tuple[int, ...]:
    """Positions of one subject in ``table``. Raises a :class:`SubjectError` naming it and showing the tokens."""
    if isinstance(subject, bool) or not isinstance(subject, (int, str)):
        raise SubjectError(f"a subject must be a word, a phrase or a token index, got {subject!r}")
    if isinstance(subject, int):
        if not 1 <= subject <= table.num_prompt_tokens:
            raise SubjectError(
                f"token index {subject} is not a prompt token of {table.prompt!r}: valid indices are "
                f"1..{table.num_prompt_tokens} (0 is start-of-text, {table.eot_index} end-of-text)\n{table.format()}"
            )
        return (subject,)
    text = subject.strip()
    occurrence = None
    m = _OCCURRENCE.match(text)
    if m:
        text, occurrence = m.group("text").strip(), int(m.group("n"))
    if not text:
        raise SubjectError(f"empty subject {subject!r}")
    sub_ids = tokenizer(text, add_special_tokens=False).input_ids
    hits = _find(table.ids[:-1], sub_ids) if sub_ids else []
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
    if positions[-1] > table.num_prompt_tokens:
        raise SubjectTruncatedError(
            f"subject {subject!r} sits at token {positions[-1]}, beyond the text encoder's limit of "
            f"{table.max_length} tokens, so the model never sees it; shorten the prompt {table.prompt!r}"
            f"\n{table.format()}"
        )
    return positions


def resolve_subjects(tokenizer, prompt: str, subjects: list[str | int]) -> list[tuple[int, ...]]:
    """Positions of every subject of ``prompt``; rejects an empty list and a subject named twice."""
    if not subjects:
        raise SubjectError(f"no subjects given for the prompt {prompt!r}")
    table = tokenize(tokenizer, prompt)
    resolved = [resolve_subject(tokenizer, table, s) for s in subjects]
    seen: dict[tuple[int, ...], str | int] = {}
    for s, pos in zip(subjects, resolved):
        if pos in seen:
            raise SubjectError(
                f"subjects {seen[pos]!r} and {s!r} name the same tokens {list(pos)} of {prompt!r}\n{table.format()}"
            )
        seen[pos] = s
    return resolved
