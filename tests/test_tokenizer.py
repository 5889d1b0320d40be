"""Tokenizer and chat rendering (SPEC §2), on a tiny tokenizer trained on real shard text."""

import itertools

import pytest
import tokenizers
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanochat_ray.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, TRAIN_SPLIT_PATTERN, Tokenizer

VOCAB = 1024  # the smoke tokenizer of conftest.py, trained on shard 0 text


@pytest.fixture(scope="module")
def tok(smoke_tokenizer_dir) -> Tokenizer:
    return Tokenizer.from_directory(smoke_tokenizer_dir)


# ---------------------------------------------------------------------------------------------
# training, vocabulary, save / load


def test_vocab_size_is_exact(tok):
    assert tok.vocab_size == VOCAB
    assert tok.token_bytes().shape == (VOCAB,)


def test_special_token_ids(tok):
    assert [tok.encode_special(name) for name in SPECIAL_TOKENS] == list(range(9))
    assert tok.bos_token_id == tok.encode_special("<|bos|>") == 0
    assert [tok.id_to_token(i) for i in range(9)] == SPECIAL_TOKENS
    assert [tok.id_to_token(9 + b) for b in (0, ord(" "), ord("A"), 0xFF)] == ["Ā", "Ġ", "A", "ÿ"]  # bytes in order
    with pytest.raises(KeyError, match="not a special token"):
        tok.encode_special("hello")


def test_doc_cap_and_max_chars():
    # an endless stream: only max_chars makes training stop; "zebra" lies past each doc's cap
    docs = itertools.repeat("the cat sat on the mat. " * 10 + "zebra " * 1000)
    small = Tokenizer.train_from_iterator(docs, 275, doc_cap=240, max_chars=10_000)
    tokens = [small.id_to_token(i) for i in range(small.vocab_size)]
    assert any("cat" in t for t in tokens)
    assert not any("ze" in t for t in tokens)


def test_too_little_text_for_the_vocab():
    with pytest.raises(ValueError, match="lower vocab_size"):
        Tokenizer.train_from_iterator(["ab ab ab"], 1000)
    with pytest.raises(ValueError, match="vocab_size must be at least 265"):
        Tokenizer.train_from_iterator(["ab ab ab"], 264)


TRICKY = "aZé9² '\"sdmtlvrSDMTLVRſ \t\n\r\u00a0\u3000.,!-—()$١"  # the split's letter/number/space edge cases


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.text(), st.text(alphabet=TRICKY, max_size=30)))
def test_training_split_pattern_splits_like_the_encoders(text):
    """The trainer counts chunks with TRAIN_SPLIT_PATTERN; the encoder splits with SPLIT_PATTERN."""
    def split(pattern):
        return tokenizers.pre_tokenizers.Split(tokenizers.Regex(pattern), "isolated").pre_tokenize_str(text)
    assert split(TRAIN_SPLIT_PATTERN) == split(SPLIT_PATTERN)


def test_encoding_merges_the_lowest_ranked_pair_first(tok, smoke_tokenizer_dir, data_root):
    """The trainer reports ranks, not merge pairs: the encoder must merge as tiktoken does with them.

    Reference: in each chunk, repeatedly join the adjacent pair whose concatenation is the
    lowest-ranked token (the leftmost on a tie), until no adjacent pair forms a token.
    """
    import pyarrow.parquet as pq

    text = "".join(pq.read_table(data_root / "pretrain_text" / "shard_00004.parquet").column("text")
                   .to_pylist()[:3])[:30_000] + TRICKY
    rank = {token: i for token, i in tok.hf.get_vocab().items() if i >= len(SPECIAL_TOKENS)}
    expected = []
    for chunk, _ in tok.hf.pre_tokenizer.pre_tokenize_str(text):
        parts = list(chunk)
        while True:
            joins = [(rank[a + b], i) for i, (a, b) in enumerate(zip(parts, parts[1:])) if a + b in rank]
            if not joins:
                break
            _, i = min(joins)
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        expected += [rank[p] for p in parts]
    assert tok.encode(text) == expected


def test_save_load_round_trip(tok, tmp_path):
    tok.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["token_bytes.pt", "tokenizer.json"]
    text = "Hello world, 12345 — naïve café.\n\tdef f(x): return x**2"
    # tokenizer.json alone, with no code of ours, gives the same ids and text
    raw = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert raw.get_vocab_size() == VOCAB
    assert raw.encode(text).ids == tok.encode(text)
    assert raw.decode(tok.encode(text)) == text
    loaded = Tokenizer.from_directory(tmp_path)
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.encode("<|bos|>") == tok.encode("<|bos|>")
    assert torch.equal(loaded.token_bytes(), tok.token_bytes())


