"""The k-hop pointer task: follow a pointer k times through a cycle over ten letters.

A prompt lists the ten pointers as "source target" pairs in random order (the pointers form one
10-cycle, so k hops from x never return to x for k < 10), then asks `QUERIES` questions
`| x k = answer`: the answer is the letter reached from x after k hops. Each hop needs the
previous one, so k hops need k sequential lookups (an induction-style match on the source letter).

    <bos> a j f b b i ... | a 3 = b | c 1 = ...      (a -> j -> f -> b)

Examples are split into train and held-out by a hash of the cycle, so held-out cycles never
appear in training. The model is trained on the token after each `=`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

LETTERS = "abcdefghij"
DIGITS = "123456789"
SPECIALS = ["<pad>", "<bos>"]
VOCAB = SPECIALS + list(LETTERS) + list(DIGITS) + ["|", "="]
TOKEN_ID = {tok: i for i, tok in enumerate(VOCAB)}
N = len(LETTERS)
QUERIES = 4
PREFIX = 1 + 2 * N  # <bos> and the pairs
SEQ_LEN = PREFIX + 5 * QUERIES  # each query: "|", start, hops, "=", answer
ANSWER_FROM = [PREFIX + 5 * q + 3 for q in range(QUERIES)]  # positions whose next token is an answer
MAX_HOPS = len(DIGITS)


def make_tokenizer():
    """A character-level `tokenizers` tokenizer that prepends <bos>."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel(vocab=TOKEN_ID, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex("."), behavior="isolated")]
    )
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", TOKEN_ID["<bos>"])])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # tokens joined by one space, as prompts are written
    tok.add_special_tokens(["<pad>", "<bos>"])
    return tok


@dataclass
class Batch:
    tokens: Tensor  # [n, SEQ_LEN]
    answers: Tensor  # [n, QUERIES] token ids (also present in `tokens`, after each "=")
    hops: Tensor  # [n, QUERIES]

    def text(self, i: int) -> str:
        return " ".join(VOCAB[t] for t in self.tokens[i].tolist()[1:])


def _cycle_split(order: Tensor) -> Tensor:
    """0 = train, 1 = held out, from a hash of the cycle (rotation-invariant)."""
    start = (order == 0).int().argmax(dim=1)
    idx = (torch.arange(N)[None] + start[:, None]) % N
    canon = order.gather(1, idx)
    weights = torch.tensor([pow(11, i, 1_000_003) for i in range(N)])
    h = (canon * weights).sum(1) % 1_000_003
    return (h % 10 == 0).long()


def sample(n: int, hops: list[int] | range, generator: torch.Generator, split: str = "train") -> Batch:
    """`n` prompts; each question's start letter and hop count are drawn uniformly (with
    replacement, so a later question can repeat an earlier start: copying an earlier answer is
    then a shortcut, which helps training find the lookup; evaluation scores the first question
    of each prompt only, where no shortcut exists)."""
    want = {"train": 0, "heldout": 1}[split]
    orders, have = [], 0
    while have < n:
        order = torch.argsort(torch.rand(4 * n + 64, N, generator=generator), dim=1)
        order = order[_cycle_split(order) == want]
        orders.append(order)
        have += len(order)
    order = torch.cat(orders)[:n]  # order[i] = the cycle as a sequence of letter indices
    pos = torch.argsort(order, dim=1)  # pos[i, letter] = where the letter sits in the cycle
    target = order.gather(1, (pos + 1) % N)  # target[i, letter] = the letter it points to
    listing = torch.argsort(torch.rand(n, N, generator=generator), dim=1)  # the order pairs are listed in
    letter0, digit0 = TOKEN_ID["a"], TOKEN_ID["1"]
    pairs = torch.stack([listing, target.gather(1, listing)], dim=-1).reshape(n, 2 * N) + letter0
    starts = torch.randint(0, N, (n, QUERIES), generator=generator)
    hop_choices = torch.tensor(list(hops))
    k = hop_choices[torch.randint(0, len(hop_choices), (n, QUERIES), generator=generator)]
    answers = order.gather(1, (pos.gather(1, starts) + k) % N)
    column = lambda v: torch.full((n, 1), TOKEN_ID[v])  # noqa: E731
    parts = [column("<bos>"), pairs]
    for q in range(QUERIES):
        parts += [column("|"), starts[:, q : q + 1] + letter0, k[:, q : q + 1] - 1 + digit0, column("="), answers[:, q : q + 1] + letter0]
    return Batch(tokens=torch.cat(parts, dim=1), answers=answers + letter0, hops=k)


def answers_after(tokens: Tensor, hops: int) -> Tensor:
    """The letter (token id) reached from each question's start after `hops` hops, read from the
    prompts themselves: [n, QUERIES]. With `hops` = the asked k this is the answer; with another
    count it tells which wrong answers are "stopped early" or "went too far"."""
    letter0 = TOKEN_ID["a"]
    src, tgt = tokens[:, 1:PREFIX:2] - letter0, tokens[:, 2:PREFIX:2] - letter0
    pointer = torch.zeros(len(tokens), N, dtype=torch.long).scatter_(1, src, tgt)
    x = tokens[:, [a - 2 for a in ANSWER_FROM]] - letter0
    for _ in range(hops):
        x = pointer.gather(1, x)
    return x + letter0


def follow(pairs: str, start: str, k: int) -> str:
    """Reference answer by hand: follow the "source target" pairs (e.g. "a j f b ...") k times."""
    letters = pairs.split()
    pointer = dict(zip(letters[0::2], letters[1::2]))
    x = start
    for _ in range(k):
        x = pointer[x]
    return x
