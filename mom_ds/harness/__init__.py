"""EleutherAI's lm-evaluation-harness on a mom-train checkpoint (`mom-eval RUN --tasks ...`):
the `lm_eval` package, installed by the optional extra `mom-ds[eval]`."""
from __future__ import annotations

import importlib.util
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..files import write_text
from ..model import ConfigError


@dataclass
class HarnessRequest:
    """What mom-eval --tasks asks of the harness."""

    checkpoint: str
    tasks: list[str]
    limit: Optional[float] = None
    num_fewshot: Optional[int] = None
    batch_size: int = 8
    include_paths: list[str] = field(default_factory=list)
    output: Optional[str] = None
    device: str = "cpu"
    depth: Optional[int] = None   # H' and K': compute chosen at inference (checkpoints/loading.py)
    top_k: Optional[int] = None
    allow_data_change: bool = False  # score a data directory that is not the run's
    overrides: list[str] = field(default_factory=list)  # --section.key VALUE (cli/args.py)
    # lm_eval's own default: the standard errors lm_eval prints (0: "N/A", none computed)
    bootstrap_iters: int = 100000


def require_lm_eval() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError("--tasks runs lm-evaluation-harness, which is not installed. Fix: "
                          "pip install 'mom-ds[eval]' (the lm_eval package).")


def run_harness(request: HarnessRequest) -> tuple[Path, dict[str, Any]]:
    """Evaluate the checkpoint on the tasks; (where the results JSON went, the results)."""
    require_lm_eval()
    import lm_eval
    from lm_eval.utils import handle_non_serializable

    from ..checkpoints.loading import load_model, resolve
    from ..train.run_data import check_data, run_tokenizer
    from .lm import MoMHarnessLM
    from .tasks import LOCAL_TASK, local_task, results_path, task_manager

    ckpt_dir, _ = resolve(request.checkpoint)
    run_dir = ckpt_dir.parent if ckpt_dir.name == "ckpt" else ckpt_dir
    run, model, client = load_model(request.checkpoint, request.depth, request.top_k,
                                    request.overrides)
    # mom_cloze is built from the val split: the run's data, or one the user allows
    check_data("mom-eval", request.checkpoint, run.data.fingerprint, run.data.data_dir,
               request.allow_data_change)
    manager = task_manager(request.tasks, [Path(p) for p in request.include_paths])
    model.to(request.device)
    tokenizer = run_tokenizer("mom-eval", request.checkpoint, run,
                              allow=request.allow_data_change)
    lm = MoMHarnessLM(model, tokenizer, request.batch_size)
    with tempfile.TemporaryDirectory(prefix="mom-eval-") as private:
        tasks: list[str | dict] = [
            local_task(Path(private), run.data.data_dir, run.data.seq_len)
            if t == LOCAL_TASK else t for t in request.tasks]
        try:
            results = lm_eval.simple_evaluate(model=lm, tasks=tasks,
                                              num_fewshot=request.num_fewshot,
                                              limit=request.limit, task_manager=manager,
                                              log_samples=False,
                                              bootstrap_iters=request.bootstrap_iters)
        except OSError as err:  # datasets' ConnectionError when a hub task's data cannot be had
            raise ConfigError(f"--tasks {','.join(request.tasks)}: a task's data could not be "
                              f"read ({err}). Fix: run where the Hugging Face hub is reachable "
                              f"(or its datasets are cached), or use {LOCAL_TASK} or a task "
                              f"YAML over local files (--include-path).") from None
    results["mom_ds"] = {"checkpoint": str(request.checkpoint), "step": int(client["step"]),
                         "model": run.model.to_dict()}
    out = results_path(run_dir, request.tasks, int(client["step"]), request.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, json.dumps(results, indent=2, default=handle_non_serializable))
    return out, results
