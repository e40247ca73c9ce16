"""data.loader.TokenLoader: window sampling guarantees, resume, evaluation order, and bad data."""

import json

import numpy as np
import pytest
import torch

from data.format import FORMAT_VERSION, DataFormatError, check_vocab, read_meta, shard_name, write_meta
from data.loader import TokenLoader
from data.prepare import prepare
from data.tokenizers import get_tokenizer


def make_data_dir(path, shard_lengths, val_lengths=(500,), vocab_size=50257, dtype="uint16"):
    """A prepared folder whose token at stream position p is p % 60000: windows identify themselves."""
    path.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, lengths in (("train", shard_lengths), ("val", val_lengths)):
        shards, offset = [], 0
        for i, n in enumerate(lengths):
            (np.arange(offset, offset + n) % 60000).astype(dtype).tofile(path / shard_name(split, i))
            shards.append({"file": shard_name(split, i), "tokens": n})
            offset += n
        splits[split] = {"tokens": offset, "documents": 1, "shards": shards}
    write_meta(path, {
        "version": FORMAT_VERSION, "tokenizer": "gpt2", "tokenizer_sha256": "0" * 64, "vocab_size": vocab_size,
        "eot_token": 50256, "dtype": dtype, "source": "synthetic", "splits": splits,
    })  # fmt: skip
    return path


def window_index(row: torch.Tensor, seq_len: int) -> int:
    """Which window a row of x came from (the stream value of its first token tells its start)."""
    start = int(row[0])
    assert start % (seq_len + 1) == 0, "windows must start on multiples of seq_len + 1"
    return start // (seq_len + 1)


@pytest.fixture
def data_dir(tmp_path):
    return make_data_dir(tmp_path / "d", shard_lengths=[1000, 37, 2500, 777])  # 4314 tokens, uneven shards


def test_batches_are_shifted_windows_of_the_stream(data_dir):
    seq_len = 31
    loader = TokenLoader(data_dir, "train", batch_size=5, seq_len=seq_len, seed=3)
    stream = np.arange(4314)
    assert loader.n_windows == 4314 // 32 and loader.tokens_per_epoch == loader.n_windows * seq_len
    for _ in range(40):  # several passes over every shard edge
        x, y = loader.next_batch()
        assert x.shape == y.shape == (5, seq_len) and x.dtype == y.dtype == torch.int64
        for row_x, row_y in zip(x, y):
            start = window_index(row_x, seq_len) * 32
            np.testing.assert_array_equal(row_x.numpy(), stream[start : start + seq_len])
            np.testing.assert_array_equal(row_y.numpy(), stream[start + 1 : start + seq_len + 1])


