"""Train a causal language model on bytes of text with mesa: python -m train.lm --workdir DIR [flags].

On the Python standard library's own source (found at run time; the metrics header says
which Python's), a tiny GPT in minutes on a laptop CPU:

    python -m train.lm --workdir runs/gpt-tiny --steps 500

The plain-Flax baseline, the same run otherwise; 4-bit codes with row ranges; a Llama; your text:

    python -m train.lm --workdir runs/gpt-tiny-base --steps 500 --no-mesa
    python -m train.lm --workdir runs/gpt-tiny-4row --steps 500 --bits 4 --ranges row
    python -m train.lm --workdir runs/llama-tiny --model llama-tiny --steps 500
    python -m train.lm --workdir runs/notes --text notes/ book.txt
    python -m train.lm --workdir runs/gpt2 --model gpt2-s --seq-len 2048 --dtype bfloat16 --attention cudnn  # a GPU

Tokens are bytes (no tokenizer); whole files are held out for evaluation, which reports bits per
byte. Rerunning a command with the same --workdir resumes from its latest checkpoint.
"""

from __future__ import annotations

from mesa_jax import models
from train import cli
from train.config import LMConfig

HELP = {
    "model": "a mesa_jax.models language-model preset (gpt-tiny, gpt2-s, gpt2-m, llama-tiny, llama-100m); its "
             "vocabulary is bytes (256), a GPT's learned positions --seq-len",
    "seed": "seed of initialisation and of the training windows' offsets",
    "eval_batches": "evaluate on at most this many batches of --batch-size held-out windows (None: all of them; "
                    "the first batches are a uniform sample); each evaluation row records eval_tokens",
    "seq_len": "tokens (bytes) per training window",
    "warmup_steps": "steps of linear learning-rate warmup (at most half of --steps)",
    "text": "files or folders (recursive: every text file under them) to train on",
    "attention": "the attention core: xla (jax's; its forward materializes the T x T logits) or cudnn (cuDNN's "
                 "flash attention, NVIDIA GPUs only; mesa keeps its forward, so nothing T x T exists: the longer "
                 "sequences and larger batches of docs/language_models.md)",
}
PROG = "python -m train.lm"
PROGRAM = cli.Program(PROG, __doc__, LMConfig, HELP, {"attention": tuple(models.presets.ATTENTION)},
                      multiple=("text",),
                      default_text={"text": "the running Python's standard library, its *.py files"})


def parser():
    return cli.parser(PROGRAM)


def main(argv=None) -> int:
    """Errors a user can act on (flags, text, workdir, checkpoints, a full disk, divergence)
    end the program with one line and exit code 1 (2 for flags); Ctrl-C with one line and 130."""
    return cli.main(argv, PROGRAM)


if __name__ == "__main__":
    main()
