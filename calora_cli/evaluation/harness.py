"""lm-evaluation-harness on a model calora assembled (any base kind, any adapter kind).

calora loads the model and attaches the adapter as its own eval does (LoRA, NOLA, LoSA-masked,
with recovery modules, compensated), then hands the model object to lm-eval's Hugging Face
wrapper: lm-eval sees the adapted model as one transformers model. Adapters live inside the base
model's modules (peft injects its layers, NOLA replaces linears, recovery modules hook them), so
the inner transformers model is what is handed over.

lm-eval is an optional extra (`pip install -e '.[harness]'`), imported only here. Offline by
design: a task whose data would come from a hub fails in one line naming it; local task files
(`--harness-include recipes/tasks`) read the shipped data from disk.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

from calora_cli.errors import CaloraError

INSTALL = "pip install -e '.[harness]' (lm-eval 0.4.13)"


def _lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise CaloraError(f"--harness needs lm-evaluation-harness, which is not installed: {INSTALL}") from None
    return simple_evaluate, HFLM, TaskManager


def check_tasks(tasks: list[str], include: Path | None):
    """The TaskManager, after checking every task is known (before any model is loaded)."""
    _, _, TaskManager = _lm_eval()
    if include is not None and not Path(include).is_dir():
        raise CaloraError(f"--harness-include {include} is not a directory")
    from calora_cli.runtime import library_chatter_hidden

    manager = None
    if include is not None:  # the local folder alone first: indexing lm-eval's own thousands of tasks takes seconds
        with library_chatter_hidden():
            manager = TaskManager(include_path=str(include), include_defaults=False)
    if manager is None or any(t not in manager.all_tasks for t in tasks):
        with library_chatter_hidden():
            manager = TaskManager(include_path=str(include) if include else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise CaloraError(f"unknown --harness task {unknown[0]!r}"
                          + ("" if include else " (local tasks need --harness-include DIR, e.g. recipes/tasks)"))
    return manager


def resident_lm(model, tokenizer, batch_size: int, max_length: int):
    """lm-eval's own Hugging Face wrapper around the assembled model."""
    _, HFLM, _ = _lm_eval()
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return HFLM(pretrained=inner, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)


def score_continuations(pairs: list[tuple[list[int], list[int]]], logits_for: Callable, batch_size: int,
                        max_length: int) -> list[tuple[float, bool]]:
    """(summed log-prob, greedy) of each continuation after its context, as lm-eval's HFLM scores
    it: the input is (context + continuation) cut to max_length + 1 tokens from the left, less its
    last token, right-padded with 0 and no attention mask (a causal model's real positions do not
    see the padding), longest first in batches. `logits_for(batches)` yields (batch index, logits)
    for every batch: all of them in one streamed pass."""
    import torch

    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    batches, plan = [], []
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        inputs = [(pairs[i][0] + pairs[i][1])[-(max_length + 1):][:-1] for i in rows]
        x = torch.zeros((len(rows), max(map(len, inputs))), dtype=torch.long)  # [batch, longest input]
        for r, ids in enumerate(inputs):
            x[r, :len(ids)] = torch.tensor(ids)
        batches.append({"input_ids": x})
        plan.append((rows, [len(ids) for ids in inputs]))
    out: list = [None] * len(pairs)
    for k, logits in logits_for(batches):
        logp = torch.log_softmax(logits.float(), dim=-1)  # [batch, seq, vocab]
        for r, (i, n) in enumerate(zip(*plan[k])):
            cont = torch.tensor(pairs[i][1])
            lp = logp[r, n - len(cont):n]  # the positions that predict the continuation
            out[i] = (float(lp.gather(-1, cont[:, None]).sum()), bool((lp.argmax(-1) == cont).all()))
    return out


def streamed_lm(logits_for: Callable, tokenizer, batch_size: int, max_length: int):
    """An lm-eval model for a model read one decoder layer at a time: each of lm-eval's calls
    (all of a task's requests) is one pass over the layers (`logits_for`). Tokenizing, empty
    contexts and rolling windows are lm-eval's own (TemplateLM, its window helpers); the scoring
    is HFLM's. Generation would need a pass per generated token, so it is refused."""
    _lm_eval()
    from lm_eval import utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.models.utils import has_bos_prefix

    class StreamedLM(TemplateLM):
        backend = "causal"

        def __init__(self):
            super().__init__()
            self.tokenizer = tokenizer

        @property
        def eot_token_id(self) -> int:
            return tokenizer.eos_token_id

        @property
        def prefix_token_id(self) -> int:
            return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
            special = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
            if add_special_tokens is None and has_bos_prefix(string, tokenizer.decode(self.prefix_token_id)):
                special = {"add_special_tokens": False}
            return tokenizer.encode(string, **special)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
            return score_continuations([(ctx, cont) for _, ctx, cont in requests], logits_for, batch_size, max_length)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            windows, owner = [], []
            for i, req in enumerate(requests):
                for ctx, cont in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                        token_list=self.tok_encode(req.args[0]), prefix_token=self.prefix_token_id,
                        max_seq_len=max_length, context_len=1)):
                    windows.append((ctx, cont))
                    owner.append(i)
            totals = [0.0] * len(requests)
            for i, (lp, _) in zip(owner, score_continuations(windows, logits_for, batch_size, max_length)):
                totals[i] += lp
            return totals

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            task = next((r.task_name for r in requests if getattr(r, "task_name", None)), "this task")
            raise CaloraError(f"--harness task {task} generates text, which a streamed model cannot do (a pass over "
                              "every layer per token): evaluate it without --stream, on a machine that holds the model")

    return StreamedLM()


def run(lm, tasks: list[str], manager, num_fewshot: int | None, limit: int | None, seed: int) -> dict:
    """lm-eval's results per task: each metric and its stderr (lm-eval's names without ',none')."""
    simple_evaluate, _, _ = _lm_eval()
    from calora_cli.runtime import library_chatter_hidden

    results = {}
    for task in tasks:  # one at a time, so the task whose data cannot be had is the one named
        try:
            with library_chatter_hidden():
                out = simple_evaluate(model=lm, tasks=[task], num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                                      log_samples=False, random_seed=seed, numpy_random_seed=seed,
                                      torch_random_seed=seed, fewshot_random_seed=seed, bootstrap_iters=1000)
        except (OSError, ConnectionError, FileNotFoundError, ValueError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise CaloraError(f"--harness task {task}: cannot load its data offline ({first})") from None
        except Exception as e:  # datasets' hub errors have their own types; name them, in one line
            if "hub" in type(e).__module__ or "datasets" in type(e).__module__ or "offline" in str(e).lower():
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise CaloraError(f"--harness task {task}: cannot load its data offline ({first})") from None
            raise
        for name, metrics in (out or {}).get("results", {}).items():
            clean = {}
            for key, value in metrics.items():
                if key == "alias" or not isinstance(value, (int, float)):
                    continue
                metric = key.split(",")[0]
                clean[metric] = None if isinstance(value, float) and math.isnan(value) else value
            n = clean.pop("sample_len", None)
            clean["n"] = (out.get("n-samples", {}).get(name) or {}).get("effective", n)
            results[name] = clean
    return results
