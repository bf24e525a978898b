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


def run(model, tokenizer, tasks: list[str], manager, num_fewshot: int | None, limit: int | None, batch_size: int,
        max_length: int, seed: int) -> dict:
    """lm-eval's results per task: each metric and its stderr (lm-eval's names without ',none')."""
    simple_evaluate, HFLM, _ = _lm_eval()
    from calora_cli.runtime import library_chatter_hidden

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    lm = HFLM(pretrained=inner, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
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
