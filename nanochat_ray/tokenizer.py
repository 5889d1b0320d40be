"""Byte-level BPE tokenizer (GPT-4 style) and chat rendering, SPEC §2.

Training runs in `rustbpe` (the reference's trainer, a Rust library on PyPI); encoding runs in the
Rust `tokenizers` library, from the `tokenizer.json` this module writes. The module fixes the
recipe (split regex, byte-level alphabet, the 9 special tokens) and adds what the pipeline needs
on top: the per-token byte-length table for bits-per-byte, and the conversation → (ids, mask)
rendering used by midtraining, SFT, RL and the chat engine.

Ids: the 9 special tokens first (0..8, in SPEC order), then the 256 bytes in byte order, then
the merged tokens in the order they were learned, so the vocabulary is exactly the requested size.

Trained and saved by `python jobs/tokenizer.py`; loaded with `Tokenizer.from_directory(dir)`.
`tokenizer.json` also loads with plain `tokenizers.Tokenizer.from_file`, but only this class
guarantees that text spelling a special token ("<|bos|>") encodes as ordinary bytes.
"""

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import rustbpe
from tokenizers import Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

# torch is imported where the byte-length table is made, saved or loaded, not when this module
# loads: the data actors only encode, and a process that imports torch spends ~1 CPU second on it
if TYPE_CHECKING:
    import torch

# GPT-4's split pattern, except numbers split into groups of at most 2 digits (not 3):
# spends fewer merges on digit triples in a small vocabulary.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)
# The same splits, written so that the trainer's regex engine runs them ~35% faster: the two
# possessive quantifiers become greedy (neither can give back a char the rest of its branch could
# use), the five branches without lookahead form one group the engine matches in one step, and the
# last `\s+` becomes `\s` (it is only reached before a lone whitespace char). Both patterns must
# split every text alike; tests/test_tokenizer.py checks it.
TRAIN_SPLIT_PATTERN = (
    r"""(?:'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n])|\s+(?!\S)|\s"""
)

SPECIAL_TOKENS = [
    "<|bos|>",  # begins every document; documents are packed, so it also separates them
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",  # the assistant calls the python tool...
    "<|python_end|>",
    "<|output_start|>",  # ...and the tool's result comes back here
    "<|output_end|>",
]

TOKENIZER_FILE = "tokenizer.json"
TOKEN_BYTES_FILE = "token_bytes.pt"


def _byte_chars() -> list[str]:
    """The char that stands for each byte in ByteLevel's token strings (index = byte value).

    Printable Latin-1 bytes stand for themselves; the other 68 (controls, space, 0x7F-0xA0, 0xAD)
    take chr(256), chr(257), ... in byte order.
    """
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


