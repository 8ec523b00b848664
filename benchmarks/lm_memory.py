"""Peak memory of one causal-LM training step against the sequence length, compiled not run.

    python -m benchmarks.lm_memory                     # gpt2-s, bfloat16, batch 8, sequences 1024 2048 4096
    python -m benchmarks.lm_memory --targets cpu h100 --no-search      # + XLA:GPU's plan for an H100
    python -m benchmarks.lm_memory --targets h100 --only-search        # the longest sequence at batch 8 and
                                                                       # the largest batch at 2048 that fit
    python -m benchmarks.lm_memory --models gpt-tiny --seqs 64 128 --batches 2 --no-search   # a quick look

The step is train.lm's (loop.lm_train_step: next-token cross-entropy, backward, AdamW) on windows
of ``seq + 1`` tokens of the preset's own vocabulary (GPT-2's 50,257), a GPT's learned positions
sized to the sequence. Methods: ``baseline`` (jax.nn.dot_product_attention, XLA's: the
probabilities kept, T x T per head), ``flash_like`` (that attention core under jax.checkpoint: its
backward recomputes them from q, k, v, as flash attention does), ``cudnn`` (jax's cuDNN flash
attention; on a GPU target only, see ``assumed_cudnn``), ``remat`` (each block under jax.checkpoint, nothing saved),
``mesa8`` (int8, a group per head), ``mesa8_cudnn`` (mesa8 whose attention forward is cuDNN's: no
T x T logits in the forward either), ``mesa4_row`` (int4 with row ranges), ``mesa4_row_cudnn`` (that
with cuDNN's forward). For each: the
compile-time peak per target (``--targets``, as benchmarks.memory), its ratio to the baseline's,
the bytes autodiff keeps in all, and per token in each block and in the rest (embedding, head,
loss), from the model traced with one block and with two, at the batch and twice it. Then the searches under the target's
memory (``--budget-gib``): the longest sequence (a multiple of 256) at ``--search-batch`` and
the largest batch (a multiple of 8) at ``--search-seq``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import sys
import time

import jax
import jax.numpy as jnp

from benchmarks import memory as memory_bench, step_memory
from mesa_jax import memory, models, plan, policy
from train import loop

METHODS = ("baseline", "flash_like", "cudnn", "remat", "mesa8", "mesa8_cudnn", "mesa4_row", "mesa4_row_cudnn")
DEFAULT_METHODS = ("baseline", "flash_like", "remat", "mesa8", "mesa4_row")


def recomputed_attention(q, k, v, *args, **kwargs):
    """jax.nn.dot_product_attention under jax.checkpoint: what flash attention keeps (q, k, v and
    the output), without its speed."""
    return jax.checkpoint(functools.partial(jax.nn.dot_product_attention, **kwargs))(q, k, v, *args)


@contextlib.contextmanager
def assumed_cudnn(version: int | None):
    """Plan cuDNN attention without cuDNN: jax reads the installed cuDNN's version (through the CUDA
    plugin, which needs the library) before it lowers its attention, and reads nothing else of it;
    XLA:GPU then compiles the cuDNN calls for a description without a GPU, with no workspace (u8[0]:
    sizing one needs cuDNN), so such a plan understates the real peak by cuDNN's workspace."""
    if version is None:
        yield
        return
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention_module

    checked = cudnn_attention_module.check_cudnn_version
    cudnn_attention_module.check_cudnn_version = lambda: version
    try:
        yield
    finally:
        cudnn_attention_module.check_cudnn_version = checked


def build(name: str, method: str, dtype=None, seq: int | None = None, **overrides):
    """The model a method trains; a GPT's positions grown to ``seq`` where the preset has fewer."""
    fields = dict(overrides)
    if seq is not None and models.preset(name).get("max_len", seq) < seq:
        fields["max_len"] = seq
    if method == "flash_like":
        fields["attention_fn"] = recomputed_attention
    elif method.endswith("cudnn"):
        fields["attention_fn"] = models.presets.ATTENTION["cudnn"]
    elif method == "remat":
        fields["remat"] = "nothing_saveable"
    per_head = models.presets.per_head(models.preset(name))
    int4_row = policy.int4_row_ranges(per_head.num_groups)
    quant = {"mesa8": per_head, "mesa4_row": int4_row}.get(method.removesuffix("_cudnn"))
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {METHODS}")
    return models.create(name, quant=quant, dtype=dtype, **fields)


def step_args(model, batch: int, seq: int):
    """(state, windows) of train.lm's step, as ShapeDtypeStructs."""
    state = jax.eval_shape(functools.partial(loop.create_state, model, step_memory.TX, 0, (seq,), jnp.int32))
    return state, jax.ShapeDtypeStruct((batch, seq + 1), jnp.uint8)


