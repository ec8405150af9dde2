"""`--section.key VALUE` overrides and `--print-config` in every command that builds or reads
a config (mom_ds/cli/args.py): each override does what the command's own flag for the same
thing does (or what the library call with that config gives), an override the command
would ignore is refused, --help lists choice fields' values, and --print-config prints the
config the command would use, as YAML, and exits 0."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from mom_ds.cli import assemble, convert, evaluate, generate, train
from mom_ds.config import RunConfig, load_run_config
from mom_ds.model import MoMForCausalLM
from mom_ds.model.hf import from_hf
from mom_ds.model.weights_file import load_weights
from mom_ds.checkpoints.format import write_weights
from mom_ds.train.run_data import data_fingerprint
from mom_ds_testing.runs import TINY


@pytest.fixture(scope="module")
def run_dir(data, tmp_path_factory) -> Path:
    """A weights-only checkpoint of the tiny MoM (random weights: every override below is
    compared with another way of asking for the same thing, not with a trained number)."""
    out = tmp_path_factory.mktemp("run")
    run = load_run_config(TINY, ["--data.data_dir", str(data), "--data.seq_len", "64",
                                 "--train.out_dir", str(out)])
    run.data.fingerprint = data_fingerprint(data)
    torch.manual_seed(0)
    weights = {n: p.detach() for n, p in MoMForCausalLM(run.model).named_parameters()}
    write_weights(out / "ckpt", 3, {"config": run.to_dict(), "step": 3}, weights)
    return out


@pytest.fixture(scope="module")
def donor(tmp_path_factory) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("donor")
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100,
                               n_positions=32)).save_pretrained(path)
    return path


def last_line(capsys) -> str:
    return capsys.readouterr().out.strip().splitlines()[-1]


def test_eval_overrides_act_as_its_flags(run_dir, data, capsys):
    assert evaluate.main([str(run_dir), "--max-windows", "4"]) == 0
    trained = last_line(capsys)
    assert evaluate.main([str(run_dir), "--max-windows", "4", "--top-k-modules", "2"]) == 0
    flag = last_line(capsys)
    # an override may stand before the positional argument too
    assert evaluate.main(["--model.top_k", "2", str(run_dir), "--max-windows", "4",
                          f"--data.data_dir={data}"]) == 0
    assert last_line(capsys) == flag != trained
    assert "2 module(s) per step" in flag
    # mom-eval's old name for K' still works, with a deprecation message
    assert evaluate.main([str(run_dir), "--max-windows", "4", "--top-k", "2"]) == 0
    out = capsys.readouterr()
    assert out.out.strip().splitlines()[-1] == flag
    assert "--top-k is deprecated here; it is --top-k-modules" in out.err


def test_generate_override_acts_as_its_flag(run_dir, capsys):
    common = [str(run_dir), "--prompt", "def f(", "--max-new-tokens", "12", "--temperature", "0"]
    assert generate.main([*common, "--top-k-modules", "2"]) == 0
    flag = capsys.readouterr().out
    assert generate.main([*common, "--model.top_k", "2"]) == 0
    assert capsys.readouterr().out == flag


def test_print_config_is_the_resolved_config(run_dir, data, tmp_path, capsys):
    args = ["--config", str(TINY), "--data.data_dir", str(data), "--train.lr", "5e-4",
            "--model.router=mlp", "--train.out_dir", str(tmp_path / "never")]
    assert train.main([*args, "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)  # stdout is the YAML alone
    assert printed == load_run_config(TINY, args[2:]).to_dict()
    assert printed["train"]["lr"] == 5e-4 and printed["model"]["router"] == "mlp"
    assert not (tmp_path / "never").exists()  # nothing started
    # no recipe: vocab_size comes from the data, said on stderr, the YAML alone on stdout
    assert train.main(["--data.data_dir", str(data), "--print-config"]) == 0
    out, err = capsys.readouterr()
    assert yaml.safe_load(out)["model"]["vocab_size"] == 320 and "model.vocab_size" in err

    assert evaluate.main([str(run_dir), "--model.depth", "2", "--print-config"]) == 0
    printed = RunConfig.from_dict(yaml.safe_load(capsys.readouterr().out))
    assert printed.model.depth == 2 and printed.data.data_dir == str(data)
    assert generate.main([str(run_dir), "--print-config"]) == 0  # no --prompt needed
    assert yaml.safe_load(capsys.readouterr().out)["model"]["depth"] == 4


def test_from_hf_takes_model_overrides(donor, tmp_path, capsys):
    out = tmp_path / "w.safetensors"
    assert convert.main(["from-hf", str(donor), str(out), "--model.dropout", "0.1"]) == 0
    saved = load_weights(out, "out")
    want = from_hf(str(donor))  # the vanilla preset: the same weights, dropout 0
    assert saved.model_config == {**want.config.to_dict(), "dropout": 0.1}
    for name, tensor in want.state_dict().items():
        assert torch.equal(saved.state_dict[name], tensor), name

    assert convert.main(["from-hf", str(donor), str(out), "--model.n_bottom", "1",
                         "--model.n_routed_blocks", "1", "--model.n_attn_modules", "1",
                         "--model.n_ffn_modules", "1", "--model.depth", "1",
                         "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)["model"]
    assert (printed["n_bottom"], printed["n_routed_blocks"], printed["d_model"]) == (1, 1, 32)

    # the example: the donor fixes the shape, so a different vocab_size is refused
    assert convert.main(["from-hf", str(donor), str(out), "--model.vocab_size", "128"]) == 2
    assert "but the donor's is 100" in capsys.readouterr().err


def test_from_hf_draws_what_the_donor_lacks_from_its_seed(donor, tmp_path):
    """The routers a donor does not hold come from --seed (default 0): the same command
    writes the same file (a two-stage run is reproducible from its recipe and seed), another
    seed other routers, the donor's tensors the same either way."""
    layout = ["--model.n_bottom", "1", "--model.n_routed_blocks", "1",
              "--model.n_attn_modules", "1", "--model.n_ffn_modules", "1", "--model.depth", "1"]
    files = {}
    for name, seed in (("a", []), ("b", []), ("c", ["--seed", "1"])):
        files[name] = tmp_path / f"{name}.safetensors"
        assert convert.main(["from-hf", str(donor), str(files[name]), *layout, *seed]) == 0
    a, b, c = (load_weights(f, "out").state_dict for f in files.values())
    routers = [k for k in a if "router" in k]
    assert routers and all(torch.equal(a[k], b[k]) for k in a)
    assert all(not torch.equal(a[k], c[k]) for k in routers if k.endswith("weight"))
    assert all(torch.equal(a[k], c[k]) for k in a if "router" not in k)


