"""A routed block's module pools, stored stacked: one tensor per role with a leading module
dimension, so a half-step computes all its modules with one grouped GEMM per projection.

An attention module is its own pre-norm + Q/K/V projection + output projection (d -> d); an
FFN module its own pre-norm + MLP (mom-spec section 1), in the model's block family
(modules.py: GPT-2's LayerNorm and GELU MLP, or Llama's RMSNorm and SwiGLU, whose gate and
up projections are one stacked projection, so SwiGLU's third matrix adds no gather and no
exchange). Here module j of a pool is row j of every tensor. Weights are stored (in, out),
the layout `grouped_mm` multiplies by (and Hugging Face's Conv1D keeps).

The rows a pool computes arrive sorted by module (dispatch.py: RoutePlan) and described by
`RowGroups`. The caller normalises each token once, without affine, so the rows need a single
gather whatever module they go to; each module's norm affine is applied with the
projection after it (grouped_linear).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import MoMConfig
from .modules import fc_width, ffn_activation, norm_kind, normalize, projection_biases


@dataclass
class RowGroups:
    """Rows sorted by module: module j's rows are [offsets[j-1], offsets[j]); rows past the
    last offset (SKIP choices, assignments over capacity) belong to no module.

    offsets: (G,) int32 cumulative ends, on the device (no host sync to pass them).
    module: (M,) int64 module of each row, G past the last offset: the index of the zero row
    grouped_linear puts after the biases, so no row in a module needs a mask for its bias.
    host_ends: the offsets on the host, when the caller has them (the all-to-all dispatcher
    does) or once the per-module loop has read them: one read for every projection that
    shares these rows.
    """

    offsets: torch.Tensor
    module: torch.Tensor
    host_ends: Optional[list[int]] = None
    _invalid: Optional[torch.Tensor] = None

    @classmethod
    def from_sorted(cls, module: torch.Tensor, counts: torch.Tensor,
                    host_counts: Optional[list[int]] = None) -> "RowGroups":
        """module: (M,) sorted module id of each row, G for rows in no module; counts: (G,)
        rows per module. All on the device; host_counts: counts on the host."""
        ends = list(itertools.accumulate(host_counts)) if host_counts is not None else None
        return cls(torch.cumsum(counts, 0, dtype=torch.int32), module, ends)

    @property
    def invalid(self) -> torch.Tensor:
        """(M, 1) bool, the row belongs to no module: made on first use (the grouped GEMM's;
        the per-module loop needs none), in the shape that masks whole rows, once for every
        projection and gradient that shares these rows."""
        if self._invalid is None:
            self._invalid = (self.module == len(self.offsets)).unsqueeze(1)
        return self._invalid

    def ends(self) -> list[int]:
        if self.host_ends is None:
            self.host_ends = self.offsets.tolist()
        return self.host_ends


def grouped_mm_available(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether torch's grouped GEMM is the fast path for these operands: its CUTLASS kernel
    (torch >= 2.8, CUDA, bf16, compute capability 9.x/10.x, every stride 16-byte aligned)
    makes no host sync. Elsewhere torch itself loops over the groups after reading the
    offsets on the host (other GPUs) or loops on the CPU, so the per-module loop below,
    whose matmuls fuse the bias, is as fast or faster (measured on CPU)."""
    if not hasattr(F, "grouped_mm") or x.device.type != "cuda" or x.dtype != torch.bfloat16:
        return False
    if torch.cuda.get_device_capability(x.device)[0] not in (9, 10):
        return False
    size = x.element_size()
    return all(n * size % 16 == 0 for n in weight.shape[1:])


# The grouped GEMM as two custom operators (torch.library), not an autograd.Function:
# torch.compile sees each as one opaque node with a shape function, so a routed block
# compiles with fullgraph=True whatever grouped_mm's own meta function accepts (torch 2.13's
# asks for bf16 even where the CPU kernel takes fp32). Ours because torch 2.13's grouped_mm
# autograd (a) leaves uninitialised memory in the rows past the last offset, forward and
# backward (x's gradient there would be garbage, flowing into the tokens that chose SKIP),
# and (b) rejects a gradient with zero strides ("Invalid strides/sizes", e.g. from
# y.sum()). Empty groups are fine (checked on CPU: forward and both gradients exact).
def _grouped_mm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor,
                invalid: torch.Tensor) -> torch.Tensor:
    y = F.grouped_mm(x.contiguous(), weight, offs=offsets)
    return y.masked_fill_(invalid, 0)


def _grouped_mm_weight_grad(x: torch.Tensor, grad: torch.Tensor,
                            offsets: torch.Tensor) -> torch.Tensor:
    return F.grouped_mm(x.t(), grad.contiguous(), offs=offsets)  # rows past: ignored