def compile_step(model, batch: int, seq: int, target=None, dump_to: str | None = None) -> memory.ProgramReport:
    step = jax.jit(loop.lm_train_step, donate_argnums=0)
    return memory.compiled_report(step, *step_args(model, batch, seq), target=target, dump_to=dump_to)


def residual_bytes(model, batch: int, seq: int) -> int:
    """The bytes autodiff keeps for the backward pass of the step's loss (traced, not compiled)."""
    state, windows = step_args(model, batch, seq)

    def loss(params, mesa, windows):
        tokens = windows.astype(jnp.int32)
        hidden, _ = model.apply({"params": params, **({"mesa": mesa} if mesa else {})}, tokens[:, :-1], train=True,
                                head=False, mutable=["mesa"], rngs={"dropout": jax.random.key(0)})
        return loop.next_token_losses(loop.head(model.apply, params), hidden, tokens[:, 1:]).mean()

    kept = memory.saved_residuals(loss, state.params, state.mesa, windows)
    return sum(r.nbytes for r in kept if "argument" not in r.source)


@dataclasses.dataclass(frozen=True)
class Residuals:
    total: int  # bytes, the whole model at the row's batch
    per_block_token: float  # bytes per token in each block
    rest_token: float  # bytes per token outside the blocks: embedding, final norm, head, loss


def residuals(name: str, method: str, dtype, batch: int, seq: int) -> Residuals:
    """Per token: what the model with one block and with two keeps more at batch 2B than at B, so
    what does not grow with the tokens (bfloat16 copies of the weights, masks) is not counted."""
    kept = lambda depth, b: residual_bytes(build(name, method, dtype, seq, depth=depth), b, seq)
    (one, two), (one_2b, two_2b) = ((kept(1, b), kept(2, b)) for b in (batch, 2 * batch))
    tokens = batch * seq  # the tokens batch 2B has more
    per_block = (two_2b - one_2b - two + one) / tokens
    total = residual_bytes(build(name, method, dtype, seq), batch, seq)
    return Residuals(total, per_block, (one_2b - one) / tokens - per_block)


def rows(names, dtypes, seqs, batches, methods, targets):
    """(name, dtype, seq, batch, method, StepMemory, Residuals or None) for every combination,
    baseline first; a method a target cannot compile (cuDNN on a CPU) has no report there."""
    for name in names:
        for dtype in dtypes:
            for seq in seqs:
                for batch in batches:
                    for method in methods:
                        model = build(name, method, memory_bench.DTYPES[dtype], seq)
                        reports = {}
                        for target in targets:
                            try:
                                report = compile_step(model, batch, seq, target)
                            except Exception as err:  # cuDNN attention where cuDNN is not
                                print(f"  {name} {method} seq {seq}: {target.name} cannot compile it: "
                                      f"{type(err).__name__}: {str(err).splitlines()[0][:200]}", file=sys.stderr)
                                continue
                            reports[report.target] = report
                        kept = _residuals_or_none(name, method, memory_bench.DTYPES[dtype], batch, seq)
                        yield name, dtype, seq, batch, method, step_memory.StepMemory(
                            kept.total if kept else 0, reports), kept
                        jax.clear_caches()


def _residuals_or_none(name, method, dtype, batch, seq) -> Residuals | None:
    try:
        return residuals(name, method, dtype, batch, seq)
    except RuntimeError as err:  # cuDNN attention traced without cuDNN: see assumed_cudnn
        print(f"  {name} {method} seq {seq}: no residuals: {str(err).splitlines()[0][:200]}", file=sys.stderr)
        return None


def table(results) -> str:
    targets = list(dict.fromkeys(t for *_, m, _ in results for t in m.reports))
    header = "".join(f" {memory_bench.TARGET_LABELS.get(t, t + ' plan')} MiB | baseline / method |" for t in targets)
    lines = [f"| model | dtype | seq | batch | method |{header} residuals MiB | B / token / block | "
             "B / token outside blocks |",
             "|---|---|---:|---:|---|" + "---:|---:|" * len(targets) + "---:|---:|---:|"]
    baseline = {}
    for name, dtype, seq, batch, method, m, kept in results:
        if method == "baseline":
            baseline[name, dtype, seq, batch] = m
        ref = baseline.get((name, dtype, seq, batch))
        peaks = ""
        for t in targets:
            report = m.reports.get(t)
            ratio = f"{ref.reports[t].peak / report.peak:.2f}x" if ref and report and t in ref.reports else "-"
            peaks += f" {f'{report.peak / 2**20:,.0f}' if report else '-'} | {ratio} |"
        kept_text = (f"{kept.total / 2**20:,.0f} | {kept.per_block_token:,.0f} | {kept.rest_token:,.0f}" if kept
                     else "- | - | -")
        lines.append(f"| {name} | {dtype} | {seq} | {batch} | {method} |{peaks} {kept_text} |")
    return "\n".join(lines)