@pytest.mark.parametrize("argv, message", [
    # overrides a command would not use are refused, not ignored
    (lambda r: ["eval", str(r), "--train.lr", "1"],
     "--train.lr: mom-eval does not read it (the overrides it takes: --model.*, "
     "--data.data_dir, --data.seq_len)"),
    (lambda r: ["generate", str(r), "--prompt", "x", "--data.seq_len", "8"],
     "--data.seq_len: mom-generate does not read it"),
    (lambda r: ["convert", "to-hf", str(r), str(r / "hf"), "--model.depth", "2"],
     "mom-convert to-hf does not read it (the overrides it takes: none)"),
    (lambda r: ["assemble", str(r), "--list", "--model.depth", "2"],
     "--model.depth: mom-assemble does not read it"),
    # an override that changes the trained weights' shapes, and a bad choice
    (lambda r: ["eval", str(r), "--model.d_model", "32"],
     "the checkpoint's weights do not fit the changed model (size mismatch for wte.weight"),
    (lambda r: ["train", "--config", str(TINY), "--model.router", "lstm"],
     "model.router = 'lstm': is not one of ('gru', 'mlp', 'fixed')"),
    (lambda r: ["train", "--config", str(TINY), "--optim.lr", "1"], "unknown section 'optim'"),
])
def test_a_bad_override_is_one_error(run_dir, capsys, argv, message):
    command, *args = argv(run_dir)
    main = {"eval": evaluate, "generate": generate, "convert": convert, "assemble": assemble,
            "train": train}[command].main
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("module, wanted, absent", [
    (train, ["--train.precision {auto,bf16,fp32} (default 'auto')",
             "--model.router {gru,mlp,fixed} (default 'gru')",
             "--model.attn_router {gru,mlp,fixed,none} (default None)",
             "--parallel.backend {auto,nccl,gloo}", "--train.profile_steps list[int]",
             "--print-config"], []),
    (evaluate, ["--model.weighting {prob,renorm,logit}", "--data.seq_len int"],
     ["--train.", "--data.seed"]),
    (generate, ["--model.skip_in_attention {zero,mask}"], ["--data.", "--train."]),
    (assemble, ["--data.data_dir str"], ["--model."]),
])
def test_help_lists_the_overrides_and_choices(capsys, module, wanted, absent):
    with pytest.raises(SystemExit) as done:
        module.main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert all(w in text for w in wanted), text
    assert not any(a in text for a in absent)


def test_from_hf_help_lists_model_overrides(capsys):
    with pytest.raises(SystemExit):
        convert.main(["from-hf", "--help"])
    text = capsys.readouterr().out
    assert "--model.router {gru,mlp,fixed}" in text and "--print-config" in text
