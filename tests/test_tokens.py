import pytest

from attncontrol import (
    AmbiguousSubjectError,
    SubjectError,
    SubjectNotInPromptError,
    SubjectTruncatedError,
    resolve_subjects,
    tokenize,
)
from attncontrol.controls.base import ControlContext


def test_offline_tokenizer_matches_stable_diffusion_ids(tokenizer):
    # Stable Diffusion's tokenizer gives exactly these ids (SOT, a, cat, and, a, dog, EOT).
    assert tokenizer("a cat and a dog").input_ids == [49406, 320, 2368, 537, 320, 1929, 49407]


def test_words_resolve_to_their_token_positions(tokenizer):
    assert resolve_subjects(tokenizer, "a cat and a dog", ["cat", "dog"]) == [(2,), (5,)]
    assert resolve_subjects(tokenizer, "a cat and a dog", [2, "dog"]) == [(2,), (5,)]
    # case and surrounding spaces do not matter (CLIP lower-cases)
    assert resolve_subjects(tokenizer, "A Cat and a dog", [" CAT "]) == [(2,)]


def test_phrase_and_split_word_resolve_to_all_their_tokens(tokenizer):
    assert resolve_subjects(tokenizer, "a red car and a blue bench", ["red car", "bench"]) == [(2, 3), (7,)]
    word = "attncontrolling"
    pieces = tokenizer(word, add_special_tokens=False).input_ids
    assert len(pieces) > 1  # the word is split into several BPE tokens
    (pos,) = resolve_subjects(tokenizer, f"a {word} and a dog", [word])
    assert pos == tuple(range(2, 2 + len(pieces)))
    table = tokenize(tokenizer, f"a {word} and a dog")
    assert [r.word for r in table.rows()][2 : 2 + len(pieces)] == [word] * len(pieces)


def test_repeated_word_needs_an_occurrence(tokenizer):
    with pytest.raises(AmbiguousSubjectError) as err:
        resolve_subjects(tokenizer, "a cat and a cat", ["cat"])
    assert "'cat'" in str(err.value) and "cat#2" in str(err.value)
    assert resolve_subjects(tokenizer, "a cat and a cat", ["cat#1", "cat#2"]) == [(2,), (5,)]
    with pytest.raises(SubjectNotInPromptError, match="#3"):
        resolve_subjects(tokenizer, "a cat and a cat", ["cat#3"])


def test_missing_subject_error_names_it_and_shows_tokens(tokenizer):
    with pytest.raises(SubjectNotInPromptError) as err:
        resolve_subjects(tokenizer, "a cat and a dog", ["cat", "horse"])
    message = str(err.value)
    assert "'horse'" in message and "a cat and a dog" in message
    assert "dog</w>" in message  # the token table is shown
    assert isinstance(err.value, ValueError)


def test_subject_cut_off_by_the_token_limit_is_rejected(tokenizer):
    prompt = "a cat " + "very " * 80 + "and a dog"
    assert resolve_subjects(tokenizer, prompt, ["cat"]) == [(2,)]
    with pytest.raises(SubjectTruncatedError, match="'dog'"):
        resolve_subjects(tokenizer, prompt, ["dog"])
    with pytest.raises(SubjectError, match="token index 80"):
        resolve_subjects(tokenizer, prompt, [80])


@pytest.mark.parametrize("bad", [0, 6, 7, 76, -1])
def test_special_or_out_of_range_indices_are_rejected(tokenizer, bad):
    with pytest.raises(SubjectError, match=f"token index {bad} "):
        resolve_subjects(tokenizer, "a cat and a dog", [bad])


def test_other_bad_subjects(tokenizer):
    with pytest.raises(SubjectError, match="no subjects"):
        resolve_subjects(tokenizer, "a cat", [])
    with pytest.raises(SubjectError, match="same tokens"):
        resolve_subjects(tokenizer, "a cat and a dog", ["cat", 2])
    with pytest.raises(SubjectError, match="empty subject"):
        resolve_subjects(tokenizer, "a cat", ["  "])
    with pytest.raises(SubjectError, match="1.5"):
        resolve_subjects(tokenizer, "a cat", [1.5])


def test_token_table_lists_index_token_word(tokenizer):
    text = tokenize(tokenizer, "a cat and a dog").format()
    lines = text.splitlines()
    assert lines[0].split() == ["index", "token", "word"]
    assert lines[3].split() == ["2", "cat</w>", "cat"]
    assert len(lines) == 1 + 7


def _ctx(tok, prompts, per_prompt=1):
    ctx = ControlContext.simple(tok, prompts, (8, 8), (4, 4), num_steps=1)
    ctx.num_images_per_prompt = per_prompt
    return ctx


