"""The lm-evaluation-harness adapter: scores equal by-hand sums of token log-probs, and the harness runs
it end to end on a four-item local task (tests/data/lm_eval_tiny), offline."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from data.tokenizers import get_tokenizer  # noqa: E402
from evaluation.lm_eval_adapter import SFALM  # noqa: E402
from models import build_model, generate  # noqa: E402

TASK_DIR = Path(__file__).parent / "data" / "lm_eval_tiny"


def tiny_model(max_seq_len=64, attention=None):
    return build_model("gpt2_tiny", attention, n_layer=2, n_head=2, d_model=64, max_seq_len=max_seq_len).eval()


def by_hand_loglikelihood(model, tok, context: str, continuation: str) -> tuple[float, bool]:
    """Sum of log p(continuation token | everything before it), straight from the model's logits."""
    ctx = tok.encode(context)
    whole = tok.encode(context + continuation)
    cont = whole[len(ctx) :]
    with torch.no_grad():
        logits, _ = model(torch.tensor([whole[:-1]]))
    logp = F.log_softmax(logits[0].double(), dim=-1)
    rows = [logp[len(ctx) - 1 + t] for t in range(len(cont))]
    total = sum(float(row[c]) for row, c in zip(rows, cont))
    greedy = all(int(row.argmax()) == c for row, c in zip(rows, cont))
    return total, greedy


def requests(kind, args_list):
    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(args_list)]


def test_loglikelihood_equals_sum_of_token_logprobs():
    model, tok = tiny_model(), get_tokenizer("gpt2")
    lm = SFALM(model=model, tokenizer="gpt2", device="cpu", batch_size=2)
    pairs = [
        ("The capital of France is", " Paris"),
        ("Bees make", " honey and wax"),
        ("A", " b c d e f g"),
        ("One two three four five six seven", " eight"),
        ("", "Hello world"),
    ]
    got = lm.loglikelihood(requests("loglikelihood", pairs), disable_tqdm=True)
    for (context, continuation), (logprob, greedy) in zip(pairs, got):
        if context == "":  # the harness conditions an empty context on end-of-text
            context_ids = [tok.eot_token]
            whole = context_ids + tok.encode(continuation)
            with torch.no_grad():
                logp = F.log_softmax(model(torch.tensor([whole[:-1]]))[0][0].double(), dim=-1)
            expected = sum(float(logp[i, whole[i + 1]]) for i in range(len(whole) - 1))
            exp_greedy = all(int(logp[i].argmax()) == whole[i + 1] for i in range(len(whole) - 1))
        else:
            expected, exp_greedy = by_hand_loglikelihood(model, tok, context, continuation)
        assert logprob == pytest.approx(expected, rel=1e-5, abs=1e-4)
        assert greedy == exp_greedy


def test_greedy_flag_true_exactly_when_continuation_is_the_argmax():
    model, tok = tiny_model(), get_tokenizer("gpt2")
    lm = SFALM(model=model, tokenizer="gpt2", device="cpu")
    context = tok.encode("Once upon a time")
    greedy = generate(model, torch.tensor([context]), 3)[0, len(context) :].tolist()
    other = greedy[:2] + [(greedy[2] + 1) % tok.vocab_size]
    (_, is_greedy), (_, is_other_greedy) = lm._loglikelihood_tokens([(None, context, greedy), (None, context, other)])
    assert is_greedy and not is_other_greedy


def test_long_context_is_left_truncated_to_max_length():
    model, tok = tiny_model(max_seq_len=16), get_tokenizer("gpt2")
    lm = SFALM(model=model, tokenizer="gpt2", device="cpu")
    context = " ".join(f"w{i}" for i in range(40))
    [(logprob, _)] = lm.loglikelihood(requests("loglikelihood", [(context, " end")]), disable_tqdm=True)
    whole = tok.encode(context + " end")
    n_cont = len(whole) - len(tok.encode(context))
    window = whole[-17:]  # max_length inputs + the last target
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([window[:-1]]))[0][0].double(), dim=-1)
    expected = sum(float(logp[16 - n_cont + t, window[17 - n_cont + t]]) for t in range(n_cont))
    assert logprob == pytest.approx(expected, rel=1e-5, abs=1e-4)


def test_rolling_loglikelihood_covers_every_token_once():
    max_len = 16
    model, tok = tiny_model(max_seq_len=max_len), get_tokenizer("gpt2")
    lm = SFALM(model=model, tokenizer="gpt2", device="cpu", batch_size=3)
    text = "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of foolishness, " * 2
    [got] = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]), disable_tqdm=True)
    seq = [tok.eot_token] + tok.encode(text)  # token i of the text is seq[i + 1]
    n = len(seq) - 1
    assert n > 2 * max_len
    expected = 0.0
    for start in range(0, n, max_len):  # predict text tokens start..end-1, with a full window when possible
        end = min(start + max_len, n)
        lo = max(0, end - max_len)
        with torch.no_grad():
            logp = F.log_softmax(model(torch.tensor([seq[lo:end]]))[0][0].double(), dim=-1)
        expected += sum(float(logp[i - lo, seq[i + 1]]) for i in range(start, end))
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-3)