grouped_mm = torch.library.custom_op("mom_ds::grouped_mm", mutates_args=())(_grouped_mm)
"""(M, in) rows sorted by module x (G, in, out) -> (M, out), 0 past the last offset."""
grouped_mm_weight_grad = torch.library.custom_op(
    "mom_ds::grouped_mm_weight_grad", mutates_args=())(_grouped_mm_weight_grad)
"""The weight gradient of grouped_mm: (G, in, out), module j from its own rows."""
# What each operator runs, for mom_ds_testing/sync_guard.py (testing/) to look inside them.
IMPLEMENTATIONS = {"mom_ds::grouped_mm": _grouped_mm,
                   "mom_ds::grouped_mm_weight_grad": _grouped_mm_weight_grad}


@grouped_mm.register_fake
def _(x, weight, offsets, invalid):
    return x.new_empty(x.shape[0], weight.shape[2])


@grouped_mm_weight_grad.register_fake
def _(x, grad, offsets):
    return x.new_empty(offsets.shape[0], x.shape[1], grad.shape[1])


def _save(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _grouped_mm_backward(ctx, grad):
    x, weight, offsets, invalid = ctx.saved_tensors
    grad_x = grouped_mm(grad, weight.transpose(-2, -1), offsets, invalid) \
        if ctx.needs_input_grad[0] else None
    grad_w = grouped_mm_weight_grad(x, grad, offsets) if ctx.needs_input_grad[1] else None
    return grad_x, grad_w, None, None


grouped_mm.register_autograd(_grouped_mm_backward, setup_context=_save)


# A module norm's affine, each (G, in): (gamma, beta), beta None for RMSNorm.
Affine = tuple[torch.Tensor, Optional[torch.Tensor]]


def _loop_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 groups: RowGroups, norm_affine: Optional[Affine] = None) -> torch.Tensor:
    """The fallback: one matmul per module (bias fused), the offsets read once per plan;
    the rows past the last offset are zeros and get no gradient. split and unbind, not
    indexing: their backward joins the pieces once instead of adding a zero-filled
    full-size gradient per module."""
    ends = [0, *groups.ends()]
    sizes = [b - a for a, b in zip(ends, ends[1:])]
    *parts, rest = x.split([*sizes, x.shape[0] - ends[-1]])
    if norm_affine is not None:  # each module's affine on its own rows: one pass over them
        gamma, beta = norm_affine
        betas = beta.unbind(0) if beta is not None else [None] * len(parts)
        parts = [part * g if b is None else torch.addcmul(b, part, g)
                 for part, g, b in zip(parts, gamma.unbind(0), betas)]
    if bias is None:
        outs = [part @ w for part, w in zip(parts, weight.unbind(0))]
    else:
        outs = [torch.addmm(b, part, w)
                for part, w, b in zip(parts, weight.unbind(0), bias.unbind(0))]
    return torch.cat([*outs, rest.new_zeros(rest.shape[0], weight.shape[2])])


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   groups: RowGroups, use_grouped_mm: bool | None = None,
                   norm_affine: Optional[Affine] = None) -> torch.Tensor:
    """x (M, in) rows sorted by module -> (M, out) = x' @ weight[m] + bias[m] for each row's
    module m (no bias: None), 0 for rows in no module; x' = x * gamma[m] + beta[m] when
    norm_affine gives a module norm's affine (gamma, beta), each (G, in), beta None for
    RMSNorm. use_grouped_mm None: whenever it is the fast path. The grouped GEMM takes the
    affine folded into the weights (diag(gamma) W and beta W + b, exact algebra: one gather
    for any module); the loop applies it to each module's rows, which moves less memory than
    folding."""
    if use_grouped_mm is None:
        # compiled: one graph (the loop would read the offsets on the host, a graph break)
        use_grouped_mm = grouped_mm_available(x, weight) or torch.compiler.is_compiling()
    if not use_grouped_mm:
        return _loop_linear(x, weight, bias, groups, norm_affine)
    if norm_affine is not None:
        gamma, beta = norm_affine
        folded = gamma.unsqueeze(2) * weight
        if beta is not None:
            shift = torch.bmm(beta.unsqueeze(1), weight).squeeze(1)
            bias = shift if bias is None else bias + shift
        weight = folded
    y = grouped_mm(x, weight, groups.offsets, groups.invalid)  # rows in no module: 0
    if bias is None:
        return y
    return y + F.pad(bias, (0, 0, 0, 1)).index_select(0, groups.module)  # and their bias 0


