"""Tokenize once (cached on disk), then serve dynamically padded batches per task.

The cache key hashes the rows' text, the tokenizer's full definition, the maximum length
and the pair encoding, so a changed file, tokenizer or length is never served stale.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import weakref
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import Tensor

from mtbert.data import Split
from mtbert.rundir import atomic

log = logging.getLogger(__name__)

@dataclass
class Encoded:
    """Token ids of a split, ragged: sequence i is ids[offsets[i]:offsets[i+1]].

    Siamese pairs hold 2N sequences (all first sentences, then all second ones).
    """

    ids: Tensor
    types: Tensor | None
    offsets: Tensor
    labels: Tensor | None
    pairs: bool  # True when each example is two sequences (siamese)

    def __len__(self) -> int:
        n = len(self.offsets) - 1
        return n // 2 if self.pairs else n

    def lengths(self) -> Tensor:
        lengths = self.offsets.diff()
        if self.pairs:
            half = len(self)
            lengths = torch.maximum(lengths[:half], lengths[half:])
        return lengths


def encode(split: Split, tokenizer, max_length: int, siamese: bool = False,
           cache_dir: str | os.PathLike | None = None) -> Encoded:
    """Tokenize a split with the fast tokenizer, reading and writing the disk cache.

    Pairs are encoded as one `s1 [SEP] s2` sequence, or with `siamese` each sentence alone.
    """
    siamese = siamese and split.task.is_pair
    key = _cache_key(split, tokenizer, max_length, siamese)
    path = Path(cache_dir) / f"{split.path.stem}-{key}.pt" if cache_dir else None
    if path is not None and path.is_file():
        try:
            stored = torch.load(path, weights_only=True)
            return Encoded(**stored, pairs=siamese)
        except Exception as e:  # a broken cache file is rebuilt, never trusted
            log.warning("ignoring unreadable token cache %s (%s)", path, e)

    texts = split.texts
    if siamese:
        out = tokenizer(texts[0] + texts[1], truncation=True, max_length=max_length)
    else:
        out = tokenizer(*texts, truncation=True, max_length=max_length,
                        return_token_type_ids=split.task.is_pair)
    lengths = torch.tensor([len(x) for x in out["input_ids"]])
    stored = {
        "ids": torch.tensor([t for x in out["input_ids"] for t in x], dtype=torch.int32),
        "types": (torch.tensor([t for x in out["token_type_ids"] for t in x], dtype=torch.int8)
                  if split.task.is_pair and not siamese else None),
        "offsets": torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]),
        "labels": torch.tensor(split.labels, dtype=torch.float32) if split.labels else None,
    }
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic(path) as tmp:
                torch.save(stored, tmp)
        except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
            log.warning("cannot write the token cache %s (%s): kept in memory only; set "
                        "data.cache_dir (or MTBERT_CACHE_DIR) to a writable folder", path, e)
    return Encoded(**stored, pairs=siamese)


def tokenizer_digest(tokenizer) -> str:
    """SHA-256 of the tokenizer's definition (vocabulary, normalizer, ...): what a run
    records to resume with the same tokens, and part of the cache key. Computed once per
    tokenizer (a tenth of a second for a 30k vocabulary, and every split's cache key needs
    it); mtbert never changes a tokenizer after loading it."""
    if tokenizer not in _DIGESTS:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise TypeError("mtbert needs a fast (tokenizers-backed) tokenizer")
        definition = json.loads(backend.to_str())
        definition.pop("truncation", None)  # per-call settings, changed by every call
        definition.pop("padding", None)
        _DIGESTS[tokenizer] = hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()
    return _DIGESTS[tokenizer]


_DIGESTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _cache_key(split: Split, tokenizer, max_length: int, siamese: bool) -> str:
    h = hashlib.sha256()
    h.update(tokenizer_digest(tokenizer).encode())
    h.update(json.dumps([max_length, siamese, split.task.is_pair, split.labels is not None]).encode())
    for column in split.texts:
        h.update("\x1f".join(column).encode())
        h.update(b"\x1e")
    if split.labels is not None:
        h.update(json.dumps(split.labels).encode())
    return h.hexdigest()[:20]


@dataclass
class Batch:
    """A padded batch. For siamese pairs `input_ids` has 2B rows: first sentences, then second."""

    input_ids: Tensor
    attention_mask: Tensor
    token_type_ids: Tensor | None
    labels: Tensor | None
    index: Tensor  # positions of the examples in their split
    global_size: int = 0  # examples in the whole batch, over all ranks (0: this batch's own)

    def __post_init__(self):
        self.global_size = self.global_size or len(self.index)

    def to(self, device) -> Batch:
        """This batch on `device`. To a GPU it goes from pinned memory without blocking
        the host, which meanwhile prepares the next step."""
        device = torch.device(device)
        pinned = device.type == "cuda"
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, Tensor):
                moved[name] = (value.pin_memory().to(device, non_blocking=True) if pinned
                               else value.to(device))
        return Batch(**moved)

    def split(self, parts: int) -> list[Batch]:
        """This batch's examples in up to `parts` micro-batches (gradient accumulation), each
        still counted against the whole global batch. They keep the batch's padding: trimming
        it would read the lengths back from the device."""
        n = len(self.index)
        micro = []
        for rows in torch.arange(n, device=self.index.device).tensor_split(min(parts, n)):
            sequences = torch.cat([rows, rows + n]) if self.input_ids.shape[0] == 2 * n else rows  # siamese pairs
            micro.append(Batch(self.input_ids[sequences], self.attention_mask[sequences],
                               None if self.token_type_ids is None else self.token_type_ids[sequences],
                               None if self.labels is None else self.labels[rows], self.index[rows],
                               self.global_size))
        return micro

    @property
    def num_sequences(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_tokens(self) -> Tensor:
        return self.attention_mask.sum()


def collate(enc: Encoded, index: Tensor, pad_id: int = 0) -> Batch:
    """Pad the chosen examples to the longest sequence among them."""
    rows = torch.cat([index, index + len(enc)]) if enc.pairs else index
    starts, ends = enc.offsets[rows], enc.offsets[rows + 1]
    lengths = ends - starts
    width = int(lengths.max())
    positions = torch.arange(width)
    mask = positions < lengths[:, None]
    gather = (starts[:, None] + positions).clamp(max=len(enc.ids) - 1)
    input_ids = torch.where(mask, enc.ids[gather].long(), pad_id)
    types = torch.where(mask, enc.types[gather].long(), 0) if enc.types is not None else None
    labels = enc.labels[index] if enc.labels is not None else None
    return Batch(input_ids, mask.long(), types, labels, index)


class TaskStream:
    """An endless, reshuffled stream of one task's training batches.

    One pass over the data is `len(self)` batches. With `bucket_batches > 1`, each shuffled
    pool of that many batches is sorted by length before it is cut into batches, and the
    batches are shuffled again: far less padding, order still random. Split across
    `world` ranks, a last batch too small to give every rank an example joins the one
    before it.
    """

    def __init__(self, enc: Encoded, batch_size: int, generator: torch.Generator,
                 bucket_batches: int = 1, pad_id: int = 0, rank: int = 0, world: int = 1):
        if batch_size < world:
            raise ValueError(f"the global batch ({batch_size}) must hold at least one example "
                             f"per rank ({world} ranks)")
        self.enc, self.batch_size, self.generator = enc, batch_size, generator
        self.bucket_batches, self.pad_id = bucket_batches, pad_id
        self.rank, self.world = rank, world
        self._batches: list[Tensor] = []
        self._position = 0
        self.passes = 0

    def __len__(self) -> int:
        full, rest = divmod(len(self.enc), self.batch_size)
        return full + (rest >= self.world or full == 0)

    def restart(self):
        """Start a fresh shuffled pass (the sampler does this at each epoch)."""
        order = torch.randperm(len(self.enc), generator=self.generator)
        if self.bucket_batches > 1:
            lengths = self.enc.lengths()
            pool = self.batch_size * self.bucket_batches
            order = torch.cat([chunk[lengths[chunk].argsort(stable=True)]
                               for chunk in order.split(pool)])
        batches = list(order.split(self.batch_size))
        if len(batches) > 1 and len(batches[-1]) < self.world:
            batches[-2:] = [torch.cat(batches[-2:])]
        if self.bucket_batches > 1:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=self.generator)]
        self._batches, self._position = batches, 0
        self.passes += 1

    def state_dict(self) -> dict:
        """The pass in progress and the generator: enough to continue exactly."""
        return {"generator": self.generator.get_state(), "position": self._position,
                "passes": self.passes,
                "order": torch.cat(self._batches) if self._batches else torch.zeros(0, dtype=torch.long),
                "sizes": torch.tensor([len(b) for b in self._batches], dtype=torch.long)}

    def load_state_dict(self, state: dict):
        self.generator.set_state(state["generator"])
        self._position, self.passes = state["position"], state["passes"]
        self._batches = list(state["order"].split(state["sizes"].tolist()))

    def next(self) -> Batch:
        if self._position >= len(self._batches):
            self.restart()
        index = self._batches[self._position]
        self._position += 1
        if self.world == 1:
            return collate(self.enc, index, self.pad_id)
        local = index.tensor_split(self.world)[self.rank]  # this rank's part
        batch = collate(self.enc, local, self.pad_id)
        batch.global_size = len(index)
        return batch


def eval_batches(enc: Encoded, max_tokens: int = 16384, pad_id: int = 0):
    """Batches in length order, each up to about `max_tokens` padded tokens: fast inference."""
    order = enc.lengths().argsort()
    lengths = enc.lengths()[order].tolist()
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and (end - start + 1) * lengths[end] <= max_tokens:
            end += 1
        yield collate(enc, order[start:end], pad_id)
        start = end