def test_keep_masks_diffusers_and_sd2_rules(tokenizer, sd2_tokenizer):
    # diffusers' A&E keeps tokens 1..75 (slice [1:-1]): EOT and padding stay in the softmax.
    keep = _ctx(tokenizer, ["a cat and a dog"]).keep_mask(exclude_eot=False)
    assert keep[0].nonzero().flatten().tolist() == list(range(1, 76))
    # the official SD 2.1 rule keeps only the prompt's 5 tokens
    keep2 = _ctx(sd2_tokenizer, ["a cat and a dog", "a bird"]).keep_mask(exclude_eot=True)
    assert keep2[0].nonzero().flatten().tolist() == [1, 2, 3, 4, 5]
    assert keep2[1].nonzero().flatten().tolist() == [1, 2]
    assert sd2_tokenizer("a cat", padding="max_length", max_length=6).input_ids == [49406, 320, 2368, 49407, 0, 0]


def test_subjects_per_prompt(tokenizer):
    ctx = _ctx(tokenizer, ["a cat and a dog", "a bird and a bear"], per_prompt=2)
    assert ctx.prompts == ["a cat and a dog"] * 2 + ["a bird and a bear"] * 2
    assert ctx.subjects_per_image([["cat", "dog"], ["bird", "bear"]]) == [[(2,), (5,)]] * 2 + [[(2,), (5,)]] * 2
    assert ctx.subjects_per_image([["dog"], ["a bird"]]) == [[(5,)], [(5,)], [(1, 2)], [(1, 2)]]
    with pytest.raises(ValueError, match="one list per prompt"):
        ctx.subjects_per_image([["cat"]])
    with pytest.raises(SubjectNotInPromptError, match="bird"):
        ctx.subjects_per_image(["bird"])  # one list for all prompts: not in the first


# ---------------------------------------------------------------- byte-level BPE and prompt templates (LLM encoders)


@pytest.fixture(scope="module")
def chatml():
    from attncontrol.testing.vocab import make_chatml_tokenizer

    return make_chatml_tokenizer()


def test_byte_level_words_are_found_with_or_without_their_leading_space(chatml):
    from attncontrol.tokens import BYTE_LEVEL_RULE, word_rule

    assert word_rule(chatml) is BYTE_LEVEL_RULE
    prompt = "cat and a red cat beside a bobcat"
    tokens = chatml.convert_ids_to_tokens(chatml(prompt).input_ids)
    # the first word has no space before it, the others do: "cat" is two different tokens here
    assert tokens[0] == "cat" and "\u0120cat" in tokens
    first, second = resolve_subjects(chatml, prompt, ["cat#1", "red cat"])
    assert tokens[first[0]] == "cat" and [tokens[p] for p in second] == ["\u0120red", "\u0120cat"]
    # three whole-word occurrences would be wrong: "bob" + "cat" is one word, which "cat" does not name
    with pytest.raises(AmbiguousSubjectError, match="occurs 2 times"):
        resolve_subjects(chatml, prompt, ["cat"])
    words = tokenize(chatml, prompt).rows()
    assert {r.word for r in words if r.token == "cat"} == {"cat", "bobcat"}


def test_a_chat_template_gives_the_positions_the_encoder_sees(chatml):
    """The table of a templated prompt is the rendered chat, its template tokens special (prefix and suffix), and a
    dropped prefix shifts every position: the subject's index is the encoder's output position."""
    from attncontrol.tokens import PromptTemplate, user_message

    chat = PromptTemplate(messages=user_message, chat_kwargs=(("add_generation_prompt", True),))
    prompt = "a red cat"
    rendered = chatml.apply_chat_template(user_message(prompt), tokenize=False, add_generation_prompt=True)
    ids = chatml(rendered).input_ids
    table = tokenize(chat.wrap(chatml), prompt, 64)
    assert list(table.ids) == ids and table.prefix == 3  # <|im_start|> user \n
    (cat,) = resolve_subjects(chat.wrap(chatml), prompt, ["cat"], 64)
    assert chatml.convert_ids_to_tokens([ids[cat[0]]]) == ["\u0120cat"]
    assert table.special_positions == [0, 1, 2, *range(6, len(ids))]
    dropped = PromptTemplate(messages=user_message, chat_kwargs=(("add_generation_prompt", True),), drop=2)
    assert resolve_subjects(dropped.wrap(chatml), prompt, ["cat"], 64) == [(cat[0] - 2,)]
    with pytest.raises(SubjectNotInPromptError, match="assistant"):  # the template is not the prompt
        resolve_subjects(chat.wrap(chatml), prompt, ["assistant"], 64)