class GroupedProjection(nn.Module):
    """One projection of every module of a pool: weight (G, in, out), bias (G, out) when
    the projection has one, and, when it follows the module's norm, that norm's affine
    ln_weight (and, for LayerNorm, ln_bias), each (G, in) (the rows come normalised without
    it). Its own module, so ZeRO-3 gathers its parameters when it is called."""

    def __init__(self, n_modules: int, d_in: int, d_out: int, bias: bool,
                 norm: Optional[str] = None):
        """norm: the kind of norm that precedes this projection (modules.norm_kind), None
        for none."""
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_modules, d_in, d_out))
        self.bias = nn.Parameter(torch.zeros(n_modules, d_out)) if bias else None
        if norm is not None:
            self.ln_weight = nn.Parameter(torch.ones(n_modules, d_in))
            self.ln_bias = nn.Parameter(torch.zeros(n_modules, d_in)) \
                if norm == "layernorm" else None
        self.norm = norm

    def forward(self, rows: torch.Tensor, groups: RowGroups) -> torch.Tensor:
        affine = (self.ln_weight, self.ln_bias) if self.norm is not None else None
        return grouped_linear(rows, self.weight, self.bias, groups, norm_affine=affine)


class ModulePool(nn.Module):
    """Shared by both pool kinds: the size, the norm, and how one module is viewed."""

    # the projections; inside one module, as a per-module nn.Module (modules.AttentionModule
    # / FFNModule) names them, projection p's tensors are p.weight, p.bias and, for the
    # projection after the norm, ln.weight and ln.bias (view_names)
    PROJECTIONS: tuple[str, ...] = ()

    def __init__(self, config: MoMConfig, n_modules: int):
        super().__init__()
        self.config, self.n_modules = config, n_modules
        self.block, self.norm, self.eps = config.block, norm_kind(config), config.layer_norm_eps

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return normalize(x, self.norm, self.eps)

    def view_names(self) -> dict[str, tuple[str, str]]:
        """A module's tensor names, as a per-module nn.Module names them -> (projection,
        parameter) of the stack that holds them."""
        names = {}
        for projection in self.PROJECTIONS:
            grouped = getattr(self, projection)
            for param, name in (("ln_weight", "ln.weight"), ("ln_bias", "ln.bias"),
                                ("weight", f"{projection}.weight"),
                                ("bias", f"{projection}.bias")):
                if getattr(grouped, param, None) is not None:
                    names[name] = (projection, param)
        return names

    def module_views(self, prefix: str) -> dict[str, torch.Tensor]:
        """Every module's tensors as views into the stacks, in nn.Linear layout (out, in),
        named <prefix>.<j>.<name> as a per-module nn.Module would name them (writing into
        a view writes the stack): the names Hugging Face import and per-module tools use."""
        views = {}
        names = self.view_names()
        for j in range(self.n_modules):
            for name, (projection, param) in names.items():
                tensor = getattr(getattr(self, projection), param)[j]
                views[f"{prefix}.{j}.{name}"] = tensor.t() if tensor.dim() == 2 else tensor
        return views


class AttentionPool(ModulePool):
    """A modules: norm + Q/K/V projection (d -> config.qkv_width) + output projection
    (d -> d). The block calls `qkv` and `proj` separately, with the one attention between
    them."""

    PROJECTIONS = ("qkv", "proj")

    def __init__(self, config: MoMConfig, n_modules: Optional[int] = None):
        """n_modules: the pool's size where it is not config.n_attn_modules."""
        super().__init__(config, n_modules or config.n_attn_modules)
        qkv_bias, bias = projection_biases(config)
        d = config.d_model
        self.qkv = GroupedProjection(self.n_modules, d, config.qkv_width, qkv_bias,
                                     norm=self.norm)
        self.proj = GroupedProjection(self.n_modules, d, d, bias)


class FFNPool(ModulePool):
    """F modules: norm + MLP, GPT-2's (d -> ffn_width -> d, tanh GELU) or SwiGLU (gate and
    up: d -> 2 * ffn_width in one projection, down: ffn_width -> d)."""

    PROJECTIONS = ("fc", "proj")

    def __init__(self, config: MoMConfig, n_modules: Optional[int] = None):
        """n_modules: the pool's size where it is not config.n_ffn_modules."""
        super().__init__(config, n_modules or config.n_ffn_modules)
        _, bias = projection_biases(config)
        d = config.d_model
        self.fc = GroupedProjection(self.n_modules, d, fc_width(config), bias, norm=self.norm)
        self.proj = GroupedProjection(self.n_modules, config.ffn_width, d, bias)

    def forward(self, rows: torch.Tensor, groups: RowGroups) -> torch.Tensor:
        """Normalised rows (M, d) -> (M, d)."""
        return self.proj(ffn_activation(self.fc(rows, groups), self.block), groups)
