"""A training step at E = 1 makes no device-to-host sync of mom-ds's own: mom-train runs under
mom_ds_testing/sync_guard.py (the grouped-GEMM path forced, as CUDA takes it) and every read
is counted by the code that made it, step by step. A step that logs, evaluates or saves
nothing reads only where DeepSpeed itself does; a logging step adds exactly one read (its
numbers and its health check, copied to the host together)."""
from __future__ import annotations

import json

import pytest

from mom_ds_testing.runs import REPO, run_python, tiny_args, write_byte_data

pytestmark = pytest.mark.slow

RUNNER = """
import json, sys
from mom_ds_testing.sync_guard import count_syncs
from mom_ds.model import pools
from mom_ds.model.model import MoMForCausalLM
import mom_ds.train.loop as loop

pools.grouped_mm_available = lambda x, w: True  # CUDA's path: offsets stay on the device
snapshots, box = [], {{}}
begin = MoMForCausalLM.begin_step
def marked(self, step):  # the loop calls it first thing in every optimizer step
    if "guard" in box:
        snapshots.append(dict(box["guard"].sites))
    return begin(self, step)
MoMForCausalLM.begin_step = marked
train = loop.train
def counted(*args, **kwargs):
    with count_syncs() as guard:
        box["guard"] = guard
        return train(*args, **kwargs)
loop.train = counted
from mom_ds.cli.train import main
code = main(sys.argv[1:])
steps, before = [], {{}}
for sites in snapshots:  # reads between two step starts: one step and its logging
    steps.append({{f"{{name}} @ {{site}}": n - before.get((name, site), 0)
                   for (name, site), n in sites.items() if n > before.get((name, site), 0)}})
    before = sites
print("SYNCS " + json.dumps(steps))
sys.exit(code)
"""

LOG_INTERVAL = 4
# The one read of a logging step: everything it prints and writes, and its health check,
# copied to the host together.
LOGGING_READ = "Tensor.cpu @ mom_ds/train/step_log.py"


def test_a_training_step_reads_only_where_deepspeed_does(tmp_path):
    data = write_byte_data(tmp_path / "data")
    proc = run_python(["-c", RUNNER.format(),
                       *tiny_args(data, tmp_path / "run", "--train.max_steps", "9",
                                  "--train.log_interval", str(LOG_INTERVAL),
                                  "--train.eval_interval", "0", "--train.ckpt_interval", "0")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    before_first, *steps = json.loads(proc.stdout.split("SYNCS ", 1)[1])
    # steps[i]: the reads of step i + 1 (its own and, on a logging step, the log's), up to
    # the start of the next; the last step (with the final evaluation and save) is left out
    assert before_first == {} and len(steps) == 8
    deepspeed_reads = None
    for i, reads in enumerate(steps):
        step = i + 1
        ours = {k: n for k, n in reads.items() if "@ deepspeed/" not in k}
        theirs = {k: n for k, n in reads.items() if "@ deepspeed/" in k}
        if step == 1 or step % LOG_INTERVAL == 0:  # a logging step (the first one logs too)
            assert len(ours) == 1 and next(iter(ours)).startswith(LOGGING_READ) \
                and sum(ours.values()) == 1, f"step {step} read more than once: {ours}"
        else:
            assert ours == {}, f"step {step} read on the host: {ours}"
        # DeepSpeed's own reads (gradient-norm checks in its optimizer step) are the same
        # every step
        assert deepspeed_reads in (None, theirs), (step, theirs, deepspeed_reads)
        deepspeed_reads = theirs
    print("DeepSpeed's reads per step:", deepspeed_reads)
