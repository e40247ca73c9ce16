"""The decode engine behind generate(): a static KV cache and one shape-static decode step, replayed from
a CUDA graph (or compiled by torch.compile in "reduce-overhead" mode).

A request runs in two phases:
  prefill  the prompt goes through the cache in chunks of at most `prefill_chunk` tokens, computing the
           logits of the last position only; the first new token is sampled from them.
  decode   each step reads the last token from the output buffer at the position held on the device,
           writes its keys/values into the cache (preallocated to prompt + max_new_tokens), attends over
           the whole capacity masked to the valid length, samples on the device, stores the token and
           advances the position. Every shape is fixed and nothing is read on the host, so the step is
           captured once and replayed at every position.
The host synchronises only every `eos_check_every` steps (to stop once every sequence has produced eos)
and at the end.

Modes: eager (the step as plain PyTorch: CPU, and the oracle the graph paths are tested against); graph
(a torch.cuda.CUDAGraph captured after WARMUP_STEPS eager steps, which are real steps); compile
(torch.compile of the step: inductor fuses the small ops and replays its own CUDA graphs); auto (graph on
CUDA, eager elsewhere). Design and measurements: docs/inference.md.
"""

from __future__ import annotations

import torch

from .sampling import Sampler

MODES = ("auto", "eager", "graph", "compile")
WARMUP_STEPS = 2  # eager steps before capture: Triton compiles, cuBLAS picks its kernels, RoPE tables grow
PREFILL_TOKENS = 16384  # default tokens per prefill forward (batch x chunk): bounds the activations of a long prompt
COMPILE_OPTIONS = {"mode": "reduce-overhead", "fullgraph": True}


def resolve_mode(mode: str, device: torch.device) -> str:
    if mode not in MODES:
        raise ValueError(f"decode mode={mode!r} is unknown; choose one of {', '.join(MODES)}")
    if mode == "auto":
        return "graph" if device.type == "cuda" else "eager"
    if mode == "graph" and device.type != "cuda":
        raise ValueError(f"decode mode='graph' captures CUDA graphs; the model is on {device} (use mode='eager')")
    return mode


def available_bytes(device: torch.device) -> int | None:
    """Memory a new allocation may take on `device` (None where it cannot be read)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def cache_bytes(model, batch_size: int, capacity: int, dtype: torch.dtype | None = None) -> int:
    """Bytes model.new_cache(batch_size, capacity) allocates (the exact per-token formula of sfa/cache.py)."""
    return model.kv_cache_bytes_per_token(dtype or model.lm_head.weight.dtype) * batch_size * capacity


def check_cache_fits(model, batch_size: int, capacity: int) -> None:
    """Refuse, before allocating anything, a cache larger than the memory available on the model's device."""
    device = model.lm_head.weight.device
    need, free = cache_bytes(model, batch_size, capacity), available_bytes(device)
    if free is not None and need > free:
        per_token = model.kv_cache_bytes_per_token(model.lm_head.weight.dtype)
        raise ValueError(
            f"the KV cache needs {need / 2**30:.2f} GiB ({batch_size} sequences x {capacity} positions x {per_token} "
            f"bytes per token) but {device} has {free / 2**30:.2f} GiB available; use a smaller batch, a shorter "
            "prompt or fewer new tokens, or a smaller cache (attention sfa or short)"
        )