def test_generate_until_is_greedy_and_stops_at_the_stop_string():
    model, tok = tiny_model(), get_tokenizer("gpt2")
    lm = SFALM(model=model, tokenizer="gpt2", device="cpu")
    context = "Hello there"
    prompt = torch.tensor([tok.encode(context)])
    full = tok.decode(generate(model, prompt, 6)[0, prompt.shape[1] :].tolist())
    [plain] = lm.generate_until(requests("generate_until", [(context, {"until": [], "max_gen_toks": 6})]), disable_tqdm=True)
    assert plain == full
    stop = full[len(full) // 2 : len(full) // 2 + 1] or "x"
    [cut] = lm.generate_until(requests("generate_until", [(context, {"until": [stop], "max_gen_toks": 6})]), disable_tqdm=True)
    assert cut == full.split(stop)[0]


@pytest.mark.slow
def test_harness_runs_tiny_local_task_with_by_hand_scores(monkeypatch):
    from lm_eval.tasks import TaskManager

    model, tok = tiny_model(), get_tokenizer("gpt2")
    lm = SFALM(model=model, tokenizer="gpt2", device="cpu", batch_size=4)
    monkeypatch.chdir(TASK_DIR)  # the task's data_files path is relative to its folder
    out = lm_eval.simple_evaluate(
        model=lm, tasks=["sfa_tiny_mc"], task_manager=TaskManager(include_path=str(TASK_DIR), include_defaults=False),
        log_samples=True,
    )  # fmt: skip
    samples = out["samples"]["sfa_tiny_mc"]
    assert len(samples) == 4
    hits = []
    for sample in samples:
        scores = []
        for (context, continuation), [(logprob, _)] in zip(sample["arguments"], sample["resps"]):
            expected, _ = by_hand_loglikelihood(model, tok, context, continuation)
            assert logprob == pytest.approx(expected, rel=1e-5, abs=1e-4)
            scores.append(expected)
        hits.append(max(range(len(scores)), key=scores.__getitem__) == sample["doc"]["label"])
    assert out["results"]["sfa_tiny_mc"]["acc,none"] == pytest.approx(sum(hits) / len(hits))


def test_bad_arguments_have_clear_messages():
    with pytest.raises(ValueError, match="exactly one of checkpoint"):
        SFALM(tokenizer="gpt2")
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        SFALM(model=tiny_model(), tokenizer="gpt2", device="cpu", batch_size="auto")
    with pytest.raises(ValueError, match="max_length=128 exceeds"):
        SFALM(model=tiny_model(max_seq_len=64), tokenizer="gpt2", device="cpu", max_length=128)
    with pytest.raises(ValueError, match="tokenizer is required"):
        SFALM(model=tiny_model(), device="cpu")
    with pytest.raises(ValueError, match="attention/k apply to a checkpoint"):
        SFALM(model=tiny_model(), tokenizer="gpt2", attention="sfa", k=8)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from training.checkpoint import save_weights
    from training.hydra_setup import compose_run_config
    from training.run_config import model_from_config

    root = tmp_path_factory.mktemp("lm_eval_ckpt")
    cfg = compose_run_config([
        "model=gpt2_tiny", "model.n_layer=2", "model.n_head=2", "model.d_model=64", "model.max_seq_len=64",
        "attention=dense", f"root={root}",
    ])  # fmt: skip
    return save_weights(model_from_config(cfg), cfg, root / "run" / "checkpoints" / "step_00000001.pt")


def test_from_checkpoint_with_its_tokenizer_and_an_sfa_override(tiny_checkpoint):
    from evaluation.checkpoint import load_model

    lm = SFALM(checkpoint=str(tiny_checkpoint.parent.parent), attention="sfa", k="4", device="cpu")
    assert lm.tokenizer.name == "gpt2"  # from the run's config
    assert lm.model.attention.kind == "sfa" and lm.model.attention.topk_q == 4
    sparse, _ = load_model(tiny_checkpoint, attention={"kind": "sfa", "topk_q": 4})
    [(logprob, _)] = lm.loglikelihood(requests("loglikelihood", [("Rivers run to", " the sea")]), disable_tqdm=True)
    expected, _ = by_hand_loglikelihood(sparse, get_tokenizer("gpt2"), "Rivers run to", " the sea")
    assert logprob == pytest.approx(expected, rel=1e-5, abs=1e-4)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        SFALM(checkpoint=str(tiny_checkpoint), attention="sfa", k="eight", device="cpu")


@pytest.mark.slow
def test_documented_command_line_runs_the_local_task(tiny_checkpoint, tmp_path):
    import json
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    cmd = [
        sys.executable, "-m", "evaluation.harness", "--model", "sfa", "--model_args", f"checkpoint={tiny_checkpoint}", "--device", "cpu",
        "--tasks", "sfa_tiny_mc", "--include_path", str(TASK_DIR), "--batch_size", "4", "--output_path", str(tmp_path / "out"),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(repo)}
    done = subprocess.run(cmd, cwd=TASK_DIR, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    [result_file] = list((tmp_path / "out").rglob("results_*.json"))
    results = json.loads(result_file.read_text())["results"]["sfa_tiny_mc"]
    assert 0.0 <= results["acc,none"] <= 1.0
