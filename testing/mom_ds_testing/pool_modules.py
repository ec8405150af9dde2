"""Test helper: a routed block's stacked pools as plain per-module nn.Modules (the family's
norm + nn.Linear, the unfolded math), copies holding each module's weights."""
from mom_ds.model.modules import AttentionModule, FFNModule


def attention_modules(block):
    return _modules(block.attn_pool, AttentionModule)


def ffn_modules(block):
    return _modules(block.ffn_pool, FFNModule)


def _modules(pool, cls):
    views = pool.module_views("m")
    mods = []
    for j in range(pool.n_modules):
        mod = cls(pool.config)
        mod.load_state_dict({k[len(f"m.{j}."):]: v for k, v in views.items()
                             if k.startswith(f"m.{j}.")})
        mods.append(mod)
    return mods
