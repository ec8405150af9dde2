"""A routed block against the mechanism written out with plain Python loops (mom-spec.md
section 1, "One routing step"): per-token routers, per-token Q/K/V sums, per-head softmax,
weighted output projections and FFNs. In the llama block family each module's Q and K are
rotated at the token's position before the sum (here, with Python's math) and each query
head reads its group's key/value head: the block rotates the sum once, which is the same
because rotation is linear."""
import math

import pytest
import torch

from mom_ds import MoMConfig
from mom_ds.model.modules import rotary_tables
from mom_ds.model.routed_block import RoutedBlock
from mom_ds_testing.pool_modules import attention_modules, ffn_modules


def ref_router(router, x, g, step, cfg):
    """GRU via torch.nn.GRUCell (not our gate code), softmax(logits/T), top-K, weights."""
    if router.kind == "gru":
        g = router.cell(x, g if g is not None else torch.zeros(1, router.cell.hidden_size))
        hidden = g
    else:
        hidden = torch.relu(router.hidden(x))
    logits = router.head(hidden)[0]
    p = torch.softmax(logits / cfg.temperature, dim=-1)
    order = sorted(range(len(p)), key=lambda c: -float(p[c]))[: cfg.top_k]
    chosen = [float(p[c]) for c in order]
    if cfg.weighting == "logit":
        chosen = [float(logits[c]) for c in order]
    elif cfg.top_k > 1 or cfg.weighting == "renorm":
        chosen = [w / sum(chosen) for w in chosen]
    return list(zip(order, chosen)), g


def ref_rotate(v, position, theta):
    """One head's vector rotated by its position: dimension i pairs with i + hd/2, at the
    angle position * theta^(-2i/hd)."""
    half = len(v) // 2
    out = v.clone()
    for i in range(half):
        angle = position * theta ** (-2 * i / len(v))
        c, s = math.cos(angle), math.sin(angle)
        out[i] = v[i] * c - v[i + half] * s
        out[i + half] = v[i + half] * c + v[i] * s
    return out


def ref_module_qkv(mod, x, position, cfg):
    """One module's Q, K, V of one token (llama: Q and K rotated per head)."""
    d, hd, kv = cfg.d_model, cfg.head_dim, cfg.kv_heads * cfg.head_dim
    out = mod.qkv(mod.ln(x))
    q, k, v = out[:d], out[d:d + kv], out[d + kv:]
    if cfg.block == "llama":
        q, k = (torch.cat([ref_rotate(t[i:i + hd], position, cfg.rope_theta)
                           for i in range(0, len(t), hd)]) for t in (q, k))
    return q, k, v


def ref_block(block, x, cfg):
    """x: (T, d) one sequence -> (T, d), every token and head in Python loops."""
    T, d = x.shape
    nh, hd = cfg.n_heads, d // cfg.n_heads
    group = cfg.n_heads // cfg.kv_heads  # query heads per key/value head
    A, Fn = cfg.n_attn_modules, cfg.n_ffn_modules
    attn_mods, ffn_mods = attention_modules(block), ffn_modules(block)
    h = [x[t].clone() for t in range(T)]
    g_a = [None] * T
    g_f = [None] * T
    skipped_any = chosen_any = False
    for step in range(cfg.depth):
        picks = []
        for t in range(T):
            pk, g_a[t] = ref_router(block.attn_router, h[t][None], g_a[t], step, cfg)
            picks.append([(m, w) for m, w in pk if m < A])
        qkv = []
        for t in range(T):
            acc = [torch.zeros(d), torch.zeros(cfg.kv_heads * hd), torch.zeros(cfg.kv_heads * hd)]
            for m, w in picks[t]:
                outs = ref_module_qkv(attn_mods[m], h[t], t, cfg)
                acc = [a + (w * o if cfg.weighted_qkv else o) for a, o in zip(acc, outs)]
            qkv.append(acc)
            skipped_any |= not picks[t]
            chosen_any |= bool(picks[t])
        att = []
        for i in range(T):
            out = torch.zeros(d)
            for head in range(nh):
                sl = slice(head * hd, (head + 1) * hd)
                kv = slice(head // group * hd, (head // group + 1) * hd)
                q = qkv[i][0][sl]
                keys = [j for j in range(i + 1)
                        if cfg.skip_in_attention == "zero" or picks[j] or j == i]
                logits = torch.stack([q @ qkv[j][1][kv] / math.sqrt(hd) for j in keys])
                probs = torch.softmax(logits, 0)
                out[sl] = sum(p * qkv[j][2][kv] for p, j in zip(probs, keys))
            att.append(out)
        for t in range(T):
            for m, w in picks[t]:
                h[t] = h[t] + w * attn_mods[m].proj(att[t])
        for t in range(T):
            pk, g_f[t] = ref_router(block.ffn_router, h[t][None], g_f[t], step, cfg)
            delta = torch.zeros(d)
            for m, w in pk:
                if m < Fn:
                    delta = delta + w * ffn_mods[m](h[t])
            h[t] = h[t] + delta
    return torch.stack([v.reshape(d) for v in h]), skipped_any, chosen_any


CASES = [
    dict(top_k=1, skip_in_attention="zero"),
    dict(top_k=1, skip_in_attention="mask"),
    dict(top_k=2, skip_in_attention="zero"),
    dict(top_k=2, skip_in_attention="mask", weighted_qkv=True),
    dict(top_k=1, router="mlp", weighting="renorm"),
    dict(top_k=2, router="mlp", weighting="logit"),
    dict(top_k=1, weighting="logit"),
    dict(top_k=2, block="llama", n_kv_heads=1, weighted_qkv=True, ffn_hidden=24),
    dict(top_k=1, block="llama", qkv_bias=True, skip_in_attention="mask", rope_theta=100.0),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_routed_block_matches_python_loops(case):
    cfg = MoMConfig(vocab_size=50, n_positions=16, d_model=16, n_heads=2, n_attn_modules=2,
                    n_ffn_modules=3, depth=2, temperature=1.0, **case)
    # Raw-logit weights (up to ~5 here) multiply the stream at every step; at std 0.3 the
    # second step's attention logits reach ~1e3, where the softmax turns float rounding
    # into O(1) differences, so those cases draw smaller weights.
    std = 0.15 if case.get("weighting") == "logit" else 0.3
    for seed in range(20):  # find weights whose routing picks SKIP for some tokens, not all
        torch.manual_seed(seed)
        block = RoutedBlock(cfg)
        with torch.no_grad():
            for p in block.parameters():
                p.normal_(0, std)
        x = torch.randn(2, 6, cfg.d_model)
        with torch.no_grad():
            refs = [ref_block(block, x[b], cfg) for b in range(2)]
        if any(r[1] for r in refs) and all(r[2] for r in refs):
            break
    else:
        pytest.fail("no seed gave a routing with both SKIP and module choices")
    rope = rotary_tables(torch.arange(6), cfg.head_dim, cfg.rope_theta) \
        if cfg.block == "llama" else None
    with torch.no_grad():
        out, routing = block(x, rope=rope)
    expected = torch.stack([r[0] for r in refs])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # A != F: the attention router's slot 2 (past the 2-module pool) acts as SKIP.
    assert routing.attn_counts.shape == (cfg.depth, cfg.n_attn_modules + 1)
    assert routing.ffn_counts.shape == (cfg.depth, cfg.n_ffn_modules + 1)
