"""The optional per-token loss mask of a prepared directory (data/format.py) and how TokenLoader applies it:
y = -1 exactly where the target token's mask is 0, x untouched, state and resume unchanged, clear errors."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data.format import FORMAT_VERSION, DataFormatError, mask_name, open_masks, read_meta, shard_name, write_meta
from data.loader import TokenLoader

SEQ_LEN = 15  # windows of 16 tokens


def make_dir(path, shard_lengths, *, with_mask=True, mask_fn=None, val_lengths=(160,)):
    """Token at stream position p is p % 60000 (windows identify themselves). The mask at p is mask_fn(p)
    (default: a seeded random 0/1 pattern with every third position forced to 1, so every window of 16
    holds targets)."""
    if mask_fn is None:
        bits = np.random.default_rng(0).integers(0, 2, size=sum(shard_lengths) + sum(val_lengths))
        mask_fn = lambda p: np.where(p % 3 == 0, 1, bits[p])  # noqa: E731
    path.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, lengths in (("train", shard_lengths), ("val", val_lengths)):
        shards, offset = [], 0
        for i, n in enumerate(lengths):
            positions = np.arange(offset, offset + n)
            (positions % 60000).astype(np.uint16).tofile(path / shard_name(split, i))
            if with_mask:
                mask_fn(positions).astype(np.uint8).tofile(path / mask_name(shard_name(split, i)))
            shards.append({"file": shard_name(split, i), "tokens": n})
            offset += n
        splits[split] = {"tokens": offset, "documents": 1, "shards": shards}
        if with_mask:
            splits[split]["loss_mask"] = True
    write_meta(path, {
        "version": FORMAT_VERSION, "tokenizer": "gpt2", "tokenizer_sha256": "0" * 64, "vocab_size": 50257,
        "eot_token": 50256, "dtype": "uint16", "source": "synthetic", "splits": splits,
    })  # fmt: skip
    return path


def stream_mask(data_dir, split="train") -> np.ndarray:
    meta = read_meta(data_dir)
    return np.concatenate([np.fromfile(data_dir / mask_name(s["file"]), np.uint8) for s in meta["splits"][split]["shards"]])


SHARDS = [300, 0, 77, 450, 133]  # uneven, one empty: windows straddle shard edges


def test_y_is_minus_one_exactly_where_the_target_is_masked(tmp_path):
    masked = make_dir(tmp_path / "m", SHARDS)
    plain = make_dir(tmp_path / "p", SHARDS, with_mask=False)
    mask = stream_mask(masked)
    a = TokenLoader(masked, "train", batch_size=5, seq_len=SEQ_LEN, seed=2)
    b = TokenLoader(plain, "train", batch_size=5, seq_len=SEQ_LEN, seed=2)
    assert a.has_loss_mask and not b.has_loss_mask
    ignored = 0
    for _ in range(25):  # more than one epoch (60 windows)
        (xa, ya), (xb, yb) = a.next_batch(), b.next_batch()
        assert torch.equal(xa, xb), "the mask must not change the inputs or the order"
        for row_x, row_ya, row_yb in zip(xa, ya, yb):
            start = int(row_x[0])  # stream position of the window's first token
            target_mask = mask[start + 1 : start + 1 + SEQ_LEN]  # the mask of the tokens y holds
            expected = torch.where(torch.from_numpy(target_mask != 0), row_yb, torch.tensor(-1))
            assert torch.equal(row_ya, expected)
            ignored += int((row_ya == -1).sum())
    assert ignored > 0 and a.state_dict() == b.state_dict()
    # evaluation batches get the same treatment
    for (xa, ya), (xb, yb) in zip(a.iter_eval_batches(), b.iter_eval_batches()):
        assert torch.equal(xa, xb) and torch.equal(ya == -1, torch.from_numpy(np.stack(
            [mask[int(r[0]) + 1 : int(r[0]) + 1 + SEQ_LEN] == 0 for r in xa])))  # fmt: skip
        assert torch.equal(ya[ya != -1], yb[ya != -1])


def test_old_directories_without_masks_read_as_before(tmp_path):
    plain = make_dir(tmp_path / "p", SHARDS, with_mask=False)
    assert "loss_mask" not in read_meta(plain)["splits"]["train"] and open_masks(plain, "train") is None
    x, y = TokenLoader(plain, "train", 4, SEQ_LEN).next_batch()
    assert torch.equal(x[:, 1:], y[:, :-1]) and (y >= 0).all()
    # loss_mask: false explicitly means no mask, even if stray mask files lie beside the shards
    stray = make_dir(tmp_path / "s", SHARDS, mask_fn=lambda p: np.zeros_like(p))
    meta = read_meta(stray)
    meta["splits"]["train"]["loss_mask"] = False
    write_meta(stray, meta)
    x, y = TokenLoader(stray, "train", 4, SEQ_LEN).next_batch()
    assert (y >= 0).all()


def test_resume_is_bit_identical_and_the_state_has_no_new_fields(tmp_path):
    masked = make_dir(tmp_path / "m", SHARDS)
    original = TokenLoader(masked, "train", 6, SEQ_LEN, seed=9)
    for _ in range(13):  # past the first epoch
        original.next_batch()
    state = json.loads(json.dumps(original.state_dict()))
    assert set(state) == {"version", "split", "seed", "shuffle", "epoch", "position", "seq_len", "world_size", "n_windows"}
    expected = [original.next_batch() for _ in range(12)]
    resumed = TokenLoader(masked, "train", 6, SEQ_LEN, seed=9)
    resumed.load_state_dict(state)
    for (wx, wy), (gx, gy) in zip(expected, (resumed.next_batch() for _ in range(12))):
        assert torch.equal(wx, gx) and torch.equal(wy, gy)
    assert any((wy == -1).any() for _, wy in expected)


def test_declared_mask_missing_or_wrong_length_names_the_file(tmp_path):
    missing = make_dir(tmp_path / "a", SHARDS)
    (missing / "train_000003.mask.bin").unlink()
    with pytest.raises(DataFormatError, match=r"loss mask .*a/train_000003\.mask\.bin is missing: meta.json declares splits\.train\.loss_mask"):
        TokenLoader(missing, "train", 2, SEQ_LEN)
    TokenLoader(missing, "val", 2, SEQ_LEN)  # the other split is intact and still opens

    short = make_dir(tmp_path / "b", SHARDS)
    path = short / "train_000002.mask.bin"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(DataFormatError, match=r"loss mask .*b/train_000002\.mask\.bin holds 76 entries but its shard train_000002\.bin has 77 tokens"):
        TokenLoader(short, "train", 2, SEQ_LEN)

    bad_flag = make_dir(tmp_path / "c", SHARDS)
    meta = read_meta(bad_flag)
    meta["splits"]["val"]["loss_mask"] = "yes"
    write_meta(bad_flag, meta)
    with pytest.raises(DataFormatError, match=r"meta\.json: splits\.val\.loss_mask should be true or false, found 'yes'"):
        TokenLoader(bad_flag, "train", 2, SEQ_LEN)


def test_a_window_without_any_target_is_refused_because_its_loss_would_be_nan(tmp_path):
    # targets only at stream positions 40..47 and from 200 on: of the windows of 16 (targets at 16j+1..16j+15)
    # 0, 1 and 3..11 have none, window 2 (33..47) and 12.. have some
    data = make_dir(tmp_path / "d", SHARDS, mask_fn=lambda p: ((p >= 200) | ((p >= 40) & (p < 48))).astype(np.uint8))
    with pytest.raises(DataFormatError, match=r"split 'train' of .* has windows with no loss target at seq_len=15 \(first: window 0, 11 in windows 0\.\.59\)"):
        TokenLoader(data, "train", 2, SEQ_LEN)
    # windows of 240 all reach a target: the check follows the window layout
    loader = TokenLoader(data, "train", 2, 239)
    assert loader.n_windows == 4 and (loader.next_batch()[1] != -1).any()
    # what the check prevents: cross_entropy with every target ignored is NaN, not 0
    logits = torch.randn(4, 10)
    assert torch.isnan(F.cross_entropy(logits, torch.full((4,), -1), ignore_index=-1))


def test_the_models_loss_on_masked_batches_is_the_answer_only_mean(tmp_path):
    from models import GPT2Config, build_model

    data = make_dir(tmp_path / "m", SHARDS)
    model = build_model(GPT2Config(n_layer=1, n_head=2, d_model=32, max_seq_len=SEQ_LEN, vocab_size=60000), None)
    for x, y in TokenLoader(data, "val", 4, SEQ_LEN).iter_eval_batches():
        logits, loss = model(x, y)
        keep = y != -1
        by_hand = F.cross_entropy(logits[keep], y[keep])
        assert torch.isfinite(loss) and torch.allclose(loss, by_hand, rtol=1e-6, atol=1e-6)


def test_the_target_check_reads_in_blocks_and_still_finds_the_empty_window(tmp_path):
    # one empty window (window 41: positions 657..671) deep in the split; tiny blocks cross many block edges
    data = make_dir(tmp_path / "d", SHARDS, mask_fn=lambda p: ((p < 657) | (p > 671)).astype(np.uint8))
    with pytest.raises(DataFormatError, match=r"first: window 41, 1 in windows 0\.\.59\)"):
        TokenLoader(data, "train", 2, SEQ_LEN)
    # the same layout with a valid mask opens; point its check at the bad mask with tiny blocks
    loader = TokenLoader(make_dir(tmp_path / "ok", SHARDS), "train", 2, SEQ_LEN)
    loader._masks = open_masks(data, "train")
    for block_bytes, block in ((1, "41..41"), (16 * 7, "35..41")):  # blocks of 1 and 7 windows
        with pytest.raises(DataFormatError, match=rf"first: window 41, 1 in windows {block}\)"):
            loader._check_every_window_has_a_target(block_bytes)
