"""A mom-ds training step against the MoM authors' own model code, same weights and routing.

    git clone https://github.com/gzhch/Mixture-of-Modules /tmp/mom-authors
    python bench/vs_authors.py --authors-dir /tmp/mom-authors --make-venv /tmp/mom-authors-venv
    python bench/vs_authors.py --authors-dir /tmp/mom-authors --authors-python PY

Their `mom/model.py` (GPT2MoTLMHeadModel) runs unmodified under transformers 4.40.x, in its own
venv: `--authors-python PATH/bin/python`, or `--make-venv DIR` creates one (pip installs
transformers==4.40.*, and a .pth file lends it this venv's torch, so both sides run the same
torch build and nothing big is downloaded). Their `model.py` imports `.configuration_gpt_mot`,
which the release names `config.py`; the worker registers that alias in sys.modules instead of
editing their files.

Two long-lived workers, one per venv, driven over pipes. For K = 1 and K = 2: their model is
built (their init, --seed), its weights are mapped onto MoMForCausalLM by parameter name, the
logits and every routing decision (per token, step, router) must be equal before anything is
timed (else the first mismatch is named and nothing is timed), then training steps (forward +
backward + AdamW) are timed in pairs, interleaved, the order alternating (A B, B A, ...).

--threads (default: torch's, one per core) sets both workers' intra-op threads; where other
work shares the CPU, --threads 1 is far steadier (a descheduled OpenMP thread stalls the rest).
AdamW's lr defaults to 0: every step does the same arithmetic as at any lr, while the weights,
hence the routing checked above, stay the same for every timed step on both sides.
Not run by CI: it needs their code from the network. tests/project/test_bench_vs_authors.py covers the
weight-name map and the argument errors offline.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import pickle
import statistics
import struct
import subprocess
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path

try:
    import torch
except ImportError:  # main() says which python lacks it
    torch = None

HERE = Path(__file__).resolve()
AUTHORS_TRANSFORMERS = "4.40."


class BenchError(Exception):
    """Input or environment that cannot work; the message names the thing and the fix."""


@dataclass(frozen=True)
class Layout:
    """The one model both sides build. Defaults: the authors' layout (a bottom layer, routed
    blocks each followed by an anchor layer, a top layer; GRU routers of width 256, T 0.2,
    their *_softmax renormalisation; A = F = 4) shrunk to 2 blocks of H = 4 at width 256, so a
    step takes about 2 s on 2 idle cores and the run about 2 minutes; vocab 8192 keeps the LM
    head (the same on both sides) from dominating."""

    vocab: int = 8192
    seq: int = 256
    batch: int = 8
    d_model: int = 256
    n_heads: int = 4
    n_bottom: int = 1
    n_routed_blocks: int = 2
    n_top: int = 1
    anchors: bool = True
    n_attn: int = 4
    n_ffn: int = 4
    depth: int = 4
    top_k: int = 1
    router: str = "gru"          # gru (their GRUTokenRouter) or mlp (their "naive" TokenRouter)
    router_width: int = 256
    temperature: float = 0.2
    weighting: str = "renorm"    # renorm: their "*_softmax" routers; logit: raw logits

    def describe(self) -> str:
        pools = f"A {self.n_attn}, F {self.n_ffn}, H {self.depth}, K {self.top_k}, SKIP"
        anchor = " + anchor" if self.anchors else ""
        return (f"d {self.d_model}, heads {self.n_heads}, vocab {self.vocab}, seq {self.seq}, "
                f"batch {self.batch}; {self.n_bottom} bottom + {self.n_routed_blocks} x (routed block: "
                f"{pools}; {self.router} router {self.router_width}, {self.weighting}, "
                f"T {self.temperature}){anchor} + {self.n_top} top; fp32, no dropout")


# ---- the two configurations ----------------------------------------------------------------
def check_layout(layout: Layout) -> None:
    if min(layout.n_attn, layout.n_ffn) < 2:
        raise BenchError(f"--attn {layout.n_attn} / --ffn {layout.n_ffn}: their code turns a "
                         "pool of one module into a fixed layer with no router. Fix: use >= 2.")
    if layout.router == "mlp" and layout.n_attn > layout.n_ffn:
        raise BenchError("--router mlp with more attention than FFN modules: their TokenRouter "
                         "has F + 1 classes, ours max(A, F) + 1. Fix: --attn <= --ffn, or gru.")
    if layout.top_k > max(layout.n_attn, layout.n_ffn) + 1:
        raise BenchError(f"--top-k {layout.top_k} exceeds the pool plus SKIP. Fix: a smaller K.")


def authors_config(layout: Layout) -> dict:
    """Keyword arguments of their GPT2Config (mom/config.py) for this layout."""
    suffix = "_softmax" if layout.weighting == "renorm" else ""
    return dict(
        vocab_size=layout.vocab, n_positions=layout.seq, n_embd=layout.d_model,
        n_layer=len(authors_layers(layout)), n_head=layout.n_heads, n_inner=None,
        activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        chunks=layout.n_routed_blocks, num_bottom_layers=layout.n_bottom, num_top_layers=layout.n_top,
        require_anchor_layer=layout.anchors, num_attn=layout.n_attn, num_ffn=layout.n_ffn,
        depth_per_chunk=layout.depth, routing_top_k=layout.top_k, enable_pause=True,
        router_type=("gru" if layout.router == "gru" else "naive") + suffix,
        router_dim=layout.router_width, router_softmax_temperature=layout.temperature,
        weighted_qkv=False, use_ste=False, routing_all_possible_path=False,
        output_router_logits=True, router_aux_loss_coef=0.01, use_cache=False)


def momds_config(layout: Layout):
    from mom_ds.model.config import MoMConfig

    return MoMConfig(
        vocab_size=layout.vocab, n_positions=layout.seq, d_model=layout.d_model,
        n_heads=layout.n_heads, n_bottom=layout.n_bottom, n_routed_blocks=layout.n_routed_blocks,
        anchor_layers=layout.anchors, n_top=layout.n_top, n_attn_modules=layout.n_attn,
        n_ffn_modules=layout.n_ffn, depth=layout.depth, top_k=layout.top_k,
        router=layout.router, router_width=layout.router_width, temperature=layout.temperature,
        use_skip=True, skip_in_attention="zero", weighting=layout.weighting,
        weighted_qkv=False, balance_loss_coef=0.01, dropout=0.0)


# ---- their parameter names -> ours ---------------------------------------------------------
def authors_layers(layout: Layout) -> list[str]:
    """Our path for each of their transformer.h.<i>: bottom, then per routed block (their
    chunk) the block and its anchor, then top (GPT2MoTModel.__init__)."""
    paths = [f"bottom.{i}" for i in range(layout.n_bottom)]
    for c in range(layout.n_routed_blocks):
        paths.append(f"chunks.{c}")
        if layout.anchors:
            paths.append(f"anchors.{c}")
    return paths + [f"top.{i}" for i in range(layout.n_top)]


# Their vanilla layer (MoTLayer) and module pools (MoTBlock, one entry per module j):
# (their name under h.<i>, our name under the layer / under <pool>_modules.<j>, Conv1D).
# Conv1D stores (in, out), our nn.Linear layout (out, in): transposed.
_HALVES = (("mot_attn", "attn", (("attention_layernorm.{}weight", "ln.weight", False),
                                 ("attention_layernorm.{}bias", "ln.bias", False),
                                 ("c_attn.{}weight", "qkv.weight", True),
                                 ("c_attn.{}bias", "qkv.bias", False),
                                 ("c_proj.{}weight", "proj.weight", True),
                                 ("c_proj.{}bias", "proj.bias", False))),
           ("mot_ffn", "ffn", (("ffn_layernorm.{}weight", "ln.weight", False),
                               ("ffn_layernorm.{}bias", "ln.bias", False),
                               ("c_fc.{}weight", "fc.weight", True),
                               ("c_fc.{}bias", "fc.bias", False),
                               ("c_proj.{}weight", "proj.weight", True),
                               ("c_proj.{}bias", "proj.bias", False))))
# Their GRUTokenRouter: x2h/h2h hold the (r, z, n) gates in nn.GRUCell's order; `router` is
# the head. Their TokenRouter ("naive"): router = Sequential(Linear, ReLU, Linear).
_ROUTER = {"gru": (("x2h", "cell", "ih"), ("h2h", "cell", "hh"), ("router", "head", "")),
           "mlp": (("router.0", "hidden", ""), ("router.2", "head", ""))}


def name_map(layout: Layout) -> dict[str, tuple[str, bool]]:
    """Their parameter name -> (our name as MoMForCausalLM.per_module_tensors() has it,
    transpose). lm_head is tied to wte on both sides and not listed."""
    out = {"transformer.wte.weight": ("wte.weight", False),
           "transformer.wpe.weight": ("wpe.weight", False),
           "transformer.ln_f.weight": ("ln_f.weight", False),
           "transformer.ln_f.bias": ("ln_f.bias", False)}
    pools = {"attn": layout.n_attn, "ffn": layout.n_ffn}
    for i, path in enumerate(authors_layers(layout)):
        routed = path.startswith("chunks.")
        for theirs, half, tensors in _HALVES:
            prefix = f"transformer.h.{i}.{theirs}."
            for j in range(pools[half]) if routed else [None]:
                ours = f"{path}.{half}_modules.{j}." if routed else f"{path}.{half}."
                for their_name, our_name, conv in tensors:
                    slot = f"{j}." if routed else ""
                    out[prefix + their_name.format(slot)] = (ours + our_name, conv)
            if routed:
                for their_mod, our_mod, gru_part in _ROUTER[layout.router]:
                    for p in ("weight", "bias"):
                        ours = f"{path}.{half}_router.{our_mod}."
                        ours += f"{p}_{gru_part}" if gru_part else p
                        out[f"{prefix}router.{their_mod}.{p}"] = (ours, False)
    return out


def map_state(state: dict[str, torch.Tensor], layout: Layout,
              targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Their state dict -> {our name: tensor in our layout}, every tensor on both sides used
    exactly once and every shape checked; `targets` are ours (name -> tensor or shape)."""
    names = name_map(layout)
    state = dict(state)
    lm_head = state.pop("lm_head.weight", None)
    if lm_head is not None and not torch.equal(lm_head, state.get("transformer.wte.weight")):
        raise BenchError("their lm_head.weight is not tied to transformer.wte.weight; ours is. "
                         "Fix: keep tie_word_embeddings on (GPT2Config's default).")
    unknown = sorted(set(state) - set(names))
    missing = sorted(set(names) - set(state))
    if unknown or missing:
        raise BenchError(f"their parameters do not match the layout: unexpected {unknown[:3]}, "
                         f"missing {missing[:3]} ({len(unknown)} / {len(missing)} in all). Fix: "
                         "the layout flags must describe their model (or their code changed).")
    mapped = {}
    for theirs, (ours, transpose) in names.items():
        if ours not in targets:
            raise BenchError(f"{theirs} maps to {ours}, which MoMForCausalLM does not have. Fix: "
                             "update name_map in bench/vs_authors.py to mom-ds's current names.")
        tensor = state[theirs].t() if transpose else state[theirs]
        if tuple(tensor.shape) != tuple(targets[ours].shape):
            raise BenchError(f"{theirs} {tuple(tensor.shape)} does not fit {ours} "
                             f"{tuple(targets[ours].shape)}. Fix: update name_map.")
        mapped[ours] = tensor
    uncovered = sorted(set(targets) - set(mapped))
    if uncovered:
        raise BenchError(f"mom-ds parameters no weight of theirs maps to: {uncovered[:3]} "
                         f"({len(uncovered)} in all). Fix: update name_map.")
    return mapped