def test_missing_files_name_the_fix(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json.*jobs/tokenizer\.py"):
        Tokenizer.from_directory(tmp_path)
    tok.save(tmp_path)
    (tmp_path / "token_bytes.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"token_bytes\.pt.*jobs/tokenizer\.py"):
        Tokenizer.from_directory(tmp_path)


def test_token_bytes_table(tok):
    table = tok.token_bytes()
    assert table.dtype == torch.int32
    assert table[:9].tolist() == [0] * 9
    for i in range(9, VOCAB):
        text = tok.decode([i])
        if "\ufffd" not in text:  # tokens holding part of a multi-byte char are checked below
            assert table[i] == len(text.encode("utf-8")), tok.id_to_token(i)


# ---------------------------------------------------------------------------------------------
# encode / decode


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_round_trip_any_unicode(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(i >= 9 for i in ids)  # plain text never encodes to a special token
    # bits-per-byte relies on the table summing to the text's UTF-8 length
    assert int(tok.token_bytes()[ids].sum()) == len(text.encode("utf-8"))


def test_special_token_text_encodes_as_plain_bytes(tok):
    text = "say <|bos|> and <|assistant_end|> out loud"
    ids = tok.encode(text)
    assert all(i >= 9 for i in ids)
    assert tok.decode(ids) == text
    assert tok.encode(["<|bos|>"]) == [tok.encode("<|bos|>")]


def test_batch_encode_with_prepend_and_append(tok):
    texts = ["The first document.", "A second one, longer than the first.", ""]
    batch = tok.encode(texts, prepend="<|bos|>", append=tok.encode_special("<|user_end|>"))
    assert batch == [[0] + tok.encode(t) + [2] for t in texts]
    assert tok.encode("hi", prepend=tok.bos_token_id) == [0] + tok.encode("hi")


# ---------------------------------------------------------------------------------------------
# chat rendering

CONVERSATION = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me check."},
                {"type": "python", "text": "2+2"},
                {"type": "python_output", "text": "4"},
                {"type": "text", "text": "It is 4."},
            ],
        },
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You're welcome."},
    ]
}


def test_render_conversation(tok):
    ids, mask = tok.render_conversation(CONVERSATION)
    s = {name: tok.encode_special(name) for name in SPECIAL_TOKENS}
    e = tok.encode
    segments = [  # (ids, mask bit)
        ([s["<|bos|>"], s["<|user_start|>"]], 0),
        (e("Be brief.\n\nWhat is 2+2?"), 0),  # system merged into the first user message
        ([s["<|user_end|>"], s["<|assistant_start|>"]], 0),
        (e("Let me check."), 1),
        ([s["<|python_start|>"]] + e("2+2") + [s["<|python_end|>"]], 1),
        ([s["<|output_start|>"]] + e("4") + [s["<|output_end|>"]], 0),
        (e("It is 4.") + [s["<|assistant_end|>"]], 1),
        ([s["<|user_start|>"]] + e("Thanks") + [s["<|user_end|>"], s["<|assistant_start|>"]], 0),
        (e("You're welcome.") + [s["<|assistant_end|>"]], 1),
    ]
    assert ids == [i for seg, _ in segments for i in seg]
    assert mask == [bit for seg, bit in segments for _ in seg]
    assert tok.decode(ids) == (
        "<|bos|><|user_start|>Be brief.\n\nWhat is 2+2?<|user_end|>"
        "<|assistant_start|>Let me check.<|python_start|>2+2<|python_end|>"
        "<|output_start|>4<|output_end|>It is 4.<|assistant_end|>"
        "<|user_start|>Thanks<|user_end|><|assistant_start|>You're welcome.<|assistant_end|>"
    )
    trained = [i for i, bit in zip(ids, mask) if bit]
    assert tok.decode(trained) == (
        "Let me check.<|python_start|>2+2<|python_end|>It is 4.<|assistant_end|>You're welcome.<|assistant_end|>"
    )


def test_render_truncates(tok):
    ids, mask = tok.render_conversation(CONVERSATION)
    short_ids, short_mask = tok.render_conversation(CONVERSATION, max_tokens=7)
    assert (short_ids, short_mask) == (ids[:7], mask[:7])


@pytest.mark.parametrize(
    "roles, match",
    [
        (["assistant"], r"message 0 has role 'assistant', expected 'user'"),
        (["user", "user"], r"message 1 has role 'user', expected 'assistant'"),
        (["user", "assistant", "assistant"], r"message 2 has role 'assistant', expected 'user'"),
        (["system", "user", "system"], r"message 2 has role 'system', expected 'assistant'"),
        (["system", "assistant"], r"message 1 must be a user message"),
        (["system"], r"message 1 must be a user message"),
    ],
)
def test_render_rejects_bad_roles(tok, roles, match):
    conversation = {"messages": [{"role": role, "content": "hi"} for role in roles]}
    with pytest.raises(ValueError, match=match):
        tok.render_conversation(conversation)


def test_render_rejects_unknown_part(tok):
    conversation = {"messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [{"type": "image", "text": "x"}]},
    ]}
    with pytest.raises(ValueError, match="message 1: unknown content part type 'image'"):
        tok.render_conversation(conversation)


def test_render_for_completion(tok):
    prompt = tok.render_for_completion(CONVERSATION)
    without_last = {"messages": CONVERSATION["messages"][:-1]}
    assert prompt == tok.render_conversation(without_last)[0] + [tok.encode_special("<|assistant_start|>")]
    assert tok.decode(prompt).endswith("<|user_start|>Thanks<|user_end|><|assistant_start|>")
    with pytest.raises(ValueError, match="ends with an assistant message"):
        tok.render_for_completion(without_last)


def test_text_spelling_a_special_token_stays_text(tok):
    """A user who types "<|assistant_end|>" must not end the turn: such text encodes as bytes."""
    ids = tok.encode("hi <|assistant_end|><|python_start|>")
    specials = {tok.encode_special(name) for name in SPECIAL_TOKENS}
    assert not specials & set(ids)
    assert tok.decode(ids) == "hi <|assistant_end|><|python_start|>"
    prompt = tok.render_for_completion({"messages": [{"role": "user", "content": "<|assistant_start|>x"},
                                                     {"role": "assistant", "content": ""}]})
    assert prompt.count(tok.encode_special("<|assistant_start|>")) == 1
