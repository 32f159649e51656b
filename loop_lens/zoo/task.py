"""The k-hop pointer task: follow a pointer k times through a cycle over ten letters.

A prompt lists, for each letter a..j in order, the letter it points to (the pointers form one
10-cycle, so k hops from x never return to x for k < 10), then asks `|x k=`: the answer is the
letter reached from x after k hops. Each hop needs the previous one, so k hops need k
sequential lookups.

    <bos> j h d e i b a c g f | a 3 =   ->   b      (a -> j -> f -> b)

Examples are split into train and held-out by a hash of the cycle, so held-out cycles never
appear in training.
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
SEQ_LEN = 1 + N + 4  # <bos>, targets, "|", start, hops, "="
MAX_HOPS = len(DIGITS)


def make_tokenizer():
    """A character-level `tokenizers` tokenizer that prepends <bos>."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel(vocab=TOKEN_ID, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\S"), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", TOKEN_ID["<bos>"])])
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(["<pad>", "<bos>"])
    return tok


@dataclass
class Batch:
    tokens: Tensor  # [n, SEQ_LEN]
    answers: Tensor  # [n] token ids
    hops: Tensor  # [n]

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
    """`n` examples with hop counts drawn uniformly from `hops`, from the given split."""
    want = {"train": 0, "heldout": 1}[split]
    orders = []
    have = 0
    while have < n:
        order = torch.argsort(torch.rand(4 * n + 64, N, generator=generator), dim=1)
        order = order[_cycle_split(order) == want]
        orders.append(order)
        have += len(order)
    order = torch.cat(orders)[:n]  # order[i] = the cycle as a sequence of letter indices
    pos = torch.argsort(order, dim=1)  # pos[i, letter] = where the letter sits in the cycle
    target = order.gather(1, (pos + 1) % N)  # target[i, letter] = the letter it points to
    start = torch.randint(0, N, (n,), generator=generator)
    hop_choices = torch.tensor(list(hops))
    k = hop_choices[torch.randint(0, len(hop_choices), (n,), generator=generator)]
    answer = order.gather(1, ((pos.gather(1, start[:, None])[:, 0] + k) % N)[:, None])[:, 0]
    letter0, digit0 = TOKEN_ID["a"], TOKEN_ID["1"]
    tokens = torch.cat(
        [
            torch.full((n, 1), TOKEN_ID["<bos>"]),
            target + letter0,
            torch.full((n, 1), TOKEN_ID["|"]),
            (start + letter0)[:, None],
            (k - 1 + digit0)[:, None],
            torch.full((n, 1), TOKEN_ID["="]),
        ],
        dim=1,
    )
    return Batch(tokens=tokens, answers=answer + letter0, hops=k)


def follow(text_targets: str, start: str, k: int) -> str:
    """Reference answer by hand: follow the pointers in `text_targets` (targets of a..j)."""
    x = start
    for _ in range(k):
        x = text_targets[LETTERS.index(x)]
    return x
