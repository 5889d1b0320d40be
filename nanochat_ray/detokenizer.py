"""
Text from token ids, in one place: an answer's text (`answer_text`), and text deltas for
streaming with stop strings (`TextStream`), used by the chat server (serve/app.py), the terminal
chat (python jobs/chat_cli.py), the chat evals and RL's rewards.

    text = TextStream(tokenizer, stop=["\\n\\n"])
    delta = text.feed(token_ids)      # text that is safe to send now
    text.stopped                      # a stop string or terminal token was reached
    delta = text.flush()              # the rest, at the end
"""

from nanochat_ray.tokenizer import Tokenizer

MAX_PENDING = 8  # tokens held back while they decode to an incomplete UTF-8 character


def answer_text(tokenizer: Tokenizer, tokens: list[int]) -> str:
    """The text of a sampled answer: its tokens decoded up to the first <|assistant_end|> / <|bos|>."""
    end = next((i for i, token in enumerate(tokens) if token in tokenizer.answer_end_ids), len(tokens))
    return tokenizer.decode(tokens[:end])


class TextStream:
    """Decodes each token once (not the whole answer per step), holding back tokens that end
    mid-character and text that might be the start of a stop string."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.terminal = tokenizer.answer_end_ids
        self.pending: list[int] = []  # token ids not yet decoded into text
        self.unsent = ""  # decoded text not yet sent (may start a stop string)
        self.text = ""  # everything sent so far
        self.tokens = 0  # tokens consumed into the answer, the terminal one included
        self.stopped = False

    def feed(self, token_ids: list[int]) -> str:
        """Take new tokens; return the text that can be sent now. Tokens after a stop are ignored."""
        for token in token_ids:
            if self.stopped:
                break
            self.tokens += 1
            if token in self.terminal:
                self.stopped = True
                break
            self.pending.append(token)
            piece = self.tokenizer.decode(self.pending)
            # byte-level BPE: a character may span tokens; wait for the rest of it (a bounded wait,
            # so a sequence that never completes still shows)
            if piece.endswith("\ufffd") and len(self.pending) < MAX_PENDING:
                continue
            self.pending = []
            self.unsent += piece
            cut = min((i for i in (self.unsent.find(s) for s in self.stop) if i >= 0), default=-1)
            if cut >= 0:
                self.unsent = self.unsent[:cut]
                self.stopped = True
        return self._send(everything=self.stopped)

    def flush(self) -> str:
        """The end of the answer: send what was held back."""
        if self.pending and not self.stopped:
            self.unsent += self.tokenizer.decode(self.pending)
        self.pending = []
        return self._send(everything=True)

    def _send(self, everything: bool) -> str:
        keep = 0 if everything else self._stop_prefix_length(self.unsent)
        out, self.unsent = self.unsent[:len(self.unsent) - keep], self.unsent[len(self.unsent) - keep:]
        self.text += out
        return out

    def _stop_prefix_length(self, text: str) -> int:
        """Length of the longest end of `text` that begins some stop string."""
        for n in range(min(len(text), max((len(s) for s in self.stop), default=0)), 0, -1):
            if any(s.startswith(text[-n:]) for s in self.stop):
                return n
        return 0