# ---- the comparison ------------------------------------------------------------------------
def decision_labels(layout: Layout) -> list[str]:
    """One label per router call, in the order both models make them."""
    return [f"routed block {c}, step {h}, {half} router" for c in range(layout.n_routed_blocks)
            for h in range(layout.depth) for half in ("attention", "FFN")]


def first_mismatch(theirs: list[torch.Tensor], ours: list[torch.Tensor], layout: Layout,
                   probs: list[torch.Tensor] | None = None) -> str | None:
    """The first router call and token whose chosen set differs (K ids per token, order
    within the K ignored), with their probabilities of both choices; None if all equal."""
    labels = decision_labels(layout)
    if len(theirs) != len(ours) or len(ours) != len(labels):
        return (f"{len(theirs)} router calls in theirs, {len(ours)} in ours, {len(labels)} "
                "expected")
    for n, (a, b) in enumerate(zip(theirs, ours)):
        a, b = a.sort(dim=-1).values, b.sort(dim=-1).values
        rows = (a != b).any(dim=-1).nonzero()
        if len(rows):
            r = int(rows[0])
            where = f"{labels[n]}, token (batch {r // layout.seq}, position {r % layout.seq})"
            detail = ""
            if probs is not None:
                p = probs[n][r]
                detail = (f"; their scores there: theirs {p[a[r]].tolist()}, ours "
                          f"{p[b[r]].tolist()}")
            return (f"{where}: they chose {a[r].tolist()}, mom-ds chose {b[r].tolist()} "
                    f"({len(rows)} tokens differ in this call){detail}")
    return None


