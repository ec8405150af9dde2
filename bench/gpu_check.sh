#!/usr/bin/env bash
# The GPU check (not run by CI): on a CUDA machine, in under 10 minutes, the tests that can
# use CUDA, model_speed in bf16, a routed block under torch.cuda.set_sync_debug_mode
# ("error") at E = 1 (no device-to-host sync in forward or backward), every preset under the
# aten-level guard as well, the whole MoM compiled with fullgraph=True, the op counts, and
# 10 steps of mom-train with ZeRO-2 in bf16. Prints one table.
#   bash bench/gpu_check.sh            (inside the venv, after `make venv`)
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY="${PY:-python}"
OUT="${OUT:-$(mktemp -d)}"
declare -a ROWS

row() { ROWS+=("$(printf '%-44s %-6s %s' "$1" "$2" "$3")"); }

"$PY" - <<'PY' > "$OUT/device.txt" 2>&1
import torch
assert torch.cuda.is_available(), "no CUDA device"
print(torch.cuda.get_device_name(), "cc", ".".join(map(str, torch.cuda.get_device_capability())),
      "torch", torch.__version__)
PY
if [ $? -ne 0 ]; then cat "$OUT/device.txt"; echo "gpu_check: needs a CUDA device"; exit 1; fi
row "device" "-" "$(cat "$OUT/device.txt")"

# 1. model tests on CUDA (exactness, dispatch, no-sync guard, generation), fp32
if timeout 300 "$PY" -m pytest -q -x tests/model/test_model_dispatch.py tests/model/test_model_no_sync.py \
     tests/model/test_model_routed_reference.py tests/model/test_model_generation.py > "$OUT/tests.txt" 2>&1
then row "model tests (CPU reference paths)" "ok" "$(tail -1 "$OUT/tests.txt")"
else row "model tests (CPU reference paths)" "FAIL" "$(tail -1 "$OUT/tests.txt")"; fi

# 2. a routed block on CUDA in bf16: grouped_mm path, exact against the loop fallback, and
#    no host sync in forward + backward (torch raises on a synchronizing call)
if timeout 180 "$PY" - > "$OUT/sync.txt" 2>&1 <<'PY'
import torch
from mom_ds import MoMForCausalLM
from mom_ds.model import pools, presets
torch.manual_seed(0)
cfg = presets.mom(n_routed_blocks=1, n_attn_modules=4, n_ffn_modules=4, depth=4, top_k=2,
                  vocab_size=8192, n_positions=256, d_model=512, n_heads=8)
model = MoMForCausalLM(cfg).cuda().bfloat16()
ids = torch.randint(0, 8192, (4, 256), device="cuda")
x = torch.randn(64, 512, device="cuda", dtype=torch.bfloat16)
w = torch.randn(4, 512, 256, device="cuda", dtype=torch.bfloat16)
print("grouped_mm available:", pools.grouped_mm_available(x, w))
model(ids, labels=ids).loss.backward()  # warm-up (allocations, kernels)
torch.cuda.synchronize()
torch.cuda.set_sync_debug_mode("error")
out = model(ids, labels=ids)
out.loss.backward()
model(ids, labels=ids, loss_chunk_tokens=256).loss.backward()  # the chunked head + loss
torch.cuda.set_sync_debug_mode(0)
groups = pools.RowGroups.from_sorted(torch.sort(torch.randint(0, 5, (64,), device="cuda"))[0],
                                     torch.tensor([10, 20, 0, 14], device="cuda"))
b = torch.zeros(4, 256, device="cuda", dtype=torch.bfloat16)
fast = pools.grouped_linear(x, w, b, groups, use_grouped_mm=True)
slow = pools.grouped_linear(x, w, b, groups, use_grouped_mm=False)
print("grouped vs loop max diff", float((fast - slow).abs().max()))
print("no host sync in forward + backward")
PY
then row "routed block bf16, sync_debug_mode=error" "ok" "$(tail -2 "$OUT/sync.txt" | tr '\n' ' ')"
else row "routed block bf16, sync_debug_mode=error" "FAIL" "$(grep -m1 -i error "$OUT/sync.txt")"; fi

# 3. model speed in bf16 (MoM vs vanilla vs HF GPT-2)
if timeout 240 "$PY" bench/model_speed.py --device cuda --dtype bf16 > "$OUT/speed.txt" 2>&1
then row "bench/model_speed.py bf16" "ok" "$(grep -i ratio "$OUT/speed.txt" | tr '\n' ' ' | cut -c1-200)"
else row "bench/model_speed.py bf16" "FAIL" "$(tail -1 "$OUT/speed.txt")"; fi

