"""scripts/compare_trees.py: `prepare` copies a commit's runnable files and names the commit, `run` runs
profile_train.py --quick in each tree with the tree's own commit and inductor cache, order rotated per call, and
bad input stops with one clear line."""

import importlib.util
import json
import subprocess

import pytest

from train_helpers import REPO

spec = importlib.util.spec_from_file_location("compare_trees", REPO / "scripts" / "compare_trees.py")
ct = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ct)

HEAD = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
needs_git = pytest.mark.skipif(not HEAD, reason="needs the repository's .git (a clean clone has it)")


def test_calls_rotate_which_tree_runs_first():
    assert [ct.call_order(3, c) for c in range(4)] == [[0, 1, 2], [1, 2, 0], [2, 0, 1], [0, 1, 2]]


@needs_git
def test_prepare_then_run_two_trees(tmp_path, monkeypatch):
    tree = tmp_path / "base"
    ct.main(["prepare", "HEAD", str(tree)])
    assert (tree / "TREE_COMMIT").read_text().strip() == HEAD
    assert (tree / "scripts" / "profile_train.py").exists() and (tree / "sfa").is_dir()
    assert not (tree / "docs").exists() and not (tree / "tests").exists()

    monkeypatch.setenv("GIT_COMMIT", "cafe123")  # what a copied tree without .git gets told; TREE_COMMIT wins
    out = tmp_path / "cmp.json"
    result = ct.main(["run", str(REPO), str(tree), "--out", str(out), "--", "--quick"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    runs = result["runs"]
    assert [r["tree"] for r in runs] == ["0_this_tree", "1_base"] and all("error" not in r for r in runs)
    assert [r["result"]["versions"]["commit"] for r in runs] == ["cafe123", HEAD]  # each names its own code
    for r in runs:
        assert [a["attention"] for a in r["result"]["arms"]] == ["dense", "reference"]


@needs_git
def test_a_failing_tree_is_reported_not_fatal(tmp_path):
    tree = tmp_path / "broken"
    ct.main(["prepare", "HEAD", str(tree)])
    (tree / "scripts" / "profile_train.py").write_text("raise SystemExit('broken on purpose')\n")
    result = ct.main(["run", str(tree), "--", "--quick"])
    (run,) = result["runs"]
    assert run["error"] == "exit 1" and "broken on purpose" in run["log_tail"][-1]


@pytest.mark.parametrize("argv,message", [
    (["run", "/nonexistent"], "is not a source tree"),
    (["run", ".", "--calls", "0"], "--calls must be >= 1"),
    (["run", ".", "--", "--out", "x.json"], "--out after -- is this script's"),
])
def test_bad_arguments_stop_with_one_line(argv, message, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit):
        ct.parse_args(argv)
    assert message in capsys.readouterr().err


@needs_git
def test_prepare_refuses_an_unknown_commit_and_a_full_folder(tmp_path):
    with pytest.raises(SystemExit, match="git does not know commit 'nope'"):
        ct.main(["prepare", "nope", str(tmp_path / "x")])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("")
    with pytest.raises(SystemExit, match="exists and is not empty"):
        ct.main(["prepare", "HEAD", str(tmp_path / "full")])


STUB_PROFILE = """import json, os, sys
out = sys.argv[sys.argv.index("--out") + 1]
arms = [dict(attention="dense", wall_ms=2.0, kernel_ms=1.0, tokens_per_s=100.0),
        dict(attention="masked", wall_ms=4.0, kernel_ms=2.0, tokens_per_s=50.0)]
json.dump(dict(arms=arms, commit=os.environ.get("GIT_COMMIT")), open(out, "w"))
"""


def test_two_calls_rotate_the_order_and_keep_each_trees_commit(tmp_path, capsys):
    trees = []
    for name, commit in (("a", "aaaa111"), ("b", "bbbb222")):
        tree = tmp_path / name
        (tree / "scripts").mkdir(parents=True)
        (tree / "scripts" / "profile_train.py").write_text(STUB_PROFILE)
        (tree / "TREE_COMMIT").write_text(commit + "\n")
        trees.append(str(tree))
    result = ct.main(["run", *trees, "--calls", "2", "--out", str(tmp_path / "cmp.json")])
    runs = result["runs"]
    assert [(r["call"], r["tree"]) for r in runs] == [(1, "0_a"), (1, "1_b"), (2, "1_b"), (2, "0_a")]
    assert [r["result"]["commit"] for r in runs] == ["aaaa111", "bbbb222", "bbbb222", "aaaa111"]
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if " masked " in line]
    assert [row[-1] for row in rows] == ["0.500"] * 4  # masked at half dense's tokens/s, per call and tree
