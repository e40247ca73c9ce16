"""Our models in EleutherAI's lm-evaluation-harness, registered as model "sfa".

    python -m evaluation.harness --model sfa \
        --model_args checkpoint=workspace/runs/gpt2_small-sfa-q8k8,tokenizer=gpt2 \
        --tasks piqa,lambada_openai,arc_easy,hellaswag --device cuda --batch_size 16

(`python -m evaluation.harness` is lm_eval's own command line with this module imported first: the
harness has no plugin hook that would make `lm_eval --model sfa` find a model outside its package.)

model_args: checkpoint (file or run dir), tokenizer (gpt2 | qwen; default: the run config's),
attention / k (evaluate with another attention, e.g. attention=sfa,k=8 on a dense checkpoint),
dtype (auto | fp32 | bf16), max_length (default the model's max_seq_len), max_gen_toks (default 256).
Device and batch size come from the harness's own --device (its default is cuda:0: pass --device cpu
without a GPU) and --batch_size (an integer; "auto" is not supported).

Scoring follows the harness's conventions (TemplateLM): a continuation's log-likelihood is the sum
of its tokens' log-probs given the (left-truncated) context; an empty context is conditioned on the
end-of-text token; rolling log-likelihoods use the harness's disjoint windows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as err:  # pragma: no cover - lm_eval is in requirements.txt
    raise ImportError("the lm-eval adapter needs lm_eval (pip install lm_eval==0.4.13, see requirements.txt)") from err
from tqdm import tqdm

from data.tokenizers import get_tokenizer
from models import generate
from training.distributed import resolve_device
from training.run_config import run_tokenizer

from .checkpoint import attention_override, load_model
from .runtime import autocast, resolve_dtype


def _positive_int(value, name: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if isinstance(value, bool) or number < 1 or str(number) != str(value).strip():
        raise ValueError(f"sfa model_args: {name} must be a positive integer, got {value!r}")
    return number


@register_model("sfa")
class SFALM(TemplateLM):
    def __init__(
        self,
        checkpoint: str | None = None,
        tokenizer=None,
        attention: str | None = None,
        k=None,
        device: str = "auto",
        dtype: str = "auto",
        batch_size=1,
        max_length=None,
        max_gen_toks=256,
        model: torch.nn.Module | None = None,
        max_batch_size=None,  # passed by the harness's CLI; batch_size "auto" is not supported
    ):
        super().__init__()
        if (checkpoint is None) == (model is None):
            raise ValueError("sfa model_args: give exactly one of checkpoint=<file or run dir> or (in Python) model=")
        self._device = resolve_device(device, key="--device")
        self.dtype = resolve_dtype(dtype, self._device)
        self.checkpoint = checkpoint
        if checkpoint is not None:
            override = attention_override(attention, None if k is None else _positive_int(k, "k"))
            model, cfg = load_model(checkpoint, self._device, attention=override)
            tokenizer = run_tokenizer(cfg) if tokenizer is None else tokenizer
        elif attention is not None or k is not None:
            raise ValueError("sfa model_args: attention/k apply to a checkpoint; build the model with them instead")
        if tokenizer is None:
            raise ValueError("sfa model_args: tokenizer is required (gpt2 or qwen): the checkpoint's config names none")
        self.tokenizer = get_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
        if self.tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(
                f"sfa model_args: tokenizer {self.tokenizer.name!r} has {self.tokenizer.vocab_size} ids but the model's "
                f"vocab_size is {model.config.vocab_size}"
            )
        self.model = model.to(self._device).eval()
        self.batch_size = _positive_int(batch_size, "batch_size")
        self.max_length = model.config.max_seq_len if max_length is None else _positive_int(max_length, "max_length")
        if self.max_length > model.config.max_seq_len:
            raise ValueError(f"sfa model_args: max_length={self.max_length} exceeds the model's max_seq_len={model.config.max_seq_len}")
        self.max_gen_toks = _positive_int(max_gen_toks, "max_gen_toks")

    # --- what TemplateLM needs -------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eot_token

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)

    def tok_decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def get_model_info(self) -> dict:
        return {"checkpoint": str(self.checkpoint), "attention": str(self.model.attention), "dtype": str(self.dtype)}

    @torch.no_grad()
    def _logits(self, rows: list[list[int]]) -> torch.Tensor:
        """Log-probs (B, T, V) for right-padded rows; padding sits after every scored position, and
        attention is causal, so it cannot change them."""
        width = max(len(r) for r in rows)
        batch = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            batch[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        with autocast(self._device, self.dtype):
            logits, _ = self.model(batch.to(self._device))
        return F.log_softmax(logits.float(), dim=-1)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: (cache key, context ids, continuation ids) -> (sum of continuation log-probs, greedy?)."""
        for _, _, cont in requests:
            if not 1 <= len(cont) <= self.max_length:
                raise ValueError(f"continuation of {len(cont)} tokens cannot be scored with max_length={self.max_length}")
        # Longest first: the first batch fails fast on memory, and similar lengths pad little.
        collator = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])))
        results = []
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="loglikelihood")
        for chunk in collator.get_batched(n=self.batch_size):
            # The model sees at most max_length tokens: keep the end of context + continuation.
            rows = [(ctx + cont)[-(self.max_length + 1) :][:-1] for _, ctx, cont in chunk]
            logprobs = self._logits(rows)
            for i, (key, _, cont) in enumerate(chunk):
                n = len(rows[i])
                scored = logprobs[i, n - len(cont) : n]  # the positions predicting the continuation
                target = torch.tensor(cont, device=scored.device)
                logprob = float(scored.gather(-1, target[:, None]).sum())
                greedy = bool((scored.argmax(dim=-1) == target).all())
                results.append((logprob, greedy))
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, (logprob, greedy))
            bar.update(len(chunk))
        bar.close()
        return collator.get_original(results)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for (text,) in tqdm([r.args for r in requests], disable=disable_tqdm or self.rank != 0, desc="rolling"):
            windows = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(
                    self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1
                )
            ]
            scores = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows], disable_tqdm=True)
            total = sum(logprob for logprob, _ in scores)
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """One request at a time with models.generate (KV cache), then cut at the first stop string.
        Generation runs to max_gen_toks or end-of-text; stop strings do not end it early."""
        eos_text = self.tok_decode([self.eot_token_id])
        out = []
        for context, gen_kwargs in tqdm([r.args for r in requests], disable=disable_tqdm or self.rank != 0, desc="generate"):
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_gen = kwargs.pop("max_gen_toks")
            temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
            if max_gen >= self.max_length:
                raise ValueError(f"max_gen_toks={max_gen} leaves no room for context within max_length={self.max_length}")
            ids = self.tok_encode(context)[-(self.max_length - max_gen) :] or [self.prefix_token_id]
            prompt = torch.tensor([ids], dtype=torch.long, device=self._device)
            with autocast(self._device, self.dtype):
                tokens = generate(self.model, prompt, max_gen, temperature=temperature, eos_token_id=self.eot_token_id)
            new = tokens[0, prompt.shape[1] :].tolist()
            if self.eot_token_id in new:
                new = new[: new.index(self.eot_token_id)]
            text = self.tok_decode(new)
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return out
