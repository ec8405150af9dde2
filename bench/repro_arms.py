"""bench/repro.py's arms and the sizes of its default run, shared with the GPU plan
(bench/repro_plan.py), which lays the same arms out at GPT-2 small's size."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from mom_ds.model import MoMConfig
from mom_ds.model.flops import flops_per_token
from mom_ds.model.presets import mixture_of_depths, mom, moe, vanilla

ROUTER_WIDTH = 64
MICRO = 8  # windows per step
STAGE1_STEPS = 1954  # N1 = 2,000,896 tokens at --budget 1: the 2M per arm
STAGE2_STEPS = 384  # N2 = 393,216: the stage-2 arms end at N1 + N2 tokens
TEACHER_FACTOR = 2  # the modular teacher trains 2 x N1 tokens
COMPRESSION_STEPS = 56  # x bench/modular's 16 windows: 114,688 tokens per compressed model
# The Llama pair (an addition to the papers' seven claims) runs on the first 2 seeds: with 3
# it alone would take the default run past its 120 minutes on 2 cores.
LLAMA_SEEDS = 2
SEED_DIR = "seed-{}"  # a seed's runs: OUT/runs/seed-S/ARM
# Window orders (data.seed) that no seed's donor uses: init_from loads weights, not the
# sampler's position, so a stage-2 run with its donor's data seed would replay the donor's
# first windows (and the teacher's would be seed 1's compression tokens).
STAGE2_DATA_SEED = 100  # + the seed
TEACHER_DATA_SEED = 0


@dataclass(frozen=True)
class Arm:
    """One trained model of every seed: a row of the table and a band of the figure."""

    key: str
    label: str
    model: MoMConfig
    steps: int
    init: str = "random"  # random | donor (the seed's donor, cut by from-hf into model's layout)
    start_tokens: int = 0  # tokens its initial weights were trained on (the curves' offset)
    ablate: bool = False  # measure its routers' SKIP shares and silenced modules
    max_seeds: Optional[int] = None  # trained on the first max_seeds seeds only (None: all)

    def runs_with(self, seed: int) -> bool:
        """Whether the arm trains with `seed` (seeds count from 1)."""
        return self.max_seeds is None or seed <= self.max_seeds


def arms(shape: dict, layers: int, stage1_steps: int, stage2_steps: int,
         step_tokens: int) -> list[Arm]:
    """Every seed's arms for a vanilla model of `layers` layers at a shape (n_positions,
    d_model, n_heads, vocab_size); the GPU plan (bench/repro_plan.py) calls it with GPT-2
    small's. MoM deep holds the vanilla model's parameters (a bottom layer, L - 2 attention
    and FFN modules, an anchor layer) assembled L + 2 deep; MoM shallow holds L + L modules
    assembled L / 3 deep, two of each per step."""
    def deep(**family) -> MoMConfig:
        return mom(n_bottom=1, n_attn_modules=layers - 2, n_ffn_modules=layers - 2,
                   depth=layers, top_k=1, anchor_layers=True, router_width=ROUTER_WIDTH,
                   **shape, **family)

    llama = dict(block="llama", n_kv_heads=max(1, shape["n_heads"] // 2))
    donor = vanilla(layers, **shape)
    mod = mixture_of_depths(layers, capacity=0.125, every=2, **shape)
    n1, n2, seq = stage1_steps, stage2_steps, shape["n_positions"]
    start = n1 * step_tokens
    return [
        Arm("donor", f"vanilla {layers}L (the donor)", donor, n1),
        Arm("vanilla_continued", f"vanilla {layers}L, continued", donor, n2, "donor", start),
        Arm("mom_deep", "MoM deep, two-stage", deep(), n2, "donor", start, ablate=True),
        Arm("mom_shallow", "MoM shallow, two-stage",
            mom(n_attn_modules=layers, n_ffn_modules=layers, depth=max(1, layers // 3),
                top_k=2, router_width=ROUTER_WIDTH, **shape), n2, "donor", start),
        Arm("mom_scratch", "MoM deep, from scratch", deep(), n1 + n2),
        # the donor's training FLOPs: its tokens x its FLOPs per token / MoD's
        Arm("mod", f"MoD {layers}L (12.5%, every 2nd layer)", mod,
            round(n1 * flops_per_token(donor, seq) / flops_per_token(mod, seq))),
        Arm("moe", f"MoE {layers}L (top-1 of 8 experts)",
            moe(layers, n_experts=8, top_k=1, router_width=ROUTER_WIDTH, **shape), n1),
        Arm("llama_vanilla", f"llama vanilla {layers}L", vanilla(layers, **shape, **llama), n1,
            max_seeds=LLAMA_SEEDS),
        Arm("llama_mom", "llama MoM deep", deep(**llama), n1, max_seeds=LLAMA_SEEDS),
    ]


def data_seed(arm: Arm, seed: int) -> int:
    """The window order of the arm's run: a stage-2 arm draws from another permutation than
    its donor's."""
    return STAGE2_DATA_SEED + seed if arm.init == "donor" else seed