# ---- workers: one per venv, pickled messages over pipes -------------------------------------
def _send(stream, obj) -> None:
    data = pickle.dumps(obj, protocol=4)
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()


def _recv(stream):
    head = stream.read(8)
    if len(head) < 8:
        raise EOFError
    return pickle.loads(stream.read(struct.unpack("<Q", head)[0]))


def import_authors(authors_dir: Path) -> types.ModuleType:
    """Their mom/model.py as package `mom_authors`, its `.configuration_gpt_mot` import
    answered by their mom/config.py (the name the release lacks), nothing edited."""
    package = types.ModuleType("mom_authors")
    package.__path__ = [str(authors_dir / "mom")]
    sys.modules["mom_authors"] = package
    sys.modules["mom_authors.configuration_gpt_mot"] = importlib.import_module("mom_authors.config")
    return importlib.import_module("mom_authors.model")


class AuthorsSide:
    def __init__(self, authors_dir: Path):
        self.code = import_authors(authors_dir)

    def build(self, layout: Layout, seed: int) -> dict:
        torch.manual_seed(seed)
        config = self.code.GPT2Config(**authors_config(layout))
        self.model = self.code.GPT2MoTLMHeadModel(config).train()
        self.top_k = layout.top_k
        return {n: p.detach().clone() for n, p in self.model.named_parameters()}

    def forward(self, ids: torch.Tensor) -> dict:
        with torch.no_grad():
            out = self.model(input_ids=ids, labels=ids, use_cache=False)
        # their routing_scores are exactly what their topk ran on; the same topk names the ids
        scores = [s.reshape(ids.numel(), -1) for pair in out.routing_scores for s in pair]
        decisions = [torch.topk(s, min(self.top_k, s.shape[-1]), dim=-1).indices for s in scores]
        return dict(logits=out.logits, lm_loss=float(out.loss), decisions=decisions,
                    probs=scores)

    def step(self, ids: torch.Tensor) -> None:
        # their Trainer.compute_loss (train.py): loss + coef * aux_loss
        out = self.model(input_ids=ids, labels=ids, use_cache=False)
        (out.loss + self.model.router_aux_loss_coef * out.aux_loss).backward()


