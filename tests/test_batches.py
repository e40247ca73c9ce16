"""training/batches.py: batches read one step ahead are the loader's batches, and a checkpointed position
is that of the batches handed out, so resuming from it reads the same batches as going on."""

import pytest
import torch

from data.loader import TokenLoader
from test_data_loss_mask import SEQ_LEN, SHARDS, make_dir
from training.batches import Prefetcher

CPU = torch.device("cpu")


@pytest.fixture
def data(tmp_path):
    return make_dir(tmp_path / "d", SHARDS)


def loader(data):
    return TokenLoader(data, "train", batch_size=4, seq_len=SEQ_LEN, seed=3)


def test_the_same_batches_as_the_loader_with_one_read_ahead(data):
    plain, ahead = loader(data), Prefetcher(loader(data), CPU)
    try:
        for _ in range(20):  # past an epoch (60 windows)
            (px, py), (ax, ay) = plain.next_batch(), ahead.next_batch()
            assert torch.equal(px, ax) and torch.equal(py, ay)
            ahead._ahead.result()  # the next batch has been read already...
            assert ahead.loader.state_dict() != plain.state_dict()
            assert ahead.state_dict() == plain.state_dict()  # ...but the position reported is the handed-out one
    finally:
        ahead.close()


def test_resuming_from_its_state_reads_what_going_on_reads(data):
    going_on = Prefetcher(loader(data), CPU)
    resumed = Prefetcher(loader(data), CPU)
    try:
        for _ in range(7):
            going_on.next_batch()
        resumed.next_batch()  # a read ahead in flight must not survive the load
        resumed.load_state_dict(going_on.state_dict())
        for _ in range(10):
            (gx, gy), (rx, ry) = going_on.next_batch(), resumed.next_batch()
            assert torch.equal(gx, rx) and torch.equal(gy, ry)
    finally:
        going_on.close()
        resumed.close()


@pytest.mark.gpu
def test_on_cuda_batches_come_from_pinned_memory(data):
    ahead = Prefetcher(loader(data), torch.device("cuda"))
    try:
        x, y = ahead.next_batch()
        assert x.is_cuda and y.is_cuda
        assert all(t.is_pinned() for t in ahead._ahead.result())
    finally:
        ahead.close()
