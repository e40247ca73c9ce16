"""scripts/generate.py on a tiny trained run and a tiny HF directory (CPU): the text it prints is what greedy
generate() / transformers' generate produce from the same weights, and bad input stops it with one clear line."""

import importlib.util
import subprocess
import sys

import pytest
import torch
import transformers

from train_helpers import REPO, run_train

spec = importlib.util.spec_from_file_location("generate_script", REPO / "scripts" / "generate.py")
script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(script)

PROMPT = "ROMEO: But soft, what light"
transformers.utils.logging.disable_progress_bar()  # its bars on stderr are not the script's output


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    run_train(["run_name=tiny", "train.max_steps=3", "model.max_seq_len=64", "train.ckpt_every=3"],
              data_root=root / "data", root=root)
    return root / "runs" / "tiny"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny HF GPT-2 over GPT-2's own vocabulary (so the GPT-2 tokenizer fits it), no tokenizer saved."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    path = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    model.save_pretrained(path)
    return path


def greedy_text(model, tokenizer, n_new, eos=None):
    from models import generate

    ids = torch.tensor([tokenizer.encode(PROMPT)])
    return tokenizer.decode(generate(model, ids, n_new, eos_token_id=eos)[0].tolist())


def test_a_trained_run_prints_the_greedy_continuation_and_its_speed(run_dir, capsys):
    from data.tokenizers import get_tokenizer
    from evaluation.checkpoint import load_model

    texts = script.main([str(run_dir), "--prompt", PROMPT, "--max-new-tokens", "12", "--temperature", "0",
                         "--ignore-eos", "--device", "cpu"])
    model, _ = load_model(run_dir, "cpu")
    assert model.attention.kind == "sfa"
    assert texts == [greedy_text(model, get_tokenizer("gpt2"), 12)]
    out, err = capsys.readouterr()
    assert out == texts[0] + "\n---------------\n"
    assert "GPT2 1L x 64d, sfa k=8" in err and "11 decode steps" in err and "tokens/s" in err


def test_a_checkpoint_file_with_another_attention_and_samples(run_dir, capsys):
    from data.tokenizers import get_tokenizer
    from evaluation.checkpoint import load_model

    ckpt = run_dir / "checkpoints" / "step_00000003.pt"
    texts = script.main([str(ckpt), "--prompt", PROMPT, "--max-new-tokens", "6", "--attention", "dense",
                         "--temperature", "0", "--ignore-eos", "--device", "cpu"])
    model, _ = load_model(ckpt, "cpu", {"kind": "dense"})
    assert texts == [greedy_text(model, get_tokenizer("gpt2"), 6)]
    sampled = script.main([str(ckpt), "--prompt", PROMPT, "--max-new-tokens", "6", "--num-samples", "3",
                           "--top-k", "5", "--seed", "3", "--device", "cpu"])
    assert sampled == script.main([str(ckpt), "--prompt", PROMPT, "--max-new-tokens", "6", "--num-samples", "3",
                                   "--top-k", "5", "--seed", "3", "--device", "cpu"])
    assert len(sampled) == 3 and all(t.startswith(PROMPT) for t in sampled)
    assert "dense" in capsys.readouterr().err


def test_an_hf_directory_generates_what_transformers_generates(hf_dir, capsys):
    from data.tokenizers import get_tokenizer

    tok = get_tokenizer("gpt2")
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    ids = torch.tensor([tok.encode(PROMPT)])
    theirs = hf.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
    texts = script.main([str(hf_dir), "--prompt", PROMPT, "--max-new-tokens", "10", "--temperature", "0",
                         "--ignore-eos", "--device", "cpu"])
    assert texts == [tok.decode(theirs[0].tolist())]
    assert "tiny-gpt2: GPT2 2L x 32d, dense" in capsys.readouterr().err


def test_the_command_line_as_a_user_runs_it(hf_dir, tmp_path):
    (tmp_path / "prompt.txt").write_text(PROMPT)
    cmd = [sys.executable, str(REPO / "scripts" / "generate.py"), str(hf_dir), "--prompt-file", str(tmp_path / "prompt.txt"),
           "--max-new-tokens", "5", "--device", "cpu", "--attention", "sfa", "--k", "4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(PROMPT) and "sfa k=4" in proc.stderr and "tokens/s" in proc.stderr
    proc = subprocess.run([*cmd[:2], str(tmp_path / "nope"), "--prompt", "x"], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"generate.py: {tmp_path / 'nope'} does not exist; give a run directory, a step_*.pt checkpoint or an HF "
        "model directory (with config.json)"
    ]


def error_of(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        script.main([*argv, "--device", "cpu"])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    return lines[0]


def test_bad_input_is_one_clear_line(run_dir, hf_dir, tmp_path, capsys, monkeypatch):
    long_prompt = "the cat sat on the mat" * 20  # 120 GPT-2 tokens
    assert error_of(capsys, [str(run_dir), "--prompt", long_prompt]) == (
        "generate.py: the prompt is 120 tokens, longer than the model's max_seq_len=64; shorten it")
    assert error_of(capsys, [str(run_dir), "--prompt", PROMPT, "--max-new-tokens", "60"]) == (
        "generate.py: the prompt (8 tokens) + --max-new-tokens 60 exceed the model's max_seq_len=64; use "
        "--max-new-tokens 56 or less")
    assert error_of(capsys, [str(run_dir), "--prompt-file", str(tmp_path / "none.txt")]) == (
        f"generate.py: --prompt-file {tmp_path / 'none.txt'} does not exist")
    assert error_of(capsys, [str(hf_dir), "--prompt", PROMPT, "--k", "4"]) == (
        "generate.py: --k needs --attention sfa (k is the number of features SFA keeps)")
    small_vocab = tmp_path / "small-vocab"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=101, n_positions=64, n_embd=32, n_layer=1, n_head=2,
                                                         bos_token_id=0, eos_token_id=0)).save_pretrained(small_vocab)
    assert error_of(capsys, [str(small_vocab), "--prompt", PROMPT]).startswith(
        "generate.py: tokenizer gpt2 gives id ")
    import models.decoding

    monkeypatch.setattr(models.decoding, "available_bytes", lambda device: 1000)
    line = error_of(capsys, [str(run_dir), "--prompt", PROMPT, "--num-samples", "4", "--max-new-tokens", "50"])
    assert line.startswith("generate.py: the KV cache needs 0.00 GiB (4 sequences x 58 positions x 336 bytes per "
                           "token) but cpu has 0.00 GiB available; use a smaller batch")