class MomdsSide:
    def build(self, layout: Layout, state: dict) -> None:
        from mom_ds import MoMForCausalLM
        from mom_ds.config import RunConfig
        from mom_ds.parallel.parallelize import parallelize

        self.model = MoMForCausalLM(momds_config(layout)).train()
        # as training runs it, but for the optimizer: the authors' recipe on both sides
        parallelize(self.model, RunConfig.of_model(self.model.config), training=False)
        targets = self.model.per_module_tensors()
        with torch.no_grad():
            for name, tensor in map_state(state, layout, targets).items():
                targets[name].copy_(tensor)  # a pool's views write into its stacked tensors
        self.decisions: list[torch.Tensor] = []
        self.recording = False
        self.hooks = [router.register_forward_hook(self._record)
                      for block in self.model.chunks
                      for router in (block.attn_router, block.ffn_router)]

    def _record(self, module, args, output) -> None:
        if self.recording:
            self.decisions.append(output[0].ids.detach().clone())

    @staticmethod
    def labels(ids: torch.Tensor) -> torch.Tensor:
        # ours takes shifted targets (nanoGPT's X/Y); theirs shifts inside: same tokens scored
        return torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)

    def forward(self, ids: torch.Tensor) -> dict:
        self.recording, self.decisions = True, []
        with torch.no_grad():
            out = self.model(ids, labels=self.labels(ids))
        self.recording = False
        return dict(logits=out.logits, lm_loss=float(out.lm_loss), decisions=self.decisions)

    def step(self, ids: torch.Tensor) -> None:
        self.recording = False
        self.model(ids, labels=self.labels(ids)).loss.backward()


