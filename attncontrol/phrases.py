"""Noun phrases of a prompt by a small, documented rule (no parser, no model).

T2I-CompBench asks its VQA questions about spaCy's noun chunks and the methods need subjects; neither spaCy nor
its English model can be assumed on a user's machine, so attncontrol splits a prompt with a fixed rule instead:

1. The prompt is read as words and punctuation (a hyphenated word such as ``high-tech`` is one word).
2. A phrase **ends** at punctuation and before a *boundary word*: a conjunction (``and``, ``or``, ``but``), a
   preposition (``of``, ``on``, ``in``, ``with``, ...), a verb of being or having (``is``, ``are``, ``has``, ...)
   or a relative pronoun (``that``, ``which``, ``who``).
3. A phrase **starts** after a determiner (``a``, ``an``, ``the``, possessives, number words), at the start of
   the prompt, or after a conjunction or a preposition (``a slice of cheese``) -- but a run there whose first word
   ends in ``ing`` (``... and marveling at its beauty``) is a verb, not a phrase. Runs after a verb of being
   (``is lazily lounging``) are not phrases.
4. A phrase's **head** is its last word: the subject attncontrol guides (A&E's own convention for its prompts).
   Its **text** is the phrase with its determiner (``a green bench``), the unit T2I-CompBench's questions use.

On T2I-CompBench's ``a ADJ NOUN and a ADJ NOUN`` prompts the texts equal spaCy's noun chunks. Elsewhere the rule
can differ from a parser (it has no part-of-speech tags); ``attncontrol/data/README.md`` says where.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


DETERMINERS = _words(
    "a an the its his her their our my your this that these those some two three four five six seven eight nine ten "
    "several many"
)
CONJUNCTIONS = frozenset({"and", "or", "but"})
PREPOSITIONS = _words(
    "of on in at with from to for by near next under over above below beneath behind beside besides between among "
    "into onto inside outside around across through against along during after before atop without within"
)
BOUNDARIES = (
    CONJUNCTIONS
    | PREPOSITIONS
    | _words("is are was were be been being has have had as while that which who whose where when than like")
)
_TOKEN = re.compile(r"[A-Za-z0-9]+(?:['’-][A-Za-z0-9]+)*|[^\sA-Za-z0-9]")


@dataclass(frozen=True)
class Phrase:
    text: str  # with its determiner: "a green bench"
    head: str  # the last word: "bench"
    occurrence: int  # which occurrence of ``head`` (as a whole word) in the prompt, from 1
    unique: bool = True  # whether ``head`` occurs once in the prompt (else the subject names its occurrence)

    @property
    def subject(self) -> str:
        """The head as an attncontrol subject (``word``, or ``word#k`` when the word occurs more than once)."""
        return self.head if self.unique else f"{self.head}#{self.occurrence}"


def noun_phrases(prompt: str) -> list[Phrase]:
    """The prompt's noun phrases by the module's rule, in prompt order."""
    tokens = _TOKEN.findall(prompt)
    phrases: list[Phrase] = []
    seen: dict[str, int] = {}  # whole-word occurrences so far, lower-case
    run: list[str] = []
    det: str | None = None
    opened = True  # the start of the prompt opens a phrase
    after_conjunction = False

    def close():
        nonlocal run, det, opened, after_conjunction
        if run and opened and not (after_conjunction and run[0].lower().endswith("ing")):
            head = run[-1]
            text = " ".join(([det] if det else []) + run)
            phrases.append(Phrase(text, head, seen[head.lower()]))
        run, det, opened, after_conjunction = [], None, False, False

    for tok in tokens:
        word = tok.lower()
        if tok[0].isalnum():
            seen[word] = seen.get(word, 0) + 1
        if not tok[0].isalnum():
            close()
        elif word in DETERMINERS and not run:
            det, opened = tok, True
        elif word in BOUNDARIES:
            close()
            if word in CONJUNCTIONS or word in PREPOSITIONS:
                opened, after_conjunction = True, True
        elif word in DETERMINERS:  # "the cat a dog": a new phrase begins
            close()
            det, opened = tok, True
        else:
            run.append(tok)
    close()
    return [Phrase(p.text, p.head, p.occurrence, seen[p.head.lower()] == 1) for p in phrases]


def subjects(prompt: str) -> list[str]:
    """The heads of the prompt's noun phrases as attncontrol subjects."""
    return [p.subject for p in noun_phrases(prompt)]