def searches(names, dtypes, methods, targets, budget_gib, search_batch: int, search_seq: int,
             kinds=("sequence", "batch")):
    """(name, dtype, method, target, budget bytes, what was searched, the answer): the longest
    sequence (multiple of 256) at ``search_batch``, the largest batch (multiple of 8) at
    ``search_seq`` (``kinds``: which of the two)."""
    for target in targets:
        compiled_for = memory_bench.searched(target)
        limit = memory_bench.budget(target, budget_gib)
        for name in names:
            for dtype in dtypes:
                for method in methods:
                    def peak(batch, seq):
                        began = time.perf_counter()
                        report = compile_step(build(name, method, memory_bench.DTYPES[dtype], seq), batch, seq,
                                              compiled_for)
                        print(f"  {name} {dtype} {method} batch {batch} seq {seq} on {target.name}: "
                              f"{report.peak / 2**30:.2f} GiB ({time.perf_counter() - began:.0f} s)", file=sys.stderr,
                              flush=True)
                        jax.clear_caches()
                        return report.peak

                    if "sequence" in kinds:
                        longest = memory.max_batch_size(lambda s: peak(search_batch, s), limit, start=4096,
                                                        multiple=256, limit=1 << 17)
                        yield name, dtype, method, target.name, limit, f"sequence at batch {search_batch}", longest
                    if "batch" in kinds:
                        largest = memory.max_batch_size(lambda b: peak(b, search_seq), limit, start=32, multiple=8,
                                                        limit=8192)
                        yield name, dtype, method, target.name, limit, f"batch at sequence {search_seq}", largest


def search_table(results):
    yield "| model | dtype | method | target | budget GiB | largest | fits |"
    yield "|---|---|---|---|---:|---|---:|"
    for name, dtype, method, target, limit, what, found in results:
        yield f"| {name} | {dtype} | {method} | {target} | {limit / 2**30:.1f} | {what} | {found} |"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    lms = [n for n in models.names() if models.is_language_model(n)]
    parser.add_argument("--models", nargs="+", default=["gpt2-s"], choices=lms)
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16"], choices=list(memory_bench.DTYPES))
    parser.add_argument("--seqs", nargs="+", type=int, default=[1024, 2048, 4096])
    parser.add_argument("--batches", nargs="+", type=int, default=[8])
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS)
    parser.add_argument("--targets", nargs="+", default=["cpu"], metavar="TARGET",
                        help="cpu (default), gpu, h100, h200 (XLA:GPU without a GPU: pip install -e \".[gpu-plan]\")")
    parser.add_argument("--budget-gib", default=None, metavar="GIB",
                        help="the searches' budget, in GiB or as a share of the target's memory; default: all of it")
    parser.add_argument("--search-batch", type=int, default=8, help="the longest-sequence search's batch")
    parser.add_argument("--search-seq", type=int, default=2048, help="the largest-batch search's sequence")
    parser.add_argument("--search-methods", nargs="+", default=["baseline", "flash_like", "mesa8"], choices=METHODS)
    parser.add_argument("--searches", nargs="+", default=["sequence", "batch"], choices=["sequence", "batch"],
                        help="the longest sequence at --search-batch, the largest batch at --search-seq, or both")
    parser.add_argument("--assume-cudnn", type=int, metavar="VERSION",
                        help="plan the cudnn method without cuDNN installed, as if jax had found this version "
                             "(e.g. 90800 for 9.8; see assumed_cudnn)")
    parser.add_argument("--only-search", action="store_true", help="only the searches")
    parser.add_argument("--no-search", dest="search", action="store_false", help="skip the searches")
    args = parser.parse_args(argv)
    if "baseline" not in args.methods:
        args.methods.insert(0, "baseline")
    try:
        targets = [plan.resolve(t) for t in args.targets]
    except (RuntimeError, ValueError) as e:
        parser.error(str(e))
    with assumed_cudnn(args.assume_cudnn):
        run(args, targets)


def run(args, targets) -> None:
    if not args.only_search:
        began = time.time()
        results = []
        for row in rows(args.models, args.dtypes, args.seqs, args.batches, args.methods, targets):
            results.append(row)
            print(f"  measured {row[0]} {row[1]} seq {row[2]} batch {row[3]} {row[4]}", file=sys.stderr, flush=True)
        print(f"compile-time peak of one train.lm step for {', '.join(t.name for t in targets)}; "
              f"jax {jax.__version__}, {time.time() - began:.0f} s")
        print(table(results))
        print()
        print(memory_bench.report_table([(f"{n} @{s}", d, b, meth, m, None) for n, d, s, b, meth, m, _ in results]))
    if args.search:
        found = searches(args.models, args.dtypes, args.search_methods, targets, args.budget_gib, args.search_batch,
                         args.search_seq, args.searches)
        for line in search_table(found):
            print(line, flush=True)


if __name__ == "__main__":
    main()