def serve(side: str, authors_dir: str | None, threads: int) -> None:
    """A worker: answers the driver's messages until its stdin closes. Anything the imported
    code prints goes to stderr; fd 1 carries only the replies."""
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    torch.set_num_threads(threads)
    requests = sys.stdin.buffer
    # the versions come back even when their code fails to import: the driver names the
    # version problem (and its fix) before the import error it causes
    hello = {"ok": True, "torch": torch.__version__, "threads": torch.get_num_threads(),
             "transformers": _transformers_version()}
    try:
        model = AuthorsSide(Path(authors_dir)) if side == "authors" else MomdsSide()
    except Exception as exc:
        hello["failed"] = f"{type(exc).__name__}: {exc}"
    _send(replies, hello)
    if "failed" in hello:
        return
    while True:
        try:
            msg = _recv(requests)
        except EOFError:
            return
        try:
            _send(replies, {"ok": True, "value": _handle(model, msg)})
        except BenchError as exc:
            _send(replies, {"ok": False, "error": str(exc)})
        except Exception as exc:
            import traceback
            _send(replies, {"ok": False, "error": traceback.format_exc(limit=-3) + str(exc)})


def _transformers_version() -> str:
    try:
        return importlib.import_module("transformers").__version__
    except ImportError:
        return "absent"


def _handle(side, msg: dict):
    op = msg["op"]
    if op == "build":
        return side.build(Layout(**msg["layout"]), msg["arg"])
    if op == "forward":
        return side.forward(msg["ids"])
    if op == "optimizer":
        side.ids = msg["ids"]
        side.opt = torch.optim.AdamW(side.model.parameters(), lr=msg["lr"], betas=(0.9, 0.95),
                                     eps=1e-5, weight_decay=0.1)  # the authors' recipe
        return None
    if op == "time":
        seconds = []
        for _ in range(msg["steps"]):
            start = time.perf_counter()
            side.opt.zero_grad(set_to_none=True)
            side.step(side.ids)
            side.opt.step()
            seconds.append(time.perf_counter() - start)
        return seconds
    if op == "profile":
        return _profile(side)
    raise ValueError(f"unknown op {op}")