@pytest.mark.parametrize("world_size", [1, 3, 4])
def test_ranks_are_disjoint_and_cover_each_epoch(data_dir, world_size):
    seq_len, batch = 15, 7
    loaders = [TokenLoader(data_dir, "train", batch, seq_len, rank=r, world_size=world_size, seed=11) for r in range(world_size)]
    n_windows = 4314 // 16
    per_epoch = n_windows - n_windows % world_size
    assert all(ld.windows_per_epoch == per_epoch for ld in loaders)
    steps = 2 * per_epoch // (world_size * batch)  # almost two epochs, crossing the epoch boundary mid-batch
    seen = [[window_index(row, seq_len) for _ in range(steps) for row in ld.next_batch()[0]] for ld in loaders]
    epoch0 = [s[: per_epoch // world_size] for s in seen]
    epoch1 = [s[per_epoch // world_size :] for s in seen]
    for epoch in (epoch0, epoch1):
        flat = [w for rank_windows in epoch for w in rank_windows]
        assert len(flat) == len(set(flat)), "two ranks (or one rank twice) read the same window in one epoch"
    covered = set().union(*map(set, epoch0))
    assert len(covered) == per_epoch and covered <= set(range(n_windows))
    # window i of the epoch's order goes to rank i % world_size
    order = loaders[0].epoch_order(0)
    for rank in range(world_size):
        assert epoch0[rank] == order[rank::world_size].tolist()
    assert {ld.epoch for ld in loaders} == {1} and len({json.dumps(ld.state_dict()) for ld in loaders}) == 1


def test_order_depends_on_seed_and_epoch_only(data_dir):
    a = TokenLoader(data_dir, "train", 4, 15, seed=0)
    b = TokenLoader(data_dir, "train", 9, 15, seed=0)
    c = TokenLoader(data_dir, "train", 4, 15, seed=1)
    assert np.array_equal(a.epoch_order(0), b.epoch_order(0))
    assert not np.array_equal(a.epoch_order(0), c.epoch_order(0))
    assert not np.array_equal(a.epoch_order(0), a.epoch_order(1))
    assert sorted(a.epoch_order(0).tolist()) == list(range(a.n_windows))  # a permutation, nothing repeated
    assert not np.array_equal(a.epoch_order(0), np.arange(a.n_windows))  # and actually shuffled


@pytest.mark.parametrize("world_size", [1, 2])
def test_resume_gives_bit_identical_batches(data_dir, world_size):
    def fresh(rank):
        return TokenLoader(data_dir, "train", batch_size=6, seq_len=20, rank=rank, world_size=world_size, seed=5)

    for rank in range(world_size):
        original = fresh(rank)
        for _ in range(30):  # past the end of epoch 0 (about 102 windows per rank at world_size 2)
            original.next_batch()
        state = json.loads(json.dumps(original.state_dict()))  # survives a JSON checkpoint
        assert len(json.dumps(state)) < 400
        expected = [original.next_batch() for _ in range(25)]
        resumed = fresh(rank)
        resumed.load_state_dict(state)
        for want, got in zip(expected, (resumed.next_batch() for _ in range(25))):
            assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
        assert resumed.state_dict() == original.state_dict()
        assert original.epoch >= 1


def test_resume_rejects_another_layout(data_dir):
    state = TokenLoader(data_dir, "train", 4, 20, world_size=2).state_dict()
    with pytest.raises(ValueError, match="loader state has world_size=2 but this loader has 1"):
        TokenLoader(data_dir, "train", 4, 20).load_state_dict(state)
    with pytest.raises(ValueError, match="loader state has seq_len=20 but this loader has 21"):
        TokenLoader(data_dir, "train", 4, 21, world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match=r"loader state lacks \['epoch'"):
        TokenLoader(data_dir, "train", 4, 20, world_size=2).load_state_dict({k: v for k, v in state.items() if k != "epoch"})
    bigger = TokenLoader(data_dir, "train", 8, 20, world_size=2)  # batch_size may change across a resume
    bigger.load_state_dict(state)


def test_val_is_repeatable_and_unshuffled(tmp_path):
    d = make_data_dir(tmp_path / "d", [1000], val_lengths=[300, 410])  # 710 val tokens
    val = TokenLoader(d, "val", batch_size=4, seq_len=9, world_size=2, rank=1)
    assert not val.shuffle and val.windows_per_epoch == 70
    first = [x for x, _ in val.iter_eval_batches()]
    again = [x for x, _ in val.iter_eval_batches()]
    assert all(torch.equal(a, b) for a, b in zip(first, again)) and len(first) == val.eval_batches_available == 9
    windows = [window_index(row, 9) for x in first for row in x]
    assert windows == list(range(1, 70, 2))  # rank 1 of 2: every other window, in stored order
    assert len(first[-1]) == 35 - 8 * 4  # the last batch is short rather than dropped
    sequential = [window_index(row, 9) for _ in range(3) for row in val.next_batch()[0]]
    assert sequential == windows[:12]
    with pytest.warns(UserWarning, match="asked for 50 eval batches but split 'val' .* holds 9"):
        assert len(list(val.iter_eval_batches(50))) == 9
    assert len(list(val.iter_eval_batches(2))) == 2


def test_real_embedded_data(tmp_path):
    out = prepare("embedded", "gpt2", tmp_path / "e", max_tokens=60_000, progress=False)
    tok = get_tokenizer("gpt2")
    corpus = "".join(doc for doc in (tok.decode(d) for d in [np.fromfile(out / "train_000000.bin", np.uint16).tolist()]))
    x, y = TokenLoader(out, "train", batch_size=8, seq_len=64, seed=0).next_batch()
    assert int(x.max()) < tok.vocab_size
    for row_x, row_y in zip(x, y):
        assert tok.decode(row_x.tolist()) in corpus and torch.equal(row_x[1:], row_y[:-1])


# --- bad data and bad arguments -------------------------------------------------------------------------------


def test_missing_directory_and_meta(tmp_path):
    with pytest.raises(DataFormatError, match=r"data directory .*nowhere does not exist; prepare it first, e.g. `python -m data.prepare"):
        TokenLoader(tmp_path / "nowhere", "train", 2, 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataFormatError, match=r"empty/meta.json is missing: .* is not a prepared data directory"):
        TokenLoader(tmp_path / "empty", "train", 2, 8)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: "{not json", "meta.json is not valid JSON"),
        (lambda m: "[1, 2]", "meta.json must hold a JSON object, found list"),
        (lambda m: json.dumps({k: v for k, v in m.items() if k != "dtype"}), "meta.json lacks the field 'dtype'"),
        (lambda m: json.dumps({**m, "vocab_size": "big"}), r"field 'vocab_size' should be int, found 'big'"),
        (lambda m: json.dumps({**m, "version": 99}), "format version 99, this code reads 1"),
        (lambda m: json.dumps({**m, "dtype": "int8"}), r"dtype 'int8' is not one of \['uint16', 'uint32'\]"),
        (lambda m: json.dumps({**m, "vocab_size": 151936}), "dtype uint16 does not fit vocab_size 151936"),
        (lambda m: json.dumps({**m, "splits": {"train": {"tokens": 5, "shards": []}}}), "disagrees with the sum over its shards"),
    ],
)  # fmt: skip
def test_garbled_meta(data_dir, edit, message):
    meta = read_meta(data_dir)
    (data_dir / "meta.json").write_text(edit(meta))
    with pytest.raises(DataFormatError, match=message):
        TokenLoader(data_dir, "train", 2, 8)


def test_shard_size_problems(data_dir):
    shard = data_dir / "train_000002.bin"
    with open(shard, "ab") as f:
        f.write(b"\x01")  # half a uint16
    with pytest.raises(DataFormatError, match=r"train_000002.bin is 5001 bytes, not a multiple of uint16's 2"):
        TokenLoader(data_dir, "train", 2, 8)
    with open(shard, "r+b") as f:
        f.truncate(4000)  # whole tokens, but fewer than meta.json promises
    with pytest.raises(DataFormatError, match=r"train_000002.bin holds 2000 tokens but meta.json says 2500: truncated"):
        TokenLoader(data_dir, "train", 2, 8)
    shard.unlink()
    with pytest.raises(DataFormatError, match=r"shard .*train_000002.bin listed in meta.json is missing"):
        TokenLoader(data_dir, "train", 2, 8)


def test_bad_arguments(data_dir):
    with pytest.raises(ValueError, match=r"seq_len=500 is too long for split 'val' .* holds 500 tokens, fewer than one window of seq_len\+1=501"):
        TokenLoader(data_dir, "val", 2, 500)
    with pytest.raises(ValueError, match=r"seq_len=4000 is too long .* per rank \(world_size=2\)"):
        TokenLoader(data_dir, "train", 2, 4000, world_size=2)  # one window, two ranks
    with pytest.raises(DataFormatError, match=r"has no split 'test'; it has \['train', 'val'\]"):
        TokenLoader(data_dir, "test", 2, 8)
    with pytest.raises(ValueError, match=r"rank must be in \[0, world_size=2\), got 2"):
        TokenLoader(data_dir, "train", 2, 8, rank=2, world_size=2)
    with pytest.raises(ValueError, match="seed must be a non-negative integer, got -3"):
        TokenLoader(data_dir, "train", 2, 8, seed=-3)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        TokenLoader(data_dir, "train", 0, 8)
    with pytest.raises(ValueError, match="seq_len must be an integer >= 1, got -1"):
        TokenLoader(data_dir, "train", 2, -1)


def test_check_vocab():
    meta = {"tokenizer": "qwen", "vocab_size": 151669}
    check_vocab(meta, 151936)
    check_vocab(meta, 151669)
    with pytest.raises(ValueError, match=r"tokenized with 'qwen' \(vocab_size 151669\) but the model's vocab_size is 50304"):
        check_vocab(meta, 50304)
