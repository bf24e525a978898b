"""The command line: one thin function per command (parse, call a stage, print a summary).

Nothing heavy is imported at module level: `calora --help` must not import torch.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import functools
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from calora_cli import __version__
from calora_cli.errors import CaloraError
from calora_cli.ranks import is_writer

app = typer.Typer(
    name="calora",
    help="Move LoRA adapters onto compressed LLMs: compress a base, carry adapters over, recover, merge, evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# --- options every command shares --------------------------------------------------------------
Output = Annotated[Path, typer.Option("-o", "--output", help="Output artifact directory (written atomically).")]
Force = Annotated[bool, typer.Option("--force", help="Replace an existing output.")]
CoefBits = Annotated[int, typer.Option("--coef-bits", help="nola: store coefficients in 32, 16, 8 or 4 bits.")]
Seed = Annotated[int, typer.Option("--seed", help="Random seed: equal seeds and inputs give byte-identical outputs on CPU.")]
Device = Annotated[str, typer.Option("--device", help="cpu, or cuda[:N] when asked for.")]
Dtype = Annotated[str, typer.Option("--dtype", help="Compute dtype: float32, bfloat16 or float16.")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout and nothing else there.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or warnings.")]
Debug = Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")]
AllowMismatch = Annotated[
    bool, typer.Option("--allow-base-mismatch", help="Use an adapter even if the model does not descend from its base.")
]


# Libraries print banners to stdout (gptqmodel does on import); commands run with stdout sent to
# stderr, and only the summary goes to the real stdout, so `--json` output stays parseable.
_STDOUT: contextvars.ContextVar = contextvars.ContextVar("stdout", default=None)
def _err(msg: str) -> None:
    print(f"calora: {msg}", file=sys.stderr)


def command(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run a command body: bad input -> one line on stderr and exit 2; --debug shows tracebacks."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        from calora_cli import logs

        debug = kwargs.get("debug", False)
        if debug:
            os.environ["CALORA_DEBUG"] = "1"
        else:
            os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        logs.configure(quiet=kwargs.get("quiet", False), debug=debug)
        token = _STDOUT.set(sys.stdout)
        try:
            with contextlib.redirect_stdout(sys.stderr):
                return fn(*args, **kwargs)
        except CaloraError as e:
            if debug:
                traceback.print_exc()
            _err(f"error: {e}")
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            _err("interrupted")
            raise typer.Exit(130) from None
        except typer.Exit:
            raise
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                raise
            # the output's temp dir was removed on the way out (atomic_output): nothing half-written remains
            _err(f"error: cannot write the output: {os.strerror(e.errno).lower()} ({e.filename or 'output'})")
            raise typer.Exit(2) from None
        except Exception as e:  # a bug, not bad input: say so, in one line unless --debug
            if debug:
                traceback.print_exc()
            first = (str(e).strip().splitlines() or [""])[0]
            _err(f"internal error: {type(e).__name__}: {first} (rerun with --debug for the traceback)")
            raise typer.Exit(1) from None
        finally:
            _STDOUT.reset(token)

    return run


def _bases(text: str) -> tuple[int, int]:
    try:
        kl = [int(b) for b in text.split(",")]
    except ValueError:
        raise CaloraError(f"--bases must be K or K,L (integers), got {text!r}") from None
    if len(kl) not in (1, 2):
        raise CaloraError(f"--bases must be K or K,L (integers), got {text!r}")
    return kl[0], kl[-1]


def _opts(device: str = "cpu", dtype: str = "float32", seed: int = 0, force: bool = False, quiet: bool = False, allow: bool = False):
    from calora_cli.run import RunOptions

    return RunOptions(
        device=device,
        dtype=dtype,
        seed=seed,
        force=force,
        show_progress=not quiet,
        allow_base_mismatch=allow,
    )


def _emit(summary: dict, as_json: bool) -> None:
    if not is_writer():  # one summary per distributed run, from rank 0
        return
    out = _STDOUT.get() or sys.stdout
    if as_json:
        print(json.dumps(summary, sort_keys=True, default=str), file=out, flush=True)
        return
    from rich.console import Console

    console = Console(file=out)
    for key, value in summary.items():
        if value is None or value == {}:
            continue
        if isinstance(value, dict):
            console.print(f"[bold]{key}[/bold]")
            for k, v in value.items():
                console.print(f"  {k}: {_fmt(v)}", highlight=False)
        else:
            console.print(f"[bold]{key}[/bold]: {_fmt(value)}", highlight=False)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}={_fmt(x)}" for k, x in v.items())
    return str(v)


def _version(value: bool) -> None:
    if value:
        print(f"calora {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = None,
) -> None:
    """calora: CA-LoRA, NOLA and LoSA as pipeline stages over artifacts on disk."""


# --- commands ------------------------------------------------------------------------------------


@app.command()
@command
def train(
    base: Annotated[Path, typer.Argument(help="Base model directory (Hugging Face layout).")],
    output: Output,
    data: Annotated[Path, typer.Option("--data", help="Training data: .txt (packed text) or .jsonl of {prompt, completion}.")],
    rank: Annotated[int, typer.Option("--rank", help="LoRA rank r.")] = 8,
    alpha: Annotated[Optional[float], typer.Option("--alpha", help="LoRA alpha (default 2*rank).")] = None,
    kind: Annotated[str, typer.Option("--kind", help="lora (peft), or nola (seed + k + l coefficients per module).")] = "lora",
    bases: Annotated[str, typer.Option("--bases", help="nola: K[,L] random bases for A (and B).")] = "1024",
    per_module_bases: Annotated[
        bool, typer.Option("--per-module-bases", help="nola: one basis set per module instead of one per module type.")
    ] = False,
    coef_bits: CoefBits = 32,
    targets: Annotated[
        Optional[str], typer.Option("--targets", help="Comma list of module names (default: every linear of attention and MLP).")
    ] = None,
    steps: Annotated[int, typer.Option("--steps")] = 200,
    lr: Annotated[float, typer.Option("--lr")] = 1e-3,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 8,
    seq_len: Annotated[int, typer.Option("--seq-len")] = 256,
    seed: Seed = 0,
    device: Device = "cpu",
    dtype: Dtype = "float32",
    force: Force = False,
    json_: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Fine-tune a plain LoRA (peft) on a base model: the baseline, and the source of existing LoRAs."""
    from calora_cli.stages.finetune import train_lora
    from calora_cli.train import TrainConfig

    cfg = TrainConfig(steps=steps, lr=lr, batch_size=batch_size, seq_len=seq_len, seed=seed)
    tlist = [t.strip() for t in targets.split(",") if t.strip()] if targets else None
    summary = train_lora(base, data, output, cfg, _opts(device, dtype, seed, force, quiet), rank=rank, alpha=alpha,
                         targets=tlist, kind=kind, bases=_bases(bases), shared_bases=not per_module_bases, coef_bits=coef_bits)
    _emit(summary, json_)