def _profile(side) -> dict[str, tuple[float, int]]:
    """One training step under torch.profiler: {op: (self CPU ms, calls)}."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        side.opt.zero_grad(set_to_none=True)
        side.step(side.ids)
        side.opt.step()
    return {e.key: (e.self_cpu_time_total / 1000, e.count) for e in prof.key_averages()}


# ---- the driver ----------------------------------------------------------------------------
class Worker:
    def __init__(self, name: str, python: str, argv: list[str]):
        self.name = name
        try:
            self.proc = subprocess.Popen([python, str(HERE), *argv], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, cwd=str(HERE.parent.parent))
        except OSError as exc:
            raise BenchError(f"cannot run {python} ({exc.strerror}). Fix: the python of a venv "
                             "with transformers 4.40.x, or --make-venv DIR.") from None
        self.hello = self._reply(f"starting ({python})")

    def _reply(self, what: str):
        try:
            reply = _recv(self.proc.stdout)
        except EOFError:
            raise BenchError(f"the {self.name} worker exited while {what} (its stderr is above). "
                             "Fix: run that python by hand to see why.") from None
        if not reply["ok"]:
            raise BenchError(f"{self.name} worker, {what}: {reply['error']}")
        return reply.get("value", reply)

    def call(self, op: str, **kwargs):
        _send(self.proc.stdin, {"op": op, **kwargs})
        return self._reply(op)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def make_venv(directory: Path) -> Path:
    """DIR/bin/python with transformers 4.40.x and this venv's torch (a .pth file appends our
    site-packages after its own, so its transformers and their pins win)."""
    python = directory / "bin" / "python"
    if not python.exists():
        print(f"creating {directory} (pip install transformers==4.40.*)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(directory)], check=True)
        pip = subprocess.run([str(python), "-m", "pip", "install", "-q", "transformers==4.40.*"])
        if pip.returncode:
            raise BenchError(f"pip could not install transformers==4.40.* into {directory}. "
                             "Fix: check the network / package index, delete the folder, rerun.")
    (directory / ".gitignore").write_text("*\n")  # harmless if made inside a checkout
    torch_site = Path(torch.__file__).resolve().parent.parent
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], capture_output=True, text=True)
    if site.returncode or not Path(site.stdout.strip()).is_dir():
        raise BenchError(f"{python} does not run or has no site-packages. Fix: delete {directory} "
                         "and rerun with --make-venv, or pass --authors-python.")
    (Path(site.stdout.strip()) / "zz_mom_ds_torch.pth").write_text(f"{torch_site}\n")
    return python


def check_args(args) -> str:
    """The authors' checkout and interpreter, checked before any worker starts."""
    model_py = Path(args.authors_dir) / "mom" / "model.py"
    if not model_py.is_file():
        raise BenchError(f"--authors-dir {args.authors_dir}: no mom/model.py there. Fix: pass the "
                         "root of a checkout of github.com/gzhch/Mixture-of-Modules (git clone "
                         "https://github.com/gzhch/Mixture-of-Modules).")
    if not (args.authors_python or args.make_venv):
        raise BenchError("no interpreter for their code. Fix: --authors-python PATH/bin/python "
                         "(a venv with transformers 4.40.x and torch) or --make-venv DIR.")
    python = make_venv(Path(args.make_venv)) if args.make_venv else Path(args.authors_python)
    if not python.is_file():
        raise BenchError(f"--authors-python {python}: no such file. Fix: the python of a venv "
                         "with transformers 4.40.x, or --make-venv DIR to create one.")
    return str(python)


def check_versions(theirs: dict, ours: dict, python: str) -> None:
    if "failed" in ours:
        raise BenchError(f"mom-ds could not be loaded in {sys.executable}: {ours['failed']}")
    if not theirs["transformers"].startswith(AUTHORS_TRANSFORMERS):
        raise BenchError(f"{python} has transformers {theirs['transformers']}; their code needs "
                         "4.40.x. Fix: --make-venv DIR (or pip install 'transformers==4.40.*').")
    if theirs["torch"] != ours["torch"]:
        raise BenchError(f"{python} has torch {theirs['torch']}, mom-ds's venv {ours['torch']}: "
                         "the timing would compare two torch builds. Fix: --make-venv DIR.")
    if "failed" in theirs:
        raise BenchError(f"their code did not import under {python}: {theirs['failed']}. Fix: "
                         "--authors-dir must be an unmodified checkout of their repository.")