class Decoder:
    """Decodes one batch of equally long prompts into a static cache of `capacity` positions.

    decoder = Decoder(model, batch_size, capacity, sampler=Sampler(...), mode="auto", eos_token_id=None)
    tokens = decoder.run(prompt_ids, max_new_tokens)   # or prefill() then step() yourself (the benchmark)
    `tokens` holds the prompt and everything generated, position by position; `position` (device) is the
    position of the token the next step feeds."""

    def __init__(self, model, batch_size: int, capacity: int, *, sampler: Sampler | None = None, mode: str = "auto",
                 eos_token_id: int | None = None, compile_options: dict | None = None):
        self.model = model
        self.device = model.lm_head.weight.device
        self.mode = resolve_mode(mode, self.device)
        self.sampler = sampler or Sampler()
        generator = self.sampler.generator
        if generator is not None and not self.sampler.greedy:
            if generator.device.type != self.device.type:
                raise ValueError(
                    f"the generator is on {generator.device} but the model on {self.device}; "
                    f"pass torch.Generator(device={self.device.type!r})"
                )
            if self.mode == "compile":
                raise ValueError("mode='compile' cannot sample from a torch.Generator (torch.compile does not trace "
                                 "one); seed with torch.manual_seed, or use mode='graph'")
        self.eos_token_id = eos_token_id
        check_cache_fits(model, batch_size, capacity)
        self.cache = model.new_cache(batch_size, capacity)
        self.tokens = torch.zeros(batch_size, capacity, dtype=torch.long, device=self.device)
        self.position = torch.zeros(1, dtype=torch.long, device=self.device)
        self.finished = torch.zeros(batch_size, dtype=torch.bool, device=self.device)
        self.prompt_length: int | None = None
        self.compile_options = dict(COMPILE_OPTIONS if compile_options is None else compile_options)
        self._eager_steps = 0
        self._graph: torch.cuda.CUDAGraph | None = None
        self._compiled = None

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def capacity(self) -> int:
        return self.tokens.shape[1]

    # --- the two phases ---------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, chunk: int | None = None) -> None:
        """Encode the prompts (B, T) into the cache, `chunk` positions per forward (default: about
        PREFILL_TOKENS tokens per forward), and sample the first new token."""
        b, t = input_ids.shape
        if b != self.batch_size or t + 1 > self.capacity:
            raise ValueError(f"Decoder: prompts {tuple(input_ids.shape)} need batch {self.batch_size} and at most "
                             f"{self.capacity - 1} positions (the cache holds {self.capacity})")
        if self.prompt_length is not None:
            raise ValueError("Decoder: already prefilled; a Decoder serves one batch of prompts")
        if chunk is None:
            chunk = max(1, PREFILL_TOKENS // b)
        for start in range(0, t, chunk):
            logits, _ = self.model(input_ids[:, start : start + chunk], cache=self.cache, logits_to_keep=1)
        self.tokens[:, :t] = input_ids
        self.tokens[:, t] = self._choose(logits[:, -1])
        self.position.fill_(t)
        self.prompt_length = t

    @torch.no_grad()
    def step(self) -> None:
        """One decode step: the next token of every sequence, written into `tokens`."""
        if self.mode == "eager":
            self._step()
        elif self._eager_steps < WARMUP_STEPS:
            self._warm_up()
        elif self.mode == "compile":
            if self._compiled is None:
                self._compiled = self._compile()
            self._compiled()
        else:
            if self._graph is None:
                self._graph = self._capture()
            self._graph.replay()

    @torch.no_grad()
    def run(self, input_ids: torch.Tensor, max_new_tokens: int, *, prefill_chunk: int | None = None,
            eos_check_every: int = 16) -> torch.Tensor:
        """Prompts (B, T) -> (B, T + n) with n <= max_new_tokens new tokens (fewer only when every sequence
        produced eos; a finished sequence keeps emitting eos)."""
        if input_ids.shape[1] + max_new_tokens > self.capacity:
            raise ValueError(f"Decoder: {input_ids.shape[1]} prompt + {max_new_tokens} new positions exceed the "
                             f"cache's {self.capacity}")
        self.prefill(input_ids, prefill_chunk)
        return self.decode(max_new_tokens, eos_check_every=eos_check_every)

    @torch.no_grad()
    def decode(self, max_new_tokens: int, *, eos_check_every: int = 16) -> torch.Tensor:
        """After prefill: step until max_new_tokens tokens exist (the first came from prefill) or every
        sequence has produced eos; returns the prompt and the new tokens."""
        produced = 1
        while produced < max_new_tokens:
            if self.eos_token_id is not None and produced % eos_check_every == 0 and bool(self.finished.all()):
                break
            self.step()
            produced += 1
        return self._trim_after_eos(self.tokens[:, : self.prompt_length + produced])

    # --- internals --------------------------------------------------------------------------------
    def _choose(self, logits: torch.Tensor) -> torch.Tensor:
        new = self.sampler(logits)
        if self.eos_token_id is not None:
            new = torch.where(self.finished, self.eos_token_id, new)
            self.finished |= new == self.eos_token_id
        return new

    def _step(self) -> None:
        token = self.tokens.index_select(1, self.position)
        logits, _ = self.model(token, cache=self.cache, position=self.position, logits_to_keep=1)
        self.tokens.index_copy_(1, self.position + 1, self._choose(logits[:, -1])[:, None])
        self.position += 1

    def _warm_up(self) -> None:
        """A real step, eager; on a side stream when a graph will be captured (lazy CUDA initialisation
        must not happen on the capturing stream)."""
        self._eager_steps += 1
        if self.device.type != "cuda":
            return self._step()
        main = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            self._step()
        main.wait_stream(side)

    def _capture(self) -> torch.cuda.CUDAGraph:
        """Record one step (not run: the caller replays it). Its temporaries live in the graph's own pool."""
        graph = torch.cuda.CUDAGraph()
        if self.sampler.generator is not None and not self.sampler.greedy:
            graph.register_generator_state(self.sampler.generator)
        with torch.cuda.graph(graph):
            self._step()
        return graph

    def _compile(self):
        # Static addresses: the step mutates these in place, and reduce-overhead's CUDA graphs may replay
        # over them only if torch.compile knows they never move (as HF's StaticCache does).
        for tensor in [*(t for layer in self.cache.layers for t in layer.tensors()), self.tokens, self.position,
                       self.finished]:
            torch._dynamo.mark_static_address(tensor)
        return torch.compile(self._step, **self.compile_options)

    def _trim_after_eos(self, tokens: torch.Tensor) -> torch.Tensor:
        """Cut the columns generated after the step at which the last sequence produced eos (eos checks run
        every few steps, so a few extra eos columns may have been produced)."""
        if self.eos_token_id is None:
            return tokens
        hit = tokens[:, self.prompt_length :] == self.eos_token_id
        if not bool(hit.any(dim=1).all()):
            return tokens
        last_first_eos = int(hit.int().argmax(dim=1).max())
        return tokens[:, : self.prompt_length + last_first_eos + 1]
