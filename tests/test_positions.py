"""The shared position vocabulary on real subword tokenization.

The toy tokenizer splits on whitespace, so every word is a token and a boundary check cannot fail. Here
a byte-level BPE (the scheme of SmolLM2 and GPT-2: leading-space tokens, words split into pieces) is
trained in a second on the project's own two-hop queries, and a tiny llama is built over it: the
bridge entity's last token is found in every query, and an entity that is not in the query, or that
ends inside a token, is one located error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import build_tiny_model

from modelprobe.errors import DataError, SiteError
from modelprobe.kinds import instantiate, load
from modelprobe.spec import TokenPosition
from modelprobe.toolkit.prompts import text_token_index, token_index

ROOT = Path(__file__).parent.parent
ROWS = [json.loads(line) for line in (ROOT / "probes" / "data" / "two_hop.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def bpe_subject():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from modelprobe.report.record import ModelInfo
    from modelprobe.subject import SiteMap, Subject

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<pad>", "<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator([r["query"] for r in ROWS] + [r["hop1"] for r in ROWS], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    model = build_tiny_model("llama", tok)
    info = ModelInfo(id="tiny-llama-bpe", slug="tiny-llama-bpe", model_type="llama", n_layers=2)
    return Subject(model, tok, info, SiteMap(model), batch_size=8, progress=False)


def test_the_tokenizer_splits_words(bpe_subject):
    """What the tests below rely on: some entities are several tokens (the boundary check has work)."""
    pieces = [len(bpe_subject.token_id(" " + r["entity"])) for r in ROWS]
    assert max(pieces) > 1 and min(pieces) == 1


def test_bridge_entity_last_token_is_found(bpe_subject):
    for r in ROWS:
        ids = bpe_subject.encode(r["query"])
        i = text_token_index(bpe_subject, r["query"], ids, r["entity"], 0)
        assert bpe_subject.decode(ids[:i + 1]).endswith(r["entity"])
        assert not bpe_subject.decode(ids[:i]).endswith(r["entity"])  # the entity's last token, not a later one
        assert i < len(ids) - 1


def test_entity_ending_inside_a_token(bpe_subject):
    """An entity that is one token, cut short by a letter, ends inside that token."""
    row = next(r for r in ROWS if len(bpe_subject.token_id(" " + r["entity"])) == 1 and len(r["entity"]) > 3)
    cut = row["entity"][:-1]
    ids = bpe_subject.encode(row["query"])
    with pytest.raises(SiteError, match=f"does not end a token where '{cut}' ends"):
        text_token_index(bpe_subject, row["query"], ids, cut, 0)


def test_position_vocabulary(bpe_subject):
    text = "Syria: Syria; leaf: leaf; Paris: Paris; x:"
    ids = bpe_subject.encode(text)
    x = token_index(bpe_subject, text, ids, TokenPosition(token=" x"))
    assert bpe_subject.decode(ids[:x + 1]).endswith("; x") and x == len(ids) - 2
    assert token_index(bpe_subject, text, ids, "last") == len(ids) - 1
    assert token_index(bpe_subject, text, ids, -2) == x
    first = token_index(bpe_subject, text, ids, TokenPosition(token=" Syria", occurrence=0))
    assert bpe_subject.decode(ids[:first + 1]) == "Syria: Syria"
    with pytest.raises(SiteError, match="' Syria' occurs once in .*; occurrence -2 does not exist"):
        token_index(bpe_subject, text, ids, TokenPosition(token=" Syria", occurrence=-2))


def test_entity_not_in_the_query_is_a_located_data_error(bpe_subject, tmp_path):
    rows = [dict(r) for r in ROWS[:6]]
    rows[4]["entity"] = "Atlantis"
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "ps.probe.yaml").write_text("""\
kind: patchscope
source: {prompts: data/q.jsonl, field: query, position: bridge_entity_last, layers: all}
target: {prompt: "Syria: Syria; leaf: leaf; x:", position: {token: " x"}, layer: same}
read: {max_new_tokens: 2, expect_field: hop1_answer}
claims:
  decodable:
    expect: {decode_rate: {at_least: 0.5}}
""")
    with pytest.raises(DataError, match=r"q.jsonl:5: field 'entity': 'Atlantis' does not occur in 'The "):
        instantiate(load(tmp_path / "ps.probe.yaml"), bpe_subject).run()
