#!/usr/bin/env bash
# The README's first command (run by `make quickstart` inside the venv).
set -euo pipefail
echo "quickstart: training lands with issue 4; the model is usable now:"
python - <<'PY'
import torch, mom_ds
cfg = mom_ds.MoMConfig(vocab_size=257, n_positions=128, d_model=64, n_heads=4)
model = mom_ds.MoMForCausalLM(cfg)
ids = torch.randint(0, 257, (2, 32))
print("loss of an untrained tiny MoM:", float(model(ids, labels=ids).loss))
PY