_BYTES_TO_CHARS = dict(enumerate(_byte_chars()))  # str.translate table over latin-1-decoded bytes


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # split on the regex first, then map bytes to printable chars; the ByteLevel regex is off
    # because the split already happened
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(pattern=Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def _merge_rules(token_bytes: list[bytes], names: list[str]) -> list[tuple[str, str]]:
    """Merge rules for `tokenizers`' BPE: every (left, right) pair of tokens that joins into a longer
    token, ordered by the longer token's rank.

    The trainer gives each token's bytes and rank but not the pair it merged. Listing every split
    makes the encoder merge any adjacent pair that forms a token, lowest rank first: what tiktoken,
    the reference's encoder, does with the same ranks. (One guessed split per token instead would
    miss tokens: 4.39 bytes/token on the val shard against 4.68.) The splits are found with
    polynomial hashes of every prefix and suffix (64-bit, wrapping), then checked exactly.
    """
    lengths = np.fromiter(map(len, token_bytes), dtype=np.int64, count=len(token_bytes))
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    codes = np.frombuffer(b"".join(token_bytes), dtype=np.uint8).astype(np.uint64) + np.uint64(1)
    base = 0x9E3779B97F4A7C15  # odd, so invertible modulo 2**64

    def running(values: np.ndarray, first: int) -> np.ndarray:  # [first, then running sums or products]
        return np.concatenate([np.array([first], dtype=np.uint64), values])

    powers = running(np.cumprod(np.full(len(codes), base, dtype=np.uint64)), 1)
    inverse = running(np.cumprod(np.full(len(codes), pow(base, -1, 2**64), dtype=np.uint64)), 1)
    prefix = running(np.cumsum(codes * powers[:-1]), 0)

    def key(begin: np.ndarray, end: np.ndarray) -> np.ndarray:  # hash of codes[begin:end]
        return (prefix[end] - prefix[begin]) * inverse[begin]

    token_keys = key(starts, starts + lengths)
    order = np.argsort(token_keys)
    sorted_keys = token_keys[order]

    def lookup(keys: np.ndarray) -> np.ndarray:  # token id per key, -1 where none
        at = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
        return np.where(sorted_keys[at] == keys, order[at], -1)

    # one row per (token, split point), tokens in rank order; the right part is looked up only
    # where the left part is a token
    rows = np.maximum(lengths - 1, 0)
    token = np.repeat(np.arange(len(token_bytes)), rows)
    cut = starts[token] + 1 + np.arange(len(token)) - np.repeat(np.cumsum(rows) - rows, rows)
    left = lookup(key(starts[token], cut))
    token, cut, left = token[left >= 0], cut[left >= 0], left[left >= 0]
    right = lookup(key(cut, starts[token] + lengths[token]))
    token, left, right = token[right >= 0], left[right >= 0], right[right >= 0]
    objects = np.array(names, dtype=object)
    lefts, rights = objects[left], objects[right]
    if not np.all(lefts + rights == objects[token]):
        raise RuntimeError("hash collision while listing merge rules; change `base` in _merge_rules")
    return list(zip(lefts.tolist(), rights.tolist()))


class Tokenizer:
    def __init__(self, hf: HFTokenizer, token_bytes: "torch.Tensor | Path"):
        """`token_bytes`: the byte-length table, or the file it is loaded from on first use."""
        self.hf = hf
        # text that spells a special token must encode as ordinary bytes (not saved in tokenizer.json)
        self.hf.encode_special_tokens = True
        self._token_bytes = token_bytes
        self.bos_token_id = self.encode_special("<|bos|>")
        # what ends an answer: the assistant's end, or <|bos|> (a base model starting a new document)
        self.answer_end_ids = (self.encode_special("<|assistant_end|>"), self.bos_token_id)

    # ---------------------------------------------------------------------------------------
    # training, saving, loading

    @classmethod
    def train_from_iterator(
        cls, texts: Iterable[str], vocab_size: int, doc_cap: int = 10_000, max_chars: int | None = None
    ) -> "Tokenizer":
        """Train on `texts`, each cut to `doc_cap` chars, stopping after `max_chars` chars in all."""
        if vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (256 bytes and "
                             f"{len(SPECIAL_TOKENS)} special tokens), got {vocab_size}")

        def capped() -> Iterator[str]:
            total = 0
            for text in texts:
                if max_chars is not None and total >= max_chars:
                    return
                text = text[:doc_cap]
                if max_chars is not None:
                    text = text[: max_chars - total]
                total += len(text)
                yield text

        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(capped(), vocab_size - len(SPECIAL_TOKENS), pattern=TRAIN_SPLIT_PATTERN)
        # (bytes as a list of ints, rank) for ranks 0, 1, 2, ...: the 256 bytes, then the merges
        token_bytes = [bytes(b) for b, _ in trainer.get_mergeable_ranks()]
        names = [b.decode("latin-1").translate(_BYTES_TO_CHARS) for b in token_bytes]
        vocab = dict(zip(SPECIAL_TOKENS + names, range(len(SPECIAL_TOKENS) + len(names))))
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=_merge_rules(token_bytes, names), byte_fallback=False))
        hf.pre_tokenizer = _pre_tokenizer()  # no normalizer: bytes in == bytes out
        hf.decoder = decoders.ByteLevel()
        hf.add_special_tokens(SPECIAL_TOKENS)  # already in the vocabulary: marks them special
        if hf.get_vocab_size() != vocab_size:
            raise ValueError(
                f"trained vocabulary has {hf.get_vocab_size()} tokens, asked for {vocab_size}: "
                "the text has too few distinct merges; train on more text or lower vocab_size"
            )
        return cls(hf, cls._byte_lengths(vocab))

    @staticmethod
    def _byte_lengths(vocab: dict[str, int]) -> "torch.Tensor":
        """The token_bytes() table from a byte-level vocabulary (token string → id)."""
        import torch

        # every char of a byte-level token stands for exactly one byte; special tokens count 0
        # because they stand for no text (bits-per-byte must not credit them)
        lengths = [0] * len(vocab)
        for token, i in vocab.items():
            lengths[i] = 0 if token in SPECIAL_TOKENS else len(token)
        return torch.tensor(lengths, dtype=torch.int32)

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json and token_bytes.pt into `directory`, each atomically."""
        import torch

        from nanochat_ray.common import write_atomic  # (common imports torch)

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_atomic(directory / TOKENIZER_FILE, lambda p: self.hf.save(str(p)))
        write_atomic(directory / TOKEN_BYTES_FILE, lambda p: torch.save(self.token_bytes(), p))

    @classmethod
    def from_directory(cls, directory: str | Path) -> "Tokenizer":
        directory = Path(directory)
        for name in (TOKENIZER_FILE, TOKEN_BYTES_FILE):
            if not (directory / name).exists():
                raise FileNotFoundError(
                    f"{directory / name} not found: train the tokenizer first with `python jobs/tokenizer.py`"
                )
        hf = HFTokenizer.from_file(str(directory / TOKENIZER_FILE))
        return cls(hf, directory / TOKEN_BYTES_FILE)

    # ---------------------------------------------------------------------------------------
    # vocabulary, encode, decode

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def token_bytes(self) -> "torch.Tensor":
        """(vocab_size,) int32: UTF-8 bytes each token stands for, 0 for special tokens."""
        if isinstance(self._token_bytes, Path):
            import torch

            self._token_bytes = torch.load(self._token_bytes, weights_only=True)
        return self._token_bytes

    def encode_special(self, name: str) -> int:
        if name not in SPECIAL_TOKENS:
            raise KeyError(f"{name!r} is not a special token; they are {SPECIAL_TOKENS}")
        return self.hf.token_to_id(name)

    def id_to_token(self, token_id: int) -> str:
        return self.hf.id_to_token(token_id)

    def encode(
        self, text: str | list[str], prepend: int | str | None = None, append: int | str | None = None
    ) -> list[int] | list[list[int]]:
        """Encode one text (→ list of ids) or a batch (→ list of lists, encoded in parallel).

        `prepend` / `append` add one token to each text: an id or a special token's name.
        """
        head = [self._as_id(prepend)] if prepend is not None else []
        tail = [self._as_id(append)] if append is not None else []
        if isinstance(text, str):
            return head + self.hf.encode(text, add_special_tokens=False).ids + tail
        encodings = self.hf.encode_batch_fast(text, add_special_tokens=False)
        return [head + e.ids + tail for e in encodings]

    def _as_id(self, token: int | str) -> int:
        return self.encode_special(token) if isinstance(token, str) else token

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=False)

    # ---------------------------------------------------------------------------------------
    # chat rendering

    def render_conversation(self, conversation: dict, max_tokens: int = 2048) -> tuple[list[int], list[int]]:
        """Token ids and a same-length mask (1 = the assistant is trained on it), cut to max_tokens."""
        ids, mask = self._render(conversation)
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation: dict) -> list[int]:
        """Prompt ids: the conversation minus its last assistant message, then <|assistant_start|>."""
        messages = conversation["messages"]
        if not messages or messages[-1]["role"] != "assistant":
            raise ValueError("render_for_completion needs a conversation that ends with an assistant message")
        ids, _ = self._render({**conversation, "messages": messages[:-1]})
        return ids + [self.encode_special("<|assistant_start|>")]

    def _render(self, conversation: dict) -> tuple[list[int], list[int]]:
        messages = list(conversation["messages"])
        first = 0  # index into the caller's list, for error messages
        if messages and messages[0]["role"] == "system":
            if len(messages) < 2 or messages[1]["role"] != "user":
                raise ValueError("message 0 is a system message; message 1 must be a user message")
            merged = messages[0]["content"] + "\n\n" + messages[1]["content"]
            messages = [{**messages[1], "content": merged}] + messages[2:]
            first = 1

        ids: list[int] = []
        mask: list[int] = []

        def add(tokens: int | list[int], trained: int) -> None:
            tokens = [tokens] if isinstance(tokens, int) else tokens
            ids.extend(tokens)
            mask.extend([trained] * len(tokens))

        special = self.encode_special
        add(self.bos_token_id, 0)
        for i, message in enumerate(messages):
            expected = "user" if i % 2 == 0 else "assistant"
            if message["role"] != expected:
                raise ValueError(
                    f"message {i + first} has role {message['role']!r}, expected {expected!r}: "
                    "roles must alternate user/assistant, starting with user"
                )
            content = message["content"]
            if expected == "user":
                if not isinstance(content, str):
                    raise ValueError(f"message {i + first}: user content must be a string")
                add(special("<|user_start|>"), 0)
                add(self.encode(content), 0)
                add(special("<|user_end|>"), 0)
                continue
            add(special("<|assistant_start|>"), 0)
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            for part in parts:
                tokens = self.encode(part["text"])
                if part["type"] == "text":
                    add(tokens, 1)
                elif part["type"] == "python":  # the model writes the tool call: trained
                    add(special("<|python_start|>"), 1)
                    add(tokens, 1)
                    add(special("<|python_end|>"), 1)
                elif part["type"] == "python_output":  # the tool writes this at run time: not trained
                    add(special("<|output_start|>"), 0)
                    add(tokens, 0)
                    add(special("<|output_end|>"), 0)
                else:
                    raise ValueError(f"message {i + first}: unknown content part type {part['type']!r}")
            add(special("<|assistant_end|>"), 1)
        return ids, mask
