"""`mom-convert to-hf` for every preset: the exported directory loads with transformers alone
(a subprocess in which mom_ds and data_prep cannot be imported) and gives mom-ds's logits,
loss and greedy generate() output; bad targets and incomplete directories are one error.
test_hf_export_hf4.py runs the same check under transformers 4.x."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_prep.tokenizer import load_tokenizer
from data_prep.tokenizer_export import save_tokenizer, transformers_tokenizer
from mom_ds import MoMConfig, MoMForCausalLM
from mom_ds.model.hf_export import ExportError, check_exported, to_hf
from mom_ds.model.presets import preset

SHAPE = dict(vocab_size=257, n_positions=48, d_model=32, n_heads=2, router_width=16)
# Every preset, and MoM across routers, SKIP modes and layouts.
MODELS = {
    "vanilla": preset("vanilla", n_layer=2, **SHAPE),
    "vanilla_routed": preset("vanilla_routed", n_layer=2, **SHAPE),
    "shared_layers": preset("shared_layers", n_steps=3, **SHAPE),
    "moe": preset("moe", n_layer=2, n_experts=4, top_k=2, **SHAPE),
    "early_exit": preset("early_exit", n_layer=3, **SHAPE),
    "mod": preset("mod", n_layer=4, capacity=0.25, every=2, **SHAPE),
    "mom_gru": preset("mom", n_attn_modules=3, n_ffn_modules=4, depth=3, top_k=2, **SHAPE),
    "mom_mlp_mask": preset("mom", router="mlp", skip_in_attention="mask", weighted_qkv=True,
                           depth=2, **SHAPE),
    "mom_layout": preset("mom", n_bottom=1, n_routed_blocks=2, anchor_layers=True, n_top=1, depth=2,
                         top_k=2, weighting="renorm", **SHAPE),
    "mom_mod": MoMConfig(n_bottom=2, mod_capacity=0.5, mod_every=2, n_routed_blocks=1, depth=2,
                         **SHAPE),
}
# The llama block family: grouped-query attention, an untied head, Qwen2's Q/K/V biases.
LLAMA = dict(SHAPE, block="llama", n_heads=4, n_kv_heads=2, ffn_hidden=40, rope_theta=500.0)
MODELS.update({
    "llama_vanilla": preset("vanilla", n_layer=2, tie_word_embeddings=False, **LLAMA),
    "qwen2_vanilla": preset("vanilla", n_layer=2, qkv_bias=True, **LLAMA),
    "llama_mom": preset("mom", n_bottom=1, depth=2, top_k=2, tie_word_embeddings=False, **LLAMA),
    "llama_moe": preset("moe", n_layer=2, n_experts=4, top_k=2, qkv_bias=True, **LLAMA),
    "llama_mod": preset("mod", n_layer=4, capacity=0.25, every=2, **LLAMA),
})
# The vanilla presets export as their family's own transformers model, no remote code.
PLAIN = {"vanilla": "GPT2LMHeadModel", "llama_vanilla": "LlamaForCausalLM",
         "qwen2_vanilla": "Qwen2ForCausalLM"}
PROMPT_TOKENS, NEW_TOKENS, PAD = 10, 12, 4
GPT2_TEXT = "Hello world! It's 2026:  naïve café —\n\n\tdon't we'll 12345 x"

LOAD_WITHOUT_MOM_DS = """
import sys
sys.modules["mom_ds"] = None      # import mom_ds -> ImportError: transformers alone
sys.modules["data_prep"] = None
import json, torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
ids = torch.load(sys.argv[2])
results = {"version": transformers.__version__}
for name in json.loads(sys.argv[1]):
    directory = sys.argv[3] + "/" + name
    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=True)
    with torch.no_grad():
        out = model(ids, labels=ids)
    # the second prompt %(pad)d tokens shorter, padded on the left
    batch, mask = ids[:, :%(prompt)d].clone(), torch.ones_like(ids[:, :%(prompt)d])
    batch[1, :%(pad)d], mask[1, :%(pad)d] = tokenizer.pad_token_id, 0
    padded = model.generate(batch, attention_mask=mask, max_new_tokens=%(new)d, do_sample=False)
    with torch.no_grad():  # GPT-2 takes its positions from position_ids, mom-ds from the mask
        padded_logits = model(batch, attention_mask=mask,
                              position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
    # the length of each forward's input: one token a step once the prompt is cached
    lengths = []
    model.register_forward_pre_hook(lambda _, args, kwargs: lengths.append(
        (args[0] if args else kwargs["input_ids"]).shape[1]), with_kwargs=True)
    new = model.generate(ids[:, :%(prompt)d], max_new_tokens=%(new)d, do_sample=False)
    results[name] = {"class": type(model).__name__, "logits": out.logits, "loss": out.loss,
                     "generated": new, "lengths": lengths, "padded": padded[:, %(prompt)d:],
                     "padded_logits": padded_logits[1, %(pad)d:],
                     "text": tokenizer.decode(tokenizer("Hello, world")["input_ids"])}
torch.save(results, sys.argv[4])
""" % dict(prompt=PROMPT_TOKENS, new=NEW_TOKENS, pad=PAD)


def byte_tokenizer():
    return transformers_tokenizer(load_tokenizer("bytes"))


def mom_ds_outputs(model: MoMForCausalLM, ids: torch.Tensor) -> dict:
    """What mom-ds itself computes: logits, the loss on the next tokens, greedy generation."""
    targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    with torch.no_grad():
        out = model(ids, labels=targets)
        short = model(ids[1:, PAD:PROMPT_TOKENS]).logits[0]
    new = model.generate(ids[:, :PROMPT_TOKENS], NEW_TOKENS, temperature=0, eos_token_id=256)
    # each prompt of the padded batch alone; a row that ends first goes on with end-of-text
    alone = [model.generate(prompt[None], NEW_TOKENS, temperature=0, eos_token_id=256)
             [0, len(prompt):].tolist()
             for prompt in (ids[0, :PROMPT_TOKENS], ids[1, PAD:PROMPT_TOKENS])]
    width = max(map(len, alone))
    padded = [row + [256] * (width - len(row)) for row in alone]
    return {"logits": out.logits, "loss": out.lm_loss, "generated": new, "padded": padded,
            "padded_logits": short}


def export_and_load(root: Path, python: str) -> tuple[dict, dict]:
    """Every model exported under root, then loaded and run once by `python` in a process
    without mom_ds: (mom-ds's outputs, that process's outputs and its transformers version).
    The process gets its own modules cache: copies of the modeling files left there by
    another run (or another transformers) would hide a file the export lacks."""
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (2, 24))
    torch.save(ids, root / "ids.pt")
    expected = {}
    for name, config in MODELS.items():
        torch.manual_seed(1)
        model = MoMForCausalLM(config).eval()
        to_hf(model, root / name, byte_tokenizer())
        expected[name] = mom_ds_outputs(model, ids)
    proc = subprocess.run([python, "-c", LOAD_WITHOUT_MOM_DS, json.dumps(list(MODELS)),
                           str(root / "ids.pt"), str(root), str(root / "got.pt")],
                          capture_output=True, text=True, timeout=600, cwd=root,
                          env={**os.environ, "HF_MODULES_CACHE": str(root / "modules")})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return expected, torch.load(root / "got.pt", weights_only=False)


def check_same_outputs(name: str, want: dict, have: dict, directory: Path) -> None:
    """The loaded export gives mom-ds's logits, loss and greedy tokens, generates with its
    cache, scores and continues a left-padded batch as mom-ds does each prompt alone, and its
    tokenizer round-trips text; the directory holds no pickle."""
    assert have["class"] == PLAIN.get(name, "MoMHFForCausalLM")
    torch.testing.assert_close(have["logits"], want["logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(have["loss"], want["loss"], atol=1e-5, rtol=1e-5)
    assert have["generated"].tolist() == want["generated"].tolist()
    torch.testing.assert_close(have["padded_logits"], want["padded_logits"], atol=1e-5,
                               rtol=1e-5)
    assert have["padded"].tolist() == want["padded"], "padded batch != each prompt alone"
    assert have["lengths"] == [PROMPT_TOKENS] + [1] * (NEW_TOKENS - 1)
    assert have["text"] == "Hello, world"
    files = {p.name for p in directory.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    assert ("modeling_mom.py" in files) == (name not in PLAIN)
    assert not any(p.suffix in (".bin", ".pt") for p in directory.iterdir())


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    return (root, *export_and_load(root, sys.executable))


@pytest.mark.parametrize("name", list(MODELS))
def test_export_loads_with_transformers_alone_and_matches(exported, name):
    root, expected, got = exported
    check_same_outputs(name, expected[name], got[name], root / name)


def test_shipped_code_is_mom_ds_own(exported):
    """The modeling files are copies of mom_ds/model, with a header naming their source.
    modeling_mom.py then names every other file in a `from .x import` line that never runs:
    transformers 4.x copies only the files the modeling file itself imports so."""
    root, _, _ = exported
    package = Path(__file__).resolve().parents[2] / "mom_ds" / "model"
    files = {path.stem for path in (root / "mom_gru").glob("*.py")}
    for path in (root / "mom_gru").glob("*.py"):
        source = (package / ("hf_modeling.py" if path.name == "modeling_mom.py" else path.name)
                  ).read_text()
        header, body = path.read_text().split("\n", 1)
        assert header.startswith("# Generated by mom-convert to-hf") and body.startswith(source)
        if path.name == "modeling_mom.py":
            added = body[len(source):]
            assert re.search(r"^if False:$", added, re.MULTILINE)
            named = re.findall(r"^\s*from \.(\w+) import", body, re.MULTILINE)
            assert set(named) == files - {"modeling_mom"}
        else:
            assert body == source


def test_gpt2_tokenizer_round_trip(shared_gpt2_tokenizer_dir, tmp_path):
    """The exported GPT-2 tokenizer gives tiktoken's ids (the data's own encoding)."""
    from transformers import AutoTokenizer

    ours = load_tokenizer(f"gpt2:{shared_gpt2_tokenizer_dir}")
    save_tokenizer(transformers_tokenizer(ours), tmp_path)
    theirs = AutoTokenizer.from_pretrained(tmp_path)
    assert theirs(GPT2_TEXT)["input_ids"] == ours.encode(GPT2_TEXT).tolist()
    assert theirs.decode(ours.encode(GPT2_TEXT).tolist()) == GPT2_TEXT
    assert theirs.eos_token_id == 50256


def test_export_into_a_non_empty_directory_is_refused(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("user data")
    with pytest.raises(ExportError, match="not an empty directory.*Fix"):
        to_hf(MoMForCausalLM(MODELS["mom_gru"]), tmp_path / "taken", byte_tokenizer())
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"], "no temporary directory left"


@pytest.mark.parametrize("missing", ["model.safetensors", "tokenizer.json", "routers.py",
                                     "modeling_mom.py"])
def test_an_exported_directory_missing_a_file_is_named(tmp_path, missing):
    to_hf(MoMForCausalLM(MODELS["mom_gru"]), tmp_path / "out", byte_tokenizer())
    check_exported(tmp_path / "out")
    (tmp_path / "out" / missing).unlink()
    with pytest.raises(ExportError, match=f"lacks {missing}.*Fix: export it again"):
        check_exported(tmp_path / "out")
