"""Data: text -> token shards (prepare.py), memmap batches for training (loader.py), offline tokenizers.

See docs/data.md. Kept import-light: importing `data` does not load tokenizers, datasets or torch.
"""
