"""Train GPT-2 or Qwen3 with dense attention, SFA, or the short-embedding baseline.

    python train.py                                        # tiny GPT-2 + SFA k=8 on the embedded corpus
    python train.py model=gpt2_small attention=sfa attention.k=8 data=openwebtext logging=online
    python train.py -m attention=dense,sfa attention.k=4,8,16          # a sweep, one run dir per job
    torchrun --nproc_per_node=8 train.py model=gpt2_small dist=ddp     # or dist=fsdp2

Config: configs/ (Hydra). Files: <root>/runs/<run_name>/ (config.yaml, metrics.jsonl, checkpoints/).
The run itself: training/loop.py. Docs: docs/training.md (how to), docs/metrics.md (what each number means).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from data.format import DataFormatError
from data.sources import DatasetUnavailableError, DataSourceError
from data.tokenizers import UnknownTokenizerError
from training import checkpoint as ckpt
from training import conversion, faults
from training.run_config import ConfigError
from training.hydra_setup import register_resolvers
from training.loop import train

log = logging.getLogger("train")
register_resolvers()

# Errors in what the user asked for (each message names the key), reported without a traceback.
USER_ERRORS = (ConfigError, ckpt.ResumeError, conversion.ConversionError, faults.PreflightError, DataFormatError,
               DataSourceError, DatasetUnavailableError, UnknownTokenizerError)


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    # Multirun jobs each get their own directory under hydra.sweep.dir; a single run gets out_dir.
    # Record where this job really writes, so its config.yaml tells the truth.
    cfg.out_dir = HydraConfig.get().runtime.output_dir
    try:
        train(cfg, Path(cfg.out_dir))
    except faults.StoppedBySignal as e:
        log.error("%s", e)
        sys.exit(128 + e.signum)  # the shell's convention for "ended by signal N"
    except faults.NonFiniteError as e:
        log.error("%s", e)
        sys.exit(3)
    except USER_ERRORS as e:
        # A bad value, path or resume: the message names the key and the fix; a traceback adds nothing.
        log.error("%s", e)
        sys.exit(2)


if __name__ == "__main__":
    main()
