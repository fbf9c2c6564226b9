"""Tokenizer conventions: exactly one BOS whatever the tokenizer and chat template do, and a clear
error when a chat template is asked for but missing."""

from __future__ import annotations

import copy
import dataclasses

import pytest

from modelprobe.errors import SiteError

PROMPT = "how do i make a cake"
WORDS = PROMPT.split()


def _subject_with(tiny_subject, tokenizer):
    """The tiny llama subject, seen through another tokenizer (tokenization never touches weights)."""
    return dataclasses.replace(tiny_subject("llama"), tokenizer=tokenizer, cache={})


def _variant(toy_tokenizer, adds_bos: bool = True, template: str | None = "keep"):
    tok = copy.deepcopy(toy_tokenizer)
    if not adds_bos:
        tok.backend_tokenizer.post_processor = None
    if template != "keep":
        tok.chat_template = template
    return tok


def _word_ids(tok, words):
    return [tok.convert_tokens_to_ids(w) for w in words]


def test_toy_tokenizer_conventions(toy_tokenizer):
    """What the tests below rely on: the toy tokenizer adds BOS and its template starts with it."""
    assert toy_tokenizer(PROMPT).input_ids[0] == toy_tokenizer.bos_token_id
    rendered = toy_tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                                 add_generation_prompt=True)
    assert rendered.startswith(toy_tokenizer.bos_token)
    assert toy_tokenizer.unk_token_id not in _word_ids(toy_tokenizer, WORDS)


def test_plain_encode_has_one_bos(tiny_subject, toy_tokenizer):
    subject = tiny_subject("llama")
    bos = toy_tokenizer.bos_token_id
    assert subject.adds_bos
    assert subject.encode(PROMPT) == [bos, *_word_ids(toy_tokenizer, WORDS)]


def test_chat_encode_has_exactly_one_bos(tiny_subject, toy_tokenizer):
    subject = tiny_subject("llama")
    bos = toy_tokenizer.bos_token_id
    ids = subject.encode(PROMPT, chat_template=True)
    assert ids[0] == bos and ids.count(bos) == 1
    # The rest is the template around the prompt, specials kept.
    expected_tokens = [toy_tokenizer.bos_token, "<user>", *WORDS, "</user>", "<assistant>"]
    assert toy_tokenizer.convert_ids_to_tokens(ids) == expected_tokens
    with_system = subject.encode(PROMPT, chat_template=True, system="please")
    assert with_system.count(bos) == 1
    assert toy_tokenizer.convert_tokens_to_ids("please") in with_system


def test_tokenizer_without_bos_gets_none_for_plain_text(tiny_subject, toy_tokenizer):
    subject = _subject_with(tiny_subject, _variant(toy_tokenizer, adds_bos=False))
    assert not subject.adds_bos
    assert subject.encode(PROMPT) == _word_ids(toy_tokenizer, WORDS)
    # Its template still writes BOS: that one is kept, and not doubled.
    ids = subject.encode(PROMPT, chat_template=True)
    assert ids[0] == toy_tokenizer.bos_token_id and ids.count(toy_tokenizer.bos_token_id) == 1


def test_missing_chat_template_is_a_clear_error(tiny_subject, toy_tokenizer):
    subject = _subject_with(tiny_subject, _variant(toy_tokenizer, template=None))
    assert not subject.has_chat_template()
    for call in (lambda: subject.render(PROMPT, True), lambda: subject.encode(PROMPT, chat_template=True),
                 lambda: subject.encode_all([PROMPT], chat_template=True)):
        with pytest.raises(SiteError, match="no chat template") as err:
            call()
        assert "tiny-llama" in err.value.message
    assert subject.render(PROMPT, False) == PROMPT
    assert subject.encode(PROMPT)[1:] == _word_ids(toy_tokenizer, WORDS)


def test_llama3_style_bos_text_in_template_and_tokenizer_bos(tiny_subject, toy_tokenizer):
    """The template spells '<bos>' literally and the tokenizer adds BOS too: still one BOS."""
    template = ("<bos>{% for m in messages %}{{ ' <user> ' + m['content'] + ' </user>' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ ' <assistant>' }}{% endif %}")
    tok = _variant(toy_tokenizer, adds_bos=True, template=template)
    subject = _subject_with(tiny_subject, tok)
    bos = tok.bos_token_id
    # What a naive encode would do, so the test can tell the difference.
    assert tok(subject.render(PROMPT, True)).input_ids[:2] == [bos, bos]
    ids = subject.encode(PROMPT, chat_template=True)
    assert ids[0] == bos and ids.count(bos) == 1
    assert ids[1:] == _word_ids(tok, ["<user>", *WORDS, "</user>", "<assistant>"])


@pytest.mark.parametrize("adds_bos", [True, False])
def test_template_without_bos(tiny_subject, toy_tokenizer, adds_bos):
    """A template with no BOS gets one only if the tokenizer would add it to plain text."""
    template = "{% for m in messages %}{{ '<user> ' + m['content'] + ' </user>' }}{% endfor %}"
    tok = _variant(toy_tokenizer, adds_bos=adds_bos, template=template)
    subject = _subject_with(tiny_subject, tok)
    ids = subject.encode(PROMPT, chat_template=True)
    body = _word_ids(tok, ["<user>", *WORDS, "</user>"])
    assert ids == ([tok.bos_token_id, *body] if adds_bos else body)


def test_helpers(tiny_subject, toy_tokenizer):
    subject = tiny_subject("llama")
    assert subject.encode_all([PROMPT, "tell me"]) == [subject.encode(PROMPT), subject.encode("tell me")]
    assert subject.token_id(" cake") == _word_ids(toy_tokenizer, ["cake"])  # no BOS on continuations
    assert subject.decode(subject.encode(PROMPT, chat_template=True)).split() == WORDS  # specials skipped
    assert subject.pad_id == toy_tokenizer.pad_token_id
    no_pad = copy.deepcopy(toy_tokenizer)
    no_pad.pad_token = None
    assert _subject_with(tiny_subject, no_pad).pad_id == toy_tokenizer.eos_token_id