@app.command("eval")
@command
def eval_(
    model: Annotated[Path, typer.Argument(help="Model directory (dense, pruned, quantized or GGUF).")],
    adapter: Annotated[Optional[list[Path]], typer.Option("--adapter", help="Adapter directory to attach (with --engine "
                       "llama.cpp: repeatable, all applied at once, or llama.cpp LoRA .gguf files).")] = None,
    engine: Annotated[str, typer.Option("--engine", help="torch (calora's own), or llama.cpp: a GGUF model scored by "
                      "llama.cpp's forward pass and tokenizer, what a device running it computes.")] = "torch",
    ppl: Annotated[Optional[Path], typer.Option("--ppl", help="Text file for perplexity.")] = None,
    tasks: Annotated[
        Optional[list[Path]], typer.Option("--tasks", help="Multiple-choice JSONL {context, choices, label}; repeatable.")
    ] = None,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Window length for perplexity; max length for tasks.")] = 512,
    stride: Annotated[Optional[int], typer.Option("--stride", help="Overlapping windows every STRIDE tokens (off by default).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 4,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Score only the first N items of each task.")] = None,
    harness: Annotated[Optional[str], typer.Option("--harness", help="lm-evaluation-harness tasks, comma-separated "
                       "(needs the [harness] extra); e.g. socialiqa_local with --harness-include recipes/tasks.")] = None,
    harness_include: Annotated[Optional[Path], typer.Option("--harness-include", help="A folder of lm-eval task "
                               "YAML files (recipes/tasks: the shipped items, offline).")] = None,
    num_fewshot: Annotated[Optional[int], typer.Option("--num-fewshot", help="--harness: few-shot examples per item.")] = None,
    stream: Annotated[Optional[bool], typer.Option("--stream/--no-stream", help="Read the model one decoder layer at a "
                      "time (default: when it would take more than half the free memory).")] = None,
    activation_memory: Annotated[float, typer.Option("--activation-memory", help="--stream: GB of hidden states kept in "
                                 "memory between layers; beyond it they spill to a temporary folder.")] = 2.0,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Also write the results JSON to this file.")] = None,
    allow_base_mismatch: AllowMismatch = False,
    seed: Seed = 0,
    device: Device = "cpu",
    dtype: Dtype = "float32",
    force: Force = False,
    json_: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Perplexity (and bits per byte) on text, multiple-choice accuracy (acc, acc_norm), lm-eval tasks; optionally with an adapter."""
    from calora_cli.artifacts import check_output
    from calora_cli.stages.evaluate import evaluate

    if output is not None:
        check_output(output, force)
    if harness_include is not None and not harness:
        raise CaloraError("--harness-include goes with --harness TASKS")
    adapter = adapter or []
    result = evaluate(
        model,
        _opts(device, dtype, seed, force, quiet, allow_base_mismatch),
        adapter=adapter[0] if adapter else None,
        more_adapters=adapter[1:],
        engine=engine,
        ppl_file=ppl,
        task_files=tasks,
        seq_len=seq_len,
        stride=stride,
        batch_size=batch_size,
        limit=limit,
        harness=[t.strip() for t in harness.split(",") if t.strip()] if harness else None,
        harness_include=harness_include,
        num_fewshot=num_fewshot,
        stream=stream,
        activation_gb=activation_memory,
    )
    if output is not None:
        from calora_cli.artifacts import write_json_atomic

        write_json_atomic(output, result)
    if json_ or "harness" not in result:
        _emit(result, json_)
        return
    _emit({k: v for k, v in result.items() if k != "harness"}, False)
    if is_writer():
        _harness_table(result["harness"])


def _harness_table(results: dict) -> None:
    """lm-eval's results as the harness prints them: a row per task and metric, value and stderr."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="lm-evaluation-harness", title_justify="left")
    for col in ("task", "metric", "value", "stderr", "n"):
        table.add_column(col, justify="right" if col in ("value", "stderr", "n") else "left")
    for task, metrics in results.items():
        for name, value in metrics.items():
            if name == "n" or name.endswith("_stderr"):
                continue
            err = metrics.get(f"{name}_stderr")
            table.add_row(task, name, _fmt(value), "" if err is None else f"± {_fmt(err)}", str(metrics.get("n") or ""))
    Console(file=_STDOUT.get() or sys.stdout).print(table, highlight=False)


@app.command()
@command
def info(
    artifact: Annotated[Path, typer.Argument(help="A model or adapter directory.")],
    verify: Annotated[bool, typer.Option("--verify", help="Hash every file and compare with the manifest.")] = False,
    json_: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Show an artifact: kind, lineage, sizes, parameters, sparsity, quantization."""
    from calora_cli.stages.info import describe, summary_rows

    result = describe(artifact, check=verify)
    if json_:
        _emit(result, True)
    elif is_writer():
        from rich.console import Console
        from rich.table import Table

        table = Table(show_header=False, box=None, pad_edge=False)
        table.add_column(style="bold", no_wrap=True)
        table.add_column(overflow="fold")
        for label, text in summary_rows(result):
            table.add_row(label, text)
        Console(file=_STDOUT.get() or sys.stdout).print(table, highlight=False)
    if verify and not result["verify"]["ok"]:
        raise CaloraError(f"{artifact} failed verification: {'; '.join(result['verify']['problems'])}")


@app.command()
@command
def compress(
    model: Annotated[Path, typer.Argument(help="Model directory (Hugging Face layout).")],
    output: Output,
    method: Annotated[str, typer.Option("--method", help="gptq, rtn-int8, nf4 (quantize); magnitude, wanda, sparsegpt (prune); "
                                        "gguf (llama.cpp's format and quantizer, --gguf-type); "
                                        "nola (a LoRA into NOLA); expand (a NOLA adapter into a plain peft LoRA).")],
    gguf_type: Annotated[Optional[str], typer.Option("--gguf-type", help="gguf: Q4_K_M, Q4_0, Q8_0, ... or F16/BF16/F32 "
                         "(with --calib, an importance matrix guides llama.cpp's quantizer).")] = None,
    solver: Annotated[str, typer.Option("--solver", help="gguf: llama.cpp (its quantizer's codes) or gptq (llama.cpp's "
                      "scales and mins, codes chosen by GPTQ's error feedback; needs --calib).")] = "llama.cpp",
    sparsity: Annotated[Optional[float], typer.Option("--sparsity", help="Pruning: fraction of zeros in (0, 1).")] = None,
    pattern: Annotated[str, typer.Option("--pattern", help="Pruning: unstructured, or N:M (N kept in every M inputs, e.g. 2:4).")] = "unstructured",
    allocation: Annotated[
        str, typer.Option("--allocation", help="Pruning: uniform rates, or rmi (LoSA's per-layer rates from representation similarity).")
    ] = "uniform",
    rmi_delta: Annotated[Optional[float], typer.Option("--rmi-delta", help="rmi: rates lie in sparsity +- delta (default 0.01-0.03 by sparsity).")] = None,
    then: Annotated[Optional[str], typer.Option("--then", help="After pruning, quantize: gptq.")] = None,
    bits: Annotated[int, typer.Option("--bits", help="GPTQ bits: 4 or 8.")] = 4,
    group_size: Annotated[int, typer.Option("--group-size", help="GPTQ group size: 32, 64, 128 or 256, dividing every linear's input features.")] = 128,
    calib: Annotated[Optional[Path], typer.Option("--calib", help="Calibration text (needed by wanda, sparsegpt, gptq, rmi).")] = None,
    calib_samples: Annotated[int, typer.Option("--calib-samples", help="Calibration windows drawn from --calib.")] = 32,
    activation_memory: Annotated[float, typer.Option("--activation-memory", help="Pruning, GPTQ, gguf --solver gptq: GB of calibration activations "
                                 "kept in memory between layers; beyond it they spill to the output's temp dir.")] = 2.0,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per calibration window (nola: per training sequence).")] = 256,
    bases: Annotated[str, typer.Option("--bases", help="nola: K[,L] random bases for A (and B).")] = "1024",
    data: Annotated[Optional[Path], typer.Option("--data", help="nola: text to distill the LoRA's behaviour on.")] = None,
    base: Annotated[Optional[Path], typer.Option("--base", help="nola: the LoRA's base model (default: as recorded).")] = None,
    steps: Annotated[int, typer.Option("--steps", help="nola: distillation steps (0: the weight fit alone).")] = 200,
    lr: Annotated[float, typer.Option("--lr", help="nola: learning rate of the coefficients.")] = 1e-2,
    batch_size: Annotated[int, typer.Option("--batch-size", help="nola: batch size.")] = 8,
    distill: Annotated[str, typer.Option("--distill", help="nola: match logits (KL), hidden states (MSE), or both.")] = "logits",
    init: Annotated[str, typer.Option("--init", help="nola: start from the weight fit (als) or from zero.")] = "als",
    coef_bits: CoefBits = 32,
    seed: Seed = 0,
    device: Device = "cpu",
    dtype: Dtype = "float32",
    force: Force = False,
    json_: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Compress a base model block by block (GPTQ, NF4/int8, magnitude/Wanda/SparseGPT), or a LoRA into NOLA (--method nola)."""
    if method == "expand":
        from calora_cli.methods.nola.compress import expand_nola

        _emit(expand_nola(model, output, _opts(force=force, quiet=quiet)), json_)
        return
    if method == "nola":
        from calora_cli.methods.nola.compress import NolaSpec, compress_lora
        from calora_cli.train import TrainConfig

        if data is None:
            raise CaloraError("--method nola distills the LoRA on text: pass --data FILE")
        cfg = TrainConfig(steps=max(steps, 1), lr=lr, batch_size=batch_size, seq_len=seq_len, seed=seed)
        spec = NolaSpec(bases=_bases(bases), distill=distill, init=init, coef_bits=coef_bits, steps=steps)
        _emit(compress_lora(model, output, data, cfg, spec, _opts(device, dtype, seed, force, quiet), base=base), json_)
        return
    from calora_cli.stages.compress import CompressSpec, compress_model

    spec = CompressSpec(
        method=method, sparsity=sparsity, pattern=pattern, allocation=allocation, rmi_delta=rmi_delta, bits=bits,
        group_size=group_size, calib=calib, calib_samples=calib_samples, seq_len=seq_len, then=then,
        activation_gb=activation_memory, gguf_type=gguf_type.upper() if gguf_type else None, solver=solver,
    )
    _emit(compress_model(model, output, spec, _opts(device, dtype, seed, force, quiet)), json_)


@app.command()
@command
def export(
    model: Annotated[Path, typer.Argument(help="The base: a model (dense, pruned) or a GGUF model artifact.")],
    output: Output,
    adapter: Annotated[Optional[list[Path]], typer.Option("--adapter", help="An adapter to export beside the base; "
                       "repeatable (llama.cpp applies several at once, or switches them per request).")] = None,
    fmt: Annotated[str, typer.Option("--format", help="gguf (llama.cpp, Ollama, LM Studio).")] = "gguf",
    gguf_type: Annotated[Optional[str], typer.Option("--gguf-type", help="Quantize the base with llama.cpp's quantizer "
                         "(Q4_K_M, Q4_0, ...; default: the checkpoint's own float type).")] = None,
    requantize: Annotated[Optional[str], typer.Option("--requantize", help="A GPTQ model not on Q4_0/Q4_1's grid "
                          "(4-bit, groups of 32, no act-order): quantize it again with llama.cpp into TYPE.")] = None,
    allow_base_mismatch: AllowMismatch = False,
    force: Force = False,
    json_: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Export a base and its adapters for another runtime: llama.cpp's GGUF (the base, and each
    adapter as a llama.cpp LoRA), with the llama.cpp command lines that serve them."""
    from calora_cli.stages.export import export as run

    opts = _opts(force=force, quiet=quiet, allow=allow_base_mismatch)
    summary = run(model, adapter or [], output, fmt, opts, gguf_type.upper() if gguf_type else None,
                  requantize.upper() if requantize else None)
    _emit(summary, json_)


@app.command()
@command
def inherit(
    output: Output,
    adapter: Annotated[Optional[Path], typer.Argument(help="The existing LoRA, trained on the uncompressed model "
                       "(left out with --compensate: the base's own compensation, an adapter applied beside any task's).")] = None,
    base: Annotated[Optional[Path], typer.Option("--base", help="The compressed model (GPTQ, NF4/int8, pruned or GGUF).")] = None,
    compensate: Annotated[Optional[int], typer.Option("--compensate", help="Add a rank-R compensation of the "
                          "compression error (EoRA-style, no training), in the same peft LoRA.")] = None,
    teacher: Annotated[Optional[Path], typer.Option("--teacher", help="The uncompressed model: for --compensate; "
                       "alone, on an AWQ base, carries the LoRA into AWQ's rescaled channels.")] = None,
    calib: Annotated[Optional[Path], typer.Option("--calib", help="--compensate: calibration text.")] = None,
    calib_samples: Annotated[int, typer.Option("--calib-samples", help="--compensate: calibration windows.")] = 32,
    seq_len: Annotated[int, typer.Option("--seq-len", help="--compensate: tokens per calibration window.")] = 256,
    compensate_space: Annotated[str, typer.Option("--compensate-space", help="eigen (the inputs' eigenspace, as EoRA) "
                                "or plain (SVD of the weight error, the ablation).")] = "eigen",
    compensate_all: Annotated[bool, typer.Option("--compensate-all", help="Compensate every linear of every block, "
                              "not only the adapted ones.")] = False,
    allow_base_mismatch: AllowMismatch = False,
    seed: Seed = 0,
    device: Device = "cpu",
    dtype: Dtype = "float32",
    force: Force = False,
    json_: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """CA-LoRA knowledge inheritance: carry an existing LoRA's A and B onto a compressed model (with
    --compensate, plus a training-free low-rank compensation of what compression removed)."""
    from calora_cli.methods.ca_lora.inherit import inherit as run
    from calora_cli.methods.ca_lora.transfer import CompensateSpec

    if base is None:
        raise CaloraError("inherit needs the compressed model: pass --base COMPRESSED")
    spec = None
    if compensate is not None:
        spec = CompensateSpec(compensate, teacher, calib, calib_samples, seq_len, compensate_space, compensate_all)
    elif calib is not None or compensate_all:
        raise CaloraError("--calib and --compensate-all go with --compensate RANK")
    _emit(run(adapter, base, output, _opts(device, dtype, seed, force, quiet, allow_base_mismatch), spec,
              teacher=teacher if spec is None else None), json_)


@app.command()
@command
def recover(
    adapter: Annotated[Path, typer.Argument(help="The inherited adapter (calora inherit).")],
    base: Annotated[Path, typer.Option("--base", help="The compressed model.")],
    teacher: Annotated[Path, typer.Option("--teacher", help="The uncompressed model.")],
    teacher_adapter: Annotated[Path, typer.Option("--teacher-adapter", help="The original LoRA, on the teacher.")],
    data: Annotated[Path, typer.Option("--data", help="Training text (.txt) or {prompt, completion} JSONL.")],
    output: Output,
    steps: Annotated[int, typer.Option("--steps")] = 200,
    lr: Annotated[float, typer.Option("--lr")] = 1e-3,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 8,
    seq_len: Annotated[int, typer.Option("--seq-len")] = 256,
    distill: Annotated[str, typer.Option("--distill", help="hidden (final hidden-state MSE, as CA-LoRA), logits (KL), or both.")] = "hidden",
    distill_weight: Annotated[float, typer.Option("--distill-weight", help="beta: loss = CE + beta * distillation.")] = 1.0,
    temperature: Annotated[float, typer.Option("--temperature", help="Softmax temperature of the logit KL.")] = 1.0,
    recovery_dim: Annotated[
        Optional[int], typer.Option("--recovery-dim", help="Recovery module rank (default: the LoRA rank; 0: none, inheritance only).")
    ] = None,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", help="Save a resumable state every N steps in OUT.ckpt/.")] = 50,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT.ckpt/ of an interrupted run.")] = False,
    cache_teacher: Annotated[
        bool, typer.Option("--cache-teacher", help="Compute the teacher's outputs once for all examples (refused if they "
                           "would not fit in memory) instead of at every step.")
    ] = False,
    allow_base_mismatch: AllowMismatch = False,
    seed: Seed = 0,
    device: Device = "cpu",
    dtype: Dtype = "float32",
    force: Force = False,
    json_: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """CA-LoRA knowledge recovery: train the inherited LoRA + recovery modules by distillation from the teacher."""
    from calora_cli.methods.ca_lora.recover import RecoverSpec
    from calora_cli.methods.ca_lora.recover import recover as run
    from calora_cli.train import TrainConfig

    cfg = TrainConfig(steps=steps, lr=lr, batch_size=batch_size, seq_len=seq_len, seed=seed)
    spec = RecoverSpec(distill, distill_weight, temperature, recovery_dim, checkpoint_every, resume, cache_teacher)
    opts = _opts(device, dtype, seed, force, quiet, allow_base_mismatch)
    _emit(run(adapter, base, teacher, teacher_adapter, data, output, cfg, spec, opts), json_)


@app.command("sparsify-adapter")
@command
def sparsify_adapter(
    adapter: Annotated[Path, typer.Argument(help="A LoRA adapter (trained on the dense model).")],
    base: Annotated[Path, typer.Option("--base", help="The sparse (pruned) base model.")],
    output: Output,
    data: Annotated[Optional[Path], typer.Option("--data", help="Fine-tune masked (LoSA) on this text or JSONL.")] = None,
    steps: Annotated[int, typer.Option("--steps")] = 100,
    lr: Annotated[float, typer.Option("--lr")] = 1e-3,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 8,
    seq_len: Annotated[int, typer.Option("--seq-len")] = 256,
    rank_allocation: Annotated[
        str, typer.Option("--rank-allocation", help="uniform: keep the adapter's rank; error: per-block ranks from the "
                          "block's dense-vs-sparse output error, same total rank (needs --data).")
    ] = "uniform",
    max_rank: Annotated[Optional[int], typer.Option("--max-rank", help="Cap for allocated ranks (default: twice the adapter's).")] = None,
    distill_from: Annotated[
        Optional[Path], typer.Option("--distill-from", help="The dense model the adapter was trained on: distil from it + the adapter.")
    ] = None,
    distill: Annotated[str, typer.Option("--distill", help="hidden (final hidden-state MSE), logits (KL) or both.")] = "hidden",
    distill_weight: Annotated[float, typer.Option("--distill-weight", help="Weight of the distillation term.")] = 1.0,
    temperature: Annotated[float, typer.Option("--temperature", help="Logit distillation temperature.")] = 1.0,
    cache_teacher: Annotated[
        bool, typer.Option("--cache-teacher", help="With --distill-from: the teacher's outputs for all examples from one "
                           "pass reading it layer by layer (never resident; refused if they would not fit in memory).")
    ] = False,
    allow_base_mismatch: AllowMismatch = False,
    seed: Seed = 0,
    device: Device = "cpu",
    dtype: Dtype = "float32",
    force: Force = False,
    json_: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """LoSA: mask an adapter's delta to a sparse base's non-zeros (with --data: fine-tune it masked), so it merges without filling zeros."""
    from calora_cli.distill import DistillSpec
    from calora_cli.methods.losa.sparsify import LosaSpec
    from calora_cli.methods.losa.sparsify import sparsify_adapter as run
    from calora_cli.train import TrainConfig

    cfg = TrainConfig(steps=steps, lr=lr, batch_size=batch_size, seq_len=seq_len, seed=seed) if data else None
    losa = LosaSpec(rank_allocation, max_rank, distill_from,
                    DistillSpec(distill=distill, distill_weight=distill_weight, temperature=temperature), cache_teacher)
    _emit(run(adapter, base, output, _opts(device, dtype, seed, force, quiet, allow_base_mismatch), data=data, cfg=cfg,
              losa=losa), json_)


@app.command()
@command
def merge(
    base: Annotated[Path, typer.Argument(help="Base model directory (dense or pruned).")],
    adapter: Annotated[list[Path], typer.Option("--adapter", help="Adapter to fold in; repeatable.")],
    output: Output,
    weights: Annotated[Optional[str], typer.Option("--weights", help="Comma list, one weight per adapter (default 1 each).")] = None,
    keep_sparsity: Annotated[
        bool, typer.Option("--keep-sparsity", help="Mask the deltas with the base's non-zeros (automatic for sparsified adapters).")
    ] = False,
    dense: Annotated[
        bool, typer.Option("--dense", help="GPTQ base: write the merged model unquantized instead of re-quantizing it.")
    ] = False,
    grid: Annotated[
        str, typer.Option("--grid", help="GPTQ base: re-quantize onto a fresh per-group grid, or keep each layer's scales "
                          "and zero points (small deltas then round away).")
    ] = "fresh",
    allow_base_mismatch: AllowMismatch = False,
    force: Force = False,
    json_: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Fold adapters into a base, one tensor at a time: W + sum_k w_k s_k B_k A_k (masked to the base's zeros with --keep-sparsity).

    GPTQ bases: each adapted layer is dequantized, merged and re-quantized (round-to-nearest, same bits and groups)."""
    from calora_cli.merge import merge as run

    wlist = None
    if weights is not None:
        try:
            wlist = [float(w) for w in weights.split(",")]
        except ValueError:
            raise CaloraError(f"--weights must be a comma list of numbers, got {weights!r}") from None
    _emit(run(base, adapter, output, _opts(force=force, quiet=quiet, allow=allow_base_mismatch), weights=wlist, keep_sparsity=keep_sparsity,
              dense=dense, grid=grid), json_)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
