"""One profile_train.py command run in two or more source trees on one machine: each tree in its own process and
its own inductor cache, the trees' order rotated from call to call, and one table of wall and kernel ms per step.
This is how a change is measured against its baseline in the same run (docs/benchmarks.md, "Kernel ops as
triton_op").

    python scripts/compare_trees.py prepare 53d8527 trees/base    # where .git is: that commit's files, untracked
    python scripts/compare_trees.py run . trees/base --calls 2 -- --shape gpt2_1k --attention dense masked

`prepare` copies what a run needs from COMMIT (its tracked top-level entries but docs/, tests/ and .ci/) into DIR
and records the commit in DIR/TREE_COMMIT. Add DIR to .git/info/exclude and carry it to the GPU machine.

`run` runs `python scripts/profile_train.py ARGS --out F` inside each tree. GIT_COMMIT is set to the tree's
TREE_COMMIT (for a tree without one: $GIT_COMMIT, else git's HEAD), so each result names the code that produced it.
TORCHINDUCTOR_CACHE_DIR is set to a directory of the tree's own: inductor's cache keys do not see a custom op's
implementation, so trees sharing a cache can replay each other's compiled graphs (docs/benchmarks.md, "A pitfall
found on the way"). Call c (counted from 1) starts with tree c - 1 (mod the number of trees), so no tree always runs
first on a fresh machine. Prints wall ms, kernel ms and x dense per call, tree and arm, and writes JSON (--out, $OUT/compare_trees.json)
with every profile_train result in full.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_out import write_results  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
NOT_NEEDED_TO_RUN = {"docs", "tests", ".ci"}


def prepare(commit: str, dest: Path) -> None:
    if dest.exists() and any(dest.iterdir()):
        sys.exit(f"compare_trees prepare: {dest} exists and is not empty; remove it or pick another folder")
    names = subprocess.run(["git", "ls-tree", "-z", "--name-only", commit], cwd=REPO, capture_output=True, text=True)
    if names.returncode != 0:
        sys.exit(f"compare_trees prepare: git does not know commit {commit!r}: {names.stderr.strip()}")
    paths = [n for n in names.stdout.split("\0") if n and n not in NOT_NEEDED_TO_RUN]  # -z: names may hold spaces
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", commit, *paths], cwd=REPO, capture_output=True, check=True)
    subprocess.run(["tar", "x", "-C", str(dest)], input=archive.stdout, check=True)
    full = subprocess.run(["git", "rev-parse", "--short", commit], cwd=REPO, capture_output=True, text=True, check=True)
    (dest / "TREE_COMMIT").write_text(full.stdout.strip() + "\n")
    print(f"{dest}: commit {full.stdout.strip()} ({len(paths)} entries); add it to .git/info/exclude to carry it")


def tree_commit(tree: Path) -> str | None:
    recorded = tree / "TREE_COMMIT"
    if recorded.exists():
        return recorded.read_text().strip()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True)
    return os.environ.get("GIT_COMMIT") or head.stdout.strip() or None


def call_order(n_trees: int, call: int) -> list[int]:
    """Tree indices for call `call`: rotated so that call c starts with tree c mod n."""
    return [(call + i) % n_trees for i in range(n_trees)]


def run_one(tree: Path, label: str, commit: str | None, profile_args: list[str], work: Path, call: int) -> dict:
    out = work / f"call{call}_{label}.json"
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor_cache" / label)}
    env.pop("OUT", None)  # the tree's script writes only where --out says; this script writes the summary
    if commit:
        env["GIT_COMMIT"] = commit
    log = work / f"call{call}_{label}.log"
    with log.open("w") as f:
        proc = subprocess.run([sys.executable, "scripts/profile_train.py", *profile_args, "--out", str(out)],
                              cwd=tree, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text().strip().splitlines()[-5:]
        return dict(tree=label, commit=commit, call=call, error=f"exit {proc.returncode}", log_tail=tail)
    return dict(tree=label, commit=commit, call=call, result=json.loads(out.read_text()))


def print_table(runs: list[dict]) -> None:
    print(f"\n{'call':>4} {'tree':<24} {'commit':<9} {'arm':<10} {'wall ms':>9} {'kernel ms':>10} {'x dense':>8}")
    for r in runs:
        if "error" in r:
            print(f"{r['call']:>4} {r['tree']:<24} {r['commit'] or '-':<9} failed ({r['error']}): {r['log_tail'][-1:]}")
            continue
        arms = r["result"]["arms"]
        dense = next((a for a in arms if a["attention"] == "dense"), None)
        for a in arms:
            ratio = f"{a['tokens_per_s'] / dense['tokens_per_s']:.3f}" if dense else "-"
            print(f"{r['call']:>4} {r['tree']:<24} {r['commit'] or '-':<9} {a['attention']:<10} {a['wall_ms']:>9.2f} "
                  f"{a['kernel_ms']:>10.2f} {ratio:>8}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="copy COMMIT's files into DIR (needs .git)")
    prep.add_argument("commit")
    prep.add_argument("dir", type=Path)
    run = sub.add_parser("run", help="profile_train.py in each tree; arguments after -- go to profile_train.py")
    run.add_argument("trees", nargs="+", type=Path)
    run.add_argument("--calls", type=int, default=1, help="rounds over all trees, order rotated each (default 1)")
    run.add_argument("--out", help="JSON file to write")
    argv = sys.argv[1:] if argv is None else list(argv)
    profile_args = argv[argv.index("--") + 1:] if "--" in argv else []
    args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    args.profile_args = profile_args
    if args.command == "run":
        if args.calls < 1:
            p.error(f"--calls must be >= 1, got {args.calls}")
        for tree in args.trees:
            if not (tree / "scripts" / "profile_train.py").exists():
                p.error(f"{tree} is not a source tree (no scripts/profile_train.py); make one with "
                        "`compare_trees.py prepare COMMIT DIR`")
        if any(a == "--out" or a.startswith("--out=") for a in profile_args):
            p.error("--out after -- is this script's to set; give --out before --")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.command == "prepare":
        prepare(args.commit, args.dir)
        return None
    trees = [t.resolve() for t in args.trees]
    labels = [t.name if t != REPO else "this_tree" for t in trees]
    labels = [f"{i}_{name}" for i, name in enumerate(labels)]  # unique even for two trees of one name
    commits = [tree_commit(t) for t in trees]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for call in range(1, args.calls + 1):
            for i in call_order(len(trees), call - 1):
                runs.append(run_one(trees[i], labels[i], commits[i], args.profile_args, Path(tmp), call))
                print(f"call {call}, {labels[i]}: {runs[-1].get('error', 'done')}", flush=True)
    print_table(runs)
    result = dict(script="compare_trees.py", profile_args=args.profile_args, calls=args.calls,
                  trees=[dict(label=label, path=str(t), commit=c) for label, t, c in zip(labels, trees, commits)],
                  runs=runs)
    for path in write_results(result, args.out, "compare_trees.json"):
        print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