def verify(authors: Worker, momds: Worker, layout: Layout, seed: int, ids) -> str:
    """Same weights, then logits and every routing decision equal; returns the check's line."""
    spec = dataclasses.asdict(layout)  # a dict crosses the pipe whatever module defines Layout
    momds.call("build", layout=spec, arg=authors.call("build", layout=spec, arg=seed))
    theirs, ours = authors.call("forward", ids=ids), momds.call("forward", ids=ids)
    mismatch = first_mismatch(theirs["decisions"], ours["decisions"], layout, theirs["probs"])
    if mismatch:
        raise BenchError(f"K = {layout.top_k}: routing differs, so nothing is timed. First "
                         f"mismatch: {mismatch}")
    diff = (theirs["logits"] - ours["logits"]).abs()
    scale = theirs["logits"].abs().max().item()
    if diff.max().item() > 1e-4 * max(1.0, scale):
        at = [int(i) for i in torch.unravel_index(diff.argmax(), diff.shape)]
        raise BenchError(f"K = {layout.top_k}: logits differ by up to {diff.max().item():.3g} "
                         f"(batch {at[0]}, position {at[1]}, token {at[2]}), so nothing is timed.")
    calls = len(ours["decisions"])
    return (f"K = {layout.top_k}: logits max |diff| {diff.max().item():.1e} (max |logit| "
            f"{scale:.2f}), CE {theirs['lm_loss']:.5f} vs {ours['lm_loss']:.5f}, {calls} router "
            f"calls x {ids.numel()} tokens: every decision equal")


def time_pairs(authors: Worker, momds: Worker, ids, args) -> list[tuple[float, float, str]]:
    for w in (authors, momds):
        w.call("optimizer", ids=ids, lr=args.lr)
        w.call("time", steps=args.warmup)  # AdamW state, allocator, first-call costs
    pairs = []
    for n in range(args.pairs):
        order = (momds, authors) if n % 2 == 0 else (authors, momds)
        t = {w.name: statistics.median(w.call("time", steps=args.steps)) for w in order}
        pairs.append((t["mom-ds"], t["authors"], "".join(w.name[0].upper() for w in order)))
    return pairs


def print_table(rows: dict[int, list], checks: list[str], load: tuple, layout: Layout,
                hello: dict, args) -> None:
    print(f"\nmom-ds vs the authors' mom/model.py: one training step (forward + backward + "
          f"AdamW, lr {args.lr}), torch {hello['torch']} ({hello['threads']} threads), theirs "
          f"under transformers {hello['transformers']}")
    print(f"model: {layout.describe()}")
    for line in checks:
        print(f"check: {line}")
    print("\n| K | pair | order | mom-ds ms | authors ms | authors / mom-ds |")
    print("|---|---|---|---|---|---|")
    for k, pairs in rows.items():
        for n, (ours, theirs, order) in enumerate(pairs):
            print(f"| {k} | {n + 1} | {order} | {ours * 1e3:.0f} | {theirs * 1e3:.0f} | "
                  f"{theirs / ours:.3f} |")
        ratios = [t / o for o, t, _ in pairs]
        print(f"| {k} | median | | {statistics.median(o for o, _, _ in pairs) * 1e3:.0f} | "
              f"{statistics.median(t for _, t, _ in pairs) * 1e3:.0f} | "
              f"**{statistics.median(ratios):.3f}** (range {min(ratios):.3f} - "
              f"{max(ratios):.3f}) |")
    before, after = load
    print(f"\nload average (1, 5, 15 min): before {' '.join(f'{x:.2f}' for x in before)}, "
          f"after {' '.join(f'{x:.2f}' for x in after)}; {os.cpu_count()} CPUs; order M = mom-ds "
          "first; target authors / mom-ds >= 1.3 at K = 1 and K = 2 (issue 24)")


def print_profile(k: int, theirs: dict, ours: dict, top: int) -> None:
    """The ops whose self CPU time differs most between the two steps."""
    names = sorted(set(theirs) | set(ours),
                   key=lambda n: -abs(ours.get(n, (0, 0))[0] - theirs.get(n, (0, 0))[0]))
    print(f"\nprofile, K = {k}, one step (self CPU ms, calls), largest differences first:")
    print("| op | mom-ds ms | calls | authors ms | calls |")
    print("|---|---|---|---|---|")
    for n in names[:top]:
        (a, ac), (b, bc) = ours.get(n, (0, 0)), theirs.get(n, (0, 0))
        print(f"| {n} | {a:.1f} | {ac} | {b:.1f} | {bc} |")
    # the matrix products are the same on both sides: their share bounds what the rest can win
    gemm = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
    for label, keep in (("GEMMs (mm, addmm, bmm)", lambda n: n in gemm),
                        ("everything else", lambda n: n not in gemm)):
        print(f"| {label} | {sum(v[0] for n, v in ours.items() if keep(n)):.1f} | | "
              f"{sum(v[0] for n, v in theirs.items() if keep(n)):.1f} | |")


