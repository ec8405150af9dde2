"""The chunked LM head + cross-entropy against the whole-logits path: the same loss and
every gradient (fp32, 1e-6), with ignored labels and chunks that do not divide the tokens;
and its peak memory at GPT-2's vocabulary lower by at least the logits' size."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from mom_ds import MoMForCausalLM
from mom_ds.model import presets
from mom_ds.model.lm_loss import chunked_lm_loss

SHAPE = dict(vocab_size=97, n_positions=16, d_model=16, n_heads=2)


def loss_and_grads(model, ids, labels, chunk):
    model.zero_grad()
    out = model(ids, labels=labels, loss_chunk_tokens=chunk)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["vanilla", "mom"])
@pytest.mark.parametrize("chunk", [1, 7, 24, 1000])
def test_chunked_loss_and_gradients_equal_the_whole_logits(name, chunk):
    torch.manual_seed(0)
    model = MoMForCausalLM(presets.preset(name, **SHAPE, **({"n_layer": 2} if name == "vanilla" else {})))
    ids = torch.randint(0, 97, (3, 16))
    labels = torch.randint(0, 97, (3, 16))
    labels[0, :5] = -100  # ignored positions count in neither the sum nor the mean
    whole, want = loss_and_grads(model, ids, labels, 0)
    chunked, got = loss_and_grads(model, ids, labels, chunk)
    assert chunked.logits is None and whole.logits.shape == (3, 16, 97)
    torch.testing.assert_close(chunked.lm_loss, whole.lm_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(chunked.loss, whole.loss, rtol=1e-6, atol=1e-6)
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-6, atol=1e-6, msg=n)


def test_chunked_loss_matches_cross_entropy_in_bf16():
    """bf16 hidden states and head: the logits rounded to bf16 as the whole path rounds them."""
    torch.manual_seed(0)
    hidden = torch.randn(40, 8, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(50, 8, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 50, (40,))
    want = torch.nn.functional.cross_entropy((hidden @ weight.T).float(), labels)
    got = chunked_lm_loss(hidden, weight, labels, 16)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    want_grads = torch.autograd.grad(want, (hidden, weight))
    got_grads = torch.autograd.grad(got, (hidden, weight))
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g.float(), w.float(), rtol=2e-2, atol=2e-3)


PEAK = """
import json, sys, torch
from mom_ds import MoMForCausalLM
from mom_ds.model import presets
from mom_ds.train.monitor import peak_rss_bytes, reset_peak_rss, rss_bytes
torch.manual_seed(0)
model = MoMForCausalLM(presets.vanilla(1, vocab_size=50257, n_positions=512, d_model=32, n_heads=2))
ids = torch.randint(0, 50257, (8, 512))
model(ids[:1, :8], labels=ids[:1, :8]).loss.backward()  # allocate the gradients first
reset_peak_rss()
before = rss_bytes()
model(ids, labels=ids, loss_chunk_tokens=int(sys.argv[1])).loss.backward()
print(json.dumps({"peak_mb": (peak_rss_bytes() - before) / 2 ** 20}))
"""


@pytest.mark.slow
def test_chunking_lowers_the_peak_memory_by_at_least_the_logits():
    def peak(chunk):
        proc = subprocess.run([sys.executable, "-c", PEAK, str(chunk)], capture_output=True,
                              text=True, timeout=300, check=True)
        return json.loads(proc.stdout.strip().splitlines()[-1])["peak_mb"]

    logits_mb = 8 * 512 * 50257 * 4 / 2 ** 20  # 785 MB of fp32 logits
    whole, chunked = peak(0), peak(1024)
    assert whole - chunked >= logits_mb, (whole, chunked)