# 4. the chunked LM head + loss at GPT-2's vocabulary (target: vanilla >= 1.3x HF tokens/s)
if timeout 240 "$PY" bench/model_speed.py --device cuda --dtype bf16 --vocab 50257 \
     > "$OUT/speed50257.txt" 2>&1
then row "bench/model_speed.py bf16 vocab 50257" "ok" "$(grep -i "vanilla preset" "$OUT/speed50257.txt" | tr '\n' ' ' | cut -c1-240)"
else row "bench/model_speed.py bf16 vocab 50257" "FAIL" "$(tail -1 "$OUT/speed50257.txt")"; fi

# 5. every preset's forward + backward in bf16 under the aten-level guard (mom_ds_testing/sync_guard.py:
#    the ops whose CUDA kernels read device data on the host) and sync_debug_mode("error")
# (PYTHONPATH=tests/model: CASES is the test's own table; the guard is mom_ds_testing's)
if PYTHONPATH=tests/model timeout 240 "$PY" - > "$OUT/guard.txt" 2>&1 <<'PY'
import sys
import torch
from mom_ds_testing.sync_guard import no_syncs
from test_model_no_sync import CASES
from mom_ds import MoMForCausalLM
for name, (config, options) in CASES.items():
    torch.manual_seed(0)
    model = MoMForCausalLM(config).cuda().bfloat16()
    if "checkpointing" in options:
        model.set_activation_checkpointing(options["checkpointing"])
    ids = torch.randint(0, config.vocab_size, (2, 16), device="cuda")
    kwargs = {k: v for k, v in options.items() if k == "loss_chunk_tokens"}
    model(ids, labels=ids, **kwargs).loss.backward()  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    with no_syncs():
        model(ids, labels=ids, **kwargs).loss.backward()
    torch.cuda.set_sync_debug_mode(0)
print(f"{len(CASES)} models: no host read")
PY
then row "aten guard + sync_debug_mode, every preset" "ok" "$(tail -1 "$OUT/guard.txt")"
else row "aten guard + sync_debug_mode, every preset" "FAIL" "$(grep -m1 -i "sync\|error" "$OUT/guard.txt")"; fi

# 6. the whole MoM compiled with fullgraph=True (inductor, bf16) against eager
if timeout 300 "$PY" - > "$OUT/compile.txt" 2>&1 <<'PY'
import copy
import torch
from mom_ds import MoMForCausalLM
from mom_ds.model import presets
torch.manual_seed(0)
cfg = presets.mom(n_routed_blocks=1, n_attn_modules=4, n_ffn_modules=4, depth=4, top_k=2,
                  capacity_factor=1.25, vocab_size=8192, n_positions=256, d_model=512, n_heads=8)
eager = MoMForCausalLM(cfg).cuda().bfloat16()
compiled = torch.compile(copy.deepcopy(eager), fullgraph=True)
ids = torch.randint(0, 8192, (4, 256), device="cuda")
want, got = eager(ids, labels=ids).loss, compiled(ids, labels=ids).loss
print(f"loss eager {float(want):.4f} compiled {float(got):.4f} diff {abs(float(want - got)):.2e}")
PY
then row "fullgraph compile, inductor bf16" "ok" "$(tail -1 "$OUT/compile.txt")"
else row "fullgraph compile, inductor bf16" "FAIL" "$(grep -m1 -i "error" "$OUT/compile.txt")"; fi

# 7. aten ops per forward + backward (eager, both dispatch paths) and inductor's kernels
if timeout 300 "$PY" bench/model_speed.py --ops-only --compiled-ops --device cuda --dtype bf16 \
     > "$OUT/ops.txt" 2>&1
then row "aten ops / inductor kernels (model_speed)" "ok" "$(grep "^| mom_k1" "$OUT/ops.txt")"
else row "aten ops / inductor kernels (model_speed)" "FAIL" "$(tail -1 "$OUT/ops.txt")"; fi

# 8. mom-train on CUDA: 10 steps of the tiny recipe, ZeRO-2, bf16
if timeout 300 bash -c "mom-prep --source builtin --tokenizer bytes --out '$OUT/data' > /dev/null &&
     mom-train --config configs/tiny.yaml --data.data_dir '$OUT/data' --train.out_dir '$OUT/run' \
       --train.max_steps 10 --train.log_interval 5 --train.precision bf16 \
       --deepspeed ds_configs/zero2.json" > "$OUT/train.txt" 2>&1
then row "mom-train 10 steps, ZeRO-2 bf16" "ok" "$(grep -m1 "^step 10/" "$OUT/train.txt")"
else row "mom-train 10 steps, ZeRO-2 bf16" "FAIL" "$(tail -1 "$OUT/train.txt")"; fi

echo
printf '%-44s %-6s %s\n' "check" "result" "detail"
printf '%s\n' "${ROWS[@]}"
echo "(logs in $OUT)"