def parse(argv: list[str]):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--authors-dir", required=True, help="checkout of gzhch/Mixture-of-Modules")
    ap.add_argument("--authors-python", help="python of a venv with transformers 4.40.x + torch")
    ap.add_argument("--make-venv", metavar="DIR", help="create (or reuse) that venv here")
    ap.add_argument("--top-k", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--pairs", type=int, default=10)
    ap.add_argument("--steps", type=int, default=1, help="steps per timing (median taken)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--lr", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="after timing, profile one step of each and show N ops")
    defaults = Layout()
    for field in dataclasses.fields(Layout):
        if field.name == "top_k":
            continue
        flag = "--" + field.name.replace("_", "-")
        flag = "--" + flag[4:] if flag.startswith("--n-") else flag  # --n-attn -> --attn
        kind = {bool: lambda s: s.lower() in ("1", "true", "yes", "on")}.get(
            type(field.default), type(field.default))
        ap.add_argument(flag, dest=field.name, type=kind, default=getattr(defaults, field.name),
                        help=f"both models (default {getattr(defaults, field.name)})")
    args = ap.parse_args(argv)
    for name, least in (("pairs", 1), ("steps", 1), ("warmup", 0), ("threads", 1)):
        if getattr(args, name) < least:
            raise BenchError(f"--{name} {getattr(args, name)}: must be >= {least}.")
    if args.router not in ("gru", "mlp") or args.weighting not in ("renorm", "logit"):
        raise BenchError("--router is gru or mlp and --weighting renorm or logit (their "
                         "*_softmax routers renormalise, the others weight by raw logits).")
    return args


def run(argv: list[str]) -> None:
    args = parse(argv)
    python = check_args(args)
    fields = {f.name: getattr(args, f.name)
              for f in dataclasses.fields(Layout) if f.name != "top_k"}
    layouts = [Layout(**fields, top_k=k) for k in args.top_k]
    for layout in layouts:
        check_layout(layout)
    load_before = os.getloadavg()
    common = ["--threads", str(args.threads)]
    authors = Worker("authors", python, ["--worker", "authors", "--authors-dir",
                                         str(Path(args.authors_dir).resolve()), *common])
    momds = Worker("mom-ds", sys.executable, ["--worker", "mom-ds", *common])
    try:
        check_versions(authors.hello, momds.hello, python)
        ids = torch.randint(0, layouts[0].vocab, (layouts[0].batch, layouts[0].seq),
                            generator=torch.Generator().manual_seed(args.seed + 1))
        rows, checks, profiles = {}, [], {}
        for layout in layouts:
            checks.append(verify(authors, momds, layout, args.seed, ids))
            print(checks[-1], flush=True)
            rows[layout.top_k] = time_pairs(authors, momds, ids, args)
            if args.profile:
                profiles[layout.top_k] = (authors.call("profile"), momds.call("profile"))
        load_after = os.getloadavg()
    finally:
        authors.close()
        momds.close()
    hello = dict(authors.hello, threads=momds.hello["threads"])
    print_table(rows, checks, (load_before, load_after), layouts[0], hello, args)
    for k, (theirs, ours) in profiles.items():
        print_profile(k, theirs, ours, args.profile)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if torch is None:
        fix = ("--make-venv DIR makes one that borrows mom-ds's torch" if argv[:1] == ["--worker"]
               else "run this script with mom-ds's venv python")
        print(f"vs_authors: {sys.executable} has no torch. Fix: {fix}.", file=sys.stderr)
        return 2
    if argv[:1] == ["--worker"]:
        ap = argparse.ArgumentParser()
        ap.add_argument("--worker", choices=("authors", "mom-ds"))
        ap.add_argument("--authors-dir")
        ap.add_argument("--threads", type=int)
        w = ap.parse_args(argv)
        serve(w.worker, w.authors_dir, w.threads)
        return 0
    try:
        run(argv)
    except BenchError as exc:
        print(f"vs_authors: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
