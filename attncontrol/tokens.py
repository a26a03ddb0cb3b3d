"""Prompt -> token positions: subjects as words, phrases (``"red car"``), occurrences (``"cat#2"``) or indices.

Positions are indices into the tokenised prompt as the text encoder sees it. Which positions are special (a
start token, the end token, padding) is read from the tokenizer itself: the tokens it adds around a prompt.
CLIP: 0 is start-of-text, ``1..n`` the prompt's tokens, ``n + 1`` end-of-text, then padding up to 77. T5: no
start token, ``0..n-1`` the prompt's tokens, then ``</s>`` and ``<pad>``.

Words are grouped by a small rule per tokenizer (:class:`WordRule`): CLIP's BPE marks a word's last piece with
``</w>``; sentencepiece (T5, Gemma) marks a word's first piece with ``▁``; byte-level BPE (the LLM encoders: Qwen,
Mistral) marks it with ``Ġ``, the byte table's space, and a word after a newline or a template token has no marker.

Pipelines with an LLM text encoder do not tokenise the prompt alone: they render it into a template (a chat
template, an instruction) and may drop the template's first tokens. :class:`PromptTemplate` says how, and
:class:`TemplatedTokenizer` tokenises as the encoder then sees it, so a table's positions are the positions the
denoiser attends to and the template's tokens are its prefix and suffix (special, never a subject). A pipeline that
keeps a window of a padded sequence rather than dropping a prefix (the first token, then the last ones) says so with
a :class:`TailWindow`; one that lower-cases the prompt first, with ``lower``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

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
BYTE_LEVEL_RULE = WordRule("\u0120", at_end=False)  # "Ġ": the byte-level table's character for a space
NO_RULE = WordRule("\0", at_end=True)  # every token is its own word (unknown conventions)


def word_rule(tokenizer) -> WordRule:
    """The word rule of ``tokenizer``, read from how it tokenises two ordinary words."""
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("a photo", add_special_tokens=False).input_ids)
    for rule in (CLIP_RULE, SENTENCEPIECE_RULE, BYTE_LEVEL_RULE):
        if any(t.endswith(rule.marker) if rule.at_end else t.startswith(rule.marker) for t in tokens):
            return rule
    return NO_RULE


@dataclass(frozen=True)
class PromptTemplate:
    """How a pipeline wraps a prompt before its text encoder, and which of the resulting tokens it keeps.

    ``pattern``: a ``str.format`` pattern with one ``{}`` for the prompt; or ``chat``: the tokenizer's own chat
    template is applied to the messages ``messages(prompt)`` gives, with ``chat_kwargs`` (e.g.
    ``add_generation_prompt``). ``special``: whether the tokenizer adds its special tokens to the rendered text
    (a chat template that writes its own BOS is tokenised without). ``drop``: leading tokens the pipeline drops
    from the encoder's output (they never reach the denoiser). ``lower``: the pipeline lower-cases the prompt
    first (and so the subjects are matched lower-cased)."""

    pattern: str | None = None
    messages: Callable[[str], list[dict[str, Any]]] | None = None
    chat_kwargs: tuple[tuple[str, Any], ...] = ()
    special: bool = True
    drop: int = 0
    window: TailWindow | None = None  # the ids kept after ``drop``: a window of the padded sequence
    lower: bool = False

    def render(self, tokenizer, prompt: str) -> str:
        prompt = self.seen(prompt)
        if self.messages is not None:
            return tokenizer.apply_chat_template(self.messages(prompt), tokenize=False, **dict(self.chat_kwargs))
        return prompt if self.pattern is None else self.pattern.format(prompt)

    def seen(self, text: str) -> str:
        """``text`` as the pipeline hands it on (lower-cased and stripped where it lower-cases)."""
        return text.lower().strip() if self.lower else text

    def wrap(self, tokenizer) -> TemplatedTokenizer:
        return TemplatedTokenizer(tokenizer, self)


@dataclass(frozen=True)
class TailWindow:
    """A pipeline that pads the rendered ids to ``len(tokenizer(reference)) + extra`` tokens (the token count of a
    reference text, e.g. its instruction alone, plus a margin) and keeps the first ``head`` of them and the last
    ``length - head``: the ``length`` positions the denoiser attends to. :meth:`select` gives those positions of
    the unpadded, untruncated ids; ids past the padded length come after the window's end (cut off)."""

    head: int
    length: int
    reference: str
    extra: int

    def select(self, tokenizer, ids: list[int]) -> list[int]:
        pad_to = len(tokenizer(self.reference).input_ids) + self.extra
        start = pad_to - (self.length - self.head)
        if start < self.head:
            raise OptionError(f"the window keeps {self.length} of {pad_to} padded tokens: it overlaps its head")
        return ids[: self.head] + ids[start:]


