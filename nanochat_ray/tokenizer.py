"""Byte-level BPE tokenizer (GPT-4 style) and chat rendering, SPEC §2.

Training and encoding run in the Rust `tokenizers` library; this module fixes the recipe
(split regex, byte-level alphabet, the 9 special tokens) and adds what the pipeline needs on
top: the per-token byte-length table for bits-per-byte, and the conversation → (ids, mask)
rendering used by midtraining, SFT, RL and the chat engine.

Special tokens take the first 9 ids (0..8, in SPEC order), as `BpeTrainer` places them; the
256 byte tokens follow, then the merges, so the vocabulary is exactly the requested size.

Trained and saved by `python jobs/tokenizer.py`; loaded with `Tokenizer.from_directory(dir)`.
`tokenizer.json` also loads with plain `tokenizers.Tokenizer.from_file`, but only this class
guarantees that text spelling a special token ("<|bos|>") encodes as ordinary bytes.
"""

from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from nanochat_ray.common import write_atomic

# GPT-4's split pattern, except numbers split into groups of at most 2 digits (not 3):
# spends fewer merges on digit triples in a small vocabulary.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
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


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # split on the regex first, then map bytes to printable chars; the ByteLevel regex is off
    # because the split already happened
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(pattern=Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


class Tokenizer:
    def __init__(self, hf: HFTokenizer, token_bytes: torch.Tensor):
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
        hf = HFTokenizer(models.BPE(byte_fallback=False))  # no normalizer: bytes in == bytes out
        hf.pre_tokenizer = _pre_tokenizer()
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,  # counts the special tokens too
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
            special_tokens=SPECIAL_TOKENS,
        )

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

        hf.train_from_iterator(capped(), trainer)
        if hf.get_vocab_size() != vocab_size:
            raise ValueError(
                f"trained vocabulary has {hf.get_vocab_size()} tokens, asked for {vocab_size}: "
                "the text has too few distinct merges; train on more text or lower vocab_size"
            )
        return cls(hf, cls._byte_lengths(hf))

    @staticmethod
    def _byte_lengths(hf: HFTokenizer) -> torch.Tensor:
        # every char of a byte-level token stands for exactly one byte; special tokens count 0
        # because they stand for no text (bits-per-byte must not credit them)
        lengths = [0] * hf.get_vocab_size()
        for token, i in hf.get_vocab().items():
            lengths[i] = 0 if token in SPECIAL_TOKENS else len(token)
        return torch.tensor(lengths, dtype=torch.int32)

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json and token_bytes.pt into `directory`, each atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_atomic(directory / TOKENIZER_FILE, lambda p: self.hf.save(str(p)))
        write_atomic(directory / TOKEN_BYTES_FILE, lambda p: torch.save(self._token_bytes, p))

    @classmethod
    def from_directory(cls, directory: str | Path) -> "Tokenizer":
        directory = Path(directory)
        for name in (TOKENIZER_FILE, TOKEN_BYTES_FILE):
            if not (directory / name).exists():
                raise FileNotFoundError(
                    f"{directory / name} not found: train the tokenizer first with `python jobs/tokenizer.py`"
                )
        hf = HFTokenizer.from_file(str(directory / TOKENIZER_FILE))
        return cls(hf, torch.load(directory / TOKEN_BYTES_FILE, weights_only=True))

    # ---------------------------------------------------------------------------------------
    # vocabulary, encode, decode

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def token_bytes(self) -> torch.Tensor:
        """(vocab_size,) int32: UTF-8 bytes each token stands for, 0 for special tokens."""
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
