"""Streaming text from token ids: whole characters only, stop strings cut exactly, nothing lost."""

import pytest

from nanochat_ray.detokenizer import TextStream
from nanochat_ray.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(smoke_tokenizer_dir) -> Tokenizer:
    return Tokenizer.from_directory(smoke_tokenizer_dir)


def _stream(tokenizer: Tokenizer, text: str, stop: list[str] | None = None) -> tuple[list[str], TextStream]:
    """Feed `text`'s tokens one at a time; return the pieces sent and the stream."""
    stream = TextStream(tokenizer, stop)
    pieces = [stream.feed([t]) for t in tokenizer.encode(text)]
    pieces.append(stream.flush())
    return [p for p in pieces if p], stream


def test_pieces_add_up_to_the_text_and_never_split_a_character(tokenizer):
    text = "naïve café — 日本語 😀 done"
    pieces, stream = _stream(tokenizer, text)
    assert "".join(pieces) == stream.text == text and len(pieces) > 5
    assert not any("\ufffd" in p for p in pieces)


@pytest.mark.parametrize("stop, expected", [
    (["brown"], "the quick "),                 # stop spans several tokens
    (["zebra", " fox"], "the quick brown"),    # the first stop string that occurs wins
    (["nowhere"], "the quick brown fox jumps"),
])
def test_stop_strings_cut_before_the_match_and_are_never_sent(tokenizer, stop, expected):
    pieces, stream = _stream(tokenizer, "the quick brown fox jumps", stop)
    assert "".join(pieces) == expected
    assert stream.stopped == (expected != "the quick brown fox jumps")


def test_terminal_token_ends_the_answer_and_counts_as_generated(tokenizer):
    stream = TextStream(tokenizer)
    ids = tokenizer.encode("hello") + [tokenizer.encode_special("<|assistant_end|>")] + tokenizer.encode(" more")
    text = stream.feed(ids) + stream.flush()
    assert text == "hello" and stream.stopped and stream.tokens == len(tokenizer.encode("hello")) + 1
