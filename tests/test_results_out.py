"""scripts/results_out.py: a script's JSON goes to --out (parents created) and to $OUT/<name> when $OUT is set."""

import importlib.util
import json

from train_helpers import REPO

spec = importlib.util.spec_from_file_location("results_out", REPO / "scripts" / "results_out.py")
results_out = importlib.util.module_from_spec(spec)
spec.loader.exec_module(results_out)


def test_writes_to_out_and_to_the_out_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path / "sent_back"))
    paths = results_out.write_results({"a": [1, 2]}, tmp_path / "new" / "r.json", "bench.json")
    assert paths == [tmp_path / "new" / "r.json", tmp_path / "sent_back" / "bench.json"]
    assert all(json.loads(p.read_text()) == {"a": [1, 2]} for p in paths)


def test_nothing_is_written_without_a_destination(tmp_path, monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    monkeypatch.chdir(tmp_path)
    assert results_out.write_results({"a": 1}, None, "bench.json") == []
    assert list(tmp_path.iterdir()) == []