def user_message(prompt: str) -> list[dict[str, Any]]:
    """The chat of one user turn holding the prompt (as the Qwen3-encoded pipelines build it)."""
    return [{"role": "user", "content": prompt}]


class TemplatedTokenizer:
    """A tokenizer as a templated pipeline applies it: ``tok(prompt)`` gives the ids the encoder's output keeps
    (the prompt rendered by ``template``, its first ``template.drop`` tokens dropped), ``tok(text,
    add_special_tokens=False)`` the bare text's ids (subjects). Everything else is the wrapped tokenizer's."""

    def __init__(self, tokenizer, template: PromptTemplate):
        self.tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor (a VLM's) holds its tokenizer
        self.chat = tokenizer  # the object whose chat template the pipeline applies
        self.template = template

    def __call__(self, text: str, add_special_tokens: bool = True, truncation: bool = False, **kwargs):
        if not add_special_tokens:
            bare = text.lower() if self.template.lower else text  # not stripped: a subject's leading space counts
            return self.tokenizer(bare, add_special_tokens=False, truncation=False)
        rendered = self.template.render(self.chat, text)
        ids = self.tokenizer(rendered, add_special_tokens=self.template.special, truncation=False).input_ids
        kept = list(ids)[self.template.drop :]
        window = self.template.window
        return SimpleNamespace(input_ids=kept if window is None else window.select(self.tokenizer, kept))

    def __len__(self) -> int:
        return len(self.tokenizer)

    def __getattr__(self, name: str):
        return getattr(self.tokenizer, name)


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


def _affixes(tokenizer, ids: list[int], candidates: list[list[int]]) -> tuple[int, int]:
    """How many special tokens the tokenizer put before and after the prompt's own tokens (``candidates``: the
    prompt's bare ids, then as they read after a space, for a template that ends in one)."""
    for bare in candidates:
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
    texts = (prompt, " " + prompt.strip())  # the second: the prompt after a template that ends in a space
    bare = [tokenizer(text, add_special_tokens=False, truncation=False).input_ids for text in texts]
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


def _hits(tokenizer, table: TokenTable, text: str) -> list[tuple[int, int]]:
    """(start, length) of every occurrence of ``text`` among the prompt's tokens. A word inside a sentence carries
    its leading space in the byte-level and sentencepiece vocabularies that do not add one to a bare text (Qwen,
    Mistral, Gemma: "cat" alone is ``cat``, after a space ``Ġcat``), so the text is looked for both ways."""
    prompt_ids = table.ids[: len(table.ids) - table.suffix]
    found: dict[int, int] = {}
    for variant in (text, " " + text):
        sub_ids = tokenizer(variant, add_special_tokens=False).input_ids
        for start in _find(prompt_ids, sub_ids, table.prefix) if sub_ids else []:
            if variant is text and not _starts_a_word(table, start):
                continue  # the bare text's pieces inside a longer word ("cat" in "bob" + "cat")
            found.setdefault(start, len(sub_ids))
    return sorted(found.items())


def _starts_a_word(table: TokenTable, start: int) -> bool:
    rule = table.rule
    if rule.at_end or rule is NO_RULE or start == table.prefix:
        return True  # CLIP marks word ends: its bare text already ends a word, as before
    return table.tokens[start].startswith(rule.marker) or not table.tokens[start - 1].strip()


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
    hits = _hits(tokenizer, table, text)
    if not hits:
        raise SubjectNotInPromptError(f"subject {subject!r} is not in the prompt {table.prompt!r}\n{table.format()}")
    if occurrence is None:
        if len(hits) > 1:
            raise AmbiguousSubjectError(
                f"subject {subject!r} occurs {len(hits)} times in {table.prompt!r} (at token indices "
                f"{[start for start, _ in hits]}); name one occurrence, e.g. '{text}#1' or '{text}#{len(hits)}', "
                "or pass an index"
                f"\n{table.format()}"
            )
        start, length = hits[0]
    else:
        if not 1 <= occurrence <= len(hits):
            raise SubjectNotInPromptError(
                f"subject {subject!r}: {text!r} occurs {len(hits)} time(s) in {table.prompt!r}, "
                f"so occurrence #{occurrence} does not exist\n{table.format()}"
            )
        start, length = hits[occurrence - 1]
    positions = tuple(range(start, start + length))
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
