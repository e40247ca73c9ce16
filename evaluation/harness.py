"""lm-evaluation-harness's command line with our model registered as "sfa".

    python -m evaluation.harness --model sfa --model_args checkpoint=<run dir or .pt>,tokenizer=gpt2 \
        --tasks piqa,lambada_openai,arc_easy,hellaswag --device cuda --batch_size 16

Every lm_eval argument works as documented by the harness. The tasks' datasets are downloaded by the
harness (network needed, once); see docs/evaluation.md.
"""

from __future__ import annotations


def main() -> None:
    from lm_eval.__main__ import cli_evaluate  # lazy: lm_eval is heavy (datasets, transformers)

    from . import lm_eval_adapter  # noqa: F401  # lazy: imports lm_eval; registers model "sfa"

    cli_evaluate()


if __name__ == "__main__":
    main()
