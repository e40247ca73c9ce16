"""scripts/gpu_session.sh on the CPU at toy sizes: a study run, skipped once finished; a job that would start past
the deadline is not started; test-log names the device tool returns (no '+'); unknown jobs and arms are named."""

import os
import subprocess
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOY = ("train.max_steps=2 train.eval_every=1 train.eval_batches=1 model.n_layer=1 train.seq_len=64 "
       "train.batch_tokens=256 train.micro_batch=4 optim.warmup_steps=1")


def session(tmp_path, deadline: int, *jobs: str, **extra_env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(tmp_path / "out"), "RUNS": str(tmp_path / "runs"), "STUDY": "study",
           "OVERRIDES": TOY, "GIT_COMMIT": "abc1234", **extra_env}
    return subprocess.run(["bash", "scripts/gpu_session.sh", str(deadline), *jobs], cwd=REPO, capture_output=True,
                          text=True, env=env, timeout=600)


def summary(done: subprocess.CompletedProcess) -> list[str]:
    return done.stdout.split("== gpu_session.sh: commit abc1234", 1)[1].splitlines()[1:]


@pytest.mark.slow
def test_a_study_run_then_skipped_and_a_late_job_not_started(tmp_path):
    done = session(tmp_path, 600, "gpt2:dense:1", "gpt2:dense:1")
    lines = summary(done)
    assert lines[0].split()[:2] == ["gpt2:dense:1", "rc=0"], done.stdout + done.stderr
    assert lines[1].split()[1:] == ["finished", "before"]
    config = (tmp_path / "runs" / "seed1" / "gpt2" / "dense" / "config.yaml").read_text()
    assert "seed: 1" in config and "max_steps: 2" in config
    assert (tmp_path / "out" / "runs.tgz").exists()
    late = session(tmp_path, 30, "gpt2:sfa-k8:1")  # 30 s leave less than the checkpoint grace plus a run
    assert summary(late)[0].split()[1:3] == ["not", "started:"]
    assert not (tmp_path / "runs" / "seed1" / "gpt2" / "sfa-k8").exists()


def test_bad_jobs_are_named_and_test_logs_have_plain_names(tmp_path):
    done = session(tmp_path, 300, "bogus", "qwen3:nope:1", "tests:tests/test_topk.py,tests/test_sfa_errors.py")
    lines = summary(done)
    assert lines[0] == "bogus: unknown job (see scripts/gpu_session.sh's header)"
    assert lines[1] == "qwen3:nope:1: no such arm in scripts/quality_study.sh --list-arms"
    # gpu_tests.sh refuses a machine without CUDA; its log is still written, under a name of plain characters
    assert (tmp_path / "out" / "gpu_tests_test_topk_test_sfa_errors.log").exists(), os.listdir(tmp_path / "out")


def test_pack_out_leaves_two_archives_with_every_result_inside(tmp_path):
    """The device tool returns at most 8 files, 2 folders deep: PACK_OUT=1 leaves runs.tgz and results.tgz only."""
    out = tmp_path / "out"
    (out / "arm" / "run" / "checkpoints").mkdir(parents=True)  # a result 3 folders down, and a checkpoint
    (out / "arm" / "run" / "metrics.jsonl").write_text("{}\n")
    (out / "arm" / "run" / "checkpoints" / "step_1.pt").write_text("weights")
    done = session(tmp_path, 300, "bogus", "tests:tests/test_topk.py", PACK_OUT="1")
    assert summary(done)[0].startswith("bogus: unknown job"), done.stdout + done.stderr
    assert sorted(os.listdir(out)) == ["results.tgz", "runs.tgz"]
    with tarfile.open(out / "results.tgz") as tar:
        names = tar.getnames()
    names = [n.removeprefix("./") for n in names]
    assert "gpu_tests_test_topk.log" in names and "stdout_tests_test_topk.txt" in names
    assert "arm/run/metrics.jsonl" in names
    assert not any(n.endswith(".pt") for n in names) and ".packed" not in names


def test_profile_generate_takes_a_mode_and_a_batch(tmp_path):
    """profile_generate:MODE:BATCH runs dense and SFA at that batch; on the CPU the script refuses (no CUDA) after
    its log has a name that says the mode and the batch."""
    done = session(tmp_path, 300, "profile_generate:eager:4", "profile_generate")
    lines = summary(done)
    assert [line.split("rc=")[0].split() for line in lines] == [
        ["profile_generate", "dense", "eager", "B=4"], ["profile_generate", "sfa", "eager", "B=4"],
        ["profile_generate", "dense", "graph", "B=1"], ["profile_generate", "sfa", "graph", "B=1"]], done.stdout
    logs = sorted(p.name for p in (tmp_path / "out").glob("profile_generate_*.txt"))
    assert logs == ["profile_generate_dense_eager_b4.txt", "profile_generate_dense_graph_b1.txt",
                    "profile_generate_sfa_eager_b4.txt", "profile_generate_sfa_graph_b1.txt"]
    assert "no CUDA device" in (tmp_path / "out" / "profile_generate_sfa_eager_b4.txt").read_text()
