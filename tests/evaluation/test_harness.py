"""lm-evaluation-harness on mom-ds models, offline: the harness's accuracy on a local task
equals a log-likelihood comparison computed here by hand (one unbatched forward per
choice), the three request kinds agree with hand computations, and mom-eval --tasks runs the
shipped mom_cloze task on a trained run."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is the optional extra "
                                "mom-ds[eval]")
from lm_eval.api.instance import Instance  # noqa: E402

from data_prep.tokenizer import load_tokenizer  # noqa: E402
from mom_ds.harness.lm import MoMHarnessLM  # noqa: E402
from mom_ds.model import MoMConfig, MoMForCausalLM  # noqa: E402
from mom_ds_testing.runs import mom_train, run_python, tiny_args, write_byte_data  # noqa: E402

TOKENIZER = load_tokenizer("bytes")
# MoM with a MoD layer: batches are padded, so the padding must change nothing
CONFIG = MoMConfig(vocab_size=257, n_positions=96, d_model=32, n_heads=2, n_bottom=2,
                   mod_capacity=0.5, mod_every=2, n_routed_blocks=1, n_attn_modules=3,
                   n_ffn_modules=3, depth=2, top_k=2, router_width=16)
DOCS = [
    {"question": "The cat sat on the", "choices": ["mat", "quantum", "of"], "answer": 0},
    {"question": "One, two,", "choices": ["three", "blue", "x", "seven"], "answer": 0},
    {"question": "def main():\n    return", "choices": ["0", "def", "("], "answer": 1},
    {"question": "Paris is in", "choices": ["France", "a", "the sea"], "answer": 2},
    {"question": "import", "choices": ["os", "sys", "torch"], "answer": 1},
    {"question": "Water is", "choices": ["wet", "dry"], "answer": 0},
]
TASK_YAML = """\
task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {jsonl}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def model() -> MoMForCausalLM:
    torch.manual_seed(3)
    return MoMForCausalLM(CONFIG).eval()


def hand_logprob(model: MoMForCausalLM, context: str, continuation: str) -> float:
    """log p(continuation | context): one forward of the whole text alone, no padding."""
    ctx, cont = list(context.encode()), list(continuation.encode())
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logits = model(ids[:, :-1], mod_routing="threshold").logits.float()
    logprobs = F.log_softmax(logits[0, len(ctx) - 1:], dim=-1)
    return float(logprobs.gather(1, torch.tensor(cont)[:, None]).sum())


def request(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_harness_accuracy_equals_a_hand_loglikelihood_comparison(model, tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tmp_path / "tiny_choice.yaml").write_text(TASK_YAML.format(jsonl=json.dumps(str(jsonl))))
    lm = MoMHarnessLM(model, TOKENIZER, batch_size=4)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=["tiny_choice"], log_samples=False, bootstrap_iters=0,
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False))
    hits = []
    for doc in DOCS:
        scores = [hand_logprob(model, doc["question"], " " + c) for c in doc["choices"]]
        hits.append(max(range(len(scores)), key=scores.__getitem__) == doc["answer"])
    assert 0 < sum(hits) < len(DOCS), "a comparison that is neither all right nor all wrong"
    assert results["results"]["tiny_choice"]["acc,none"] == pytest.approx(sum(hits) / len(DOCS))


def test_loglikelihood_batched_equals_each_alone(model):
    lm = MoMHarnessLM(model, TOKENIZER, batch_size=3)
    pairs = [(d["question"], " " + c) for d in DOCS for c in d["choices"]] + [("", "Hello")]
    got = lm.loglikelihood([request("loglikelihood", *p) for p in pairs])
    for (context, continuation), (score, _) in zip(pairs, got):
        if context:
            want = hand_logprob(model, context, continuation)
        else:  # an empty context is end-of-text (id 256)
            ids = torch.tensor([[256] + list(continuation.encode())])
            with torch.no_grad():
                logits = model(ids[:, :-1], mod_routing="threshold").logits.float()
            want = float(F.log_softmax(logits[0], -1).gather(1, ids[0, 1:, None]).sum())
        assert score == pytest.approx(want, abs=1e-4), (context, continuation)
    # the trailing space of a context moves to the continuation (as HFLM does)
    (a, _), (b, _) = lm.loglikelihood([request("loglikelihood", "Water is ", "wet"),
                                       request("loglikelihood", "Water is", " wet")])
    assert a == pytest.approx(b, abs=1e-5)


def test_loglikelihood_rolling_is_the_sum_over_every_token(model):
    lm = MoMHarnessLM(model, TOKENIZER, batch_size=2)
    short = "A short text."
    long = "x = 1\n" * 30  # 180 bytes: two windows of n_positions = 96
    got = lm.loglikelihood_rolling([request("loglikelihood_rolling", short),
                                    request("loglikelihood_rolling", long)])
    ids = torch.tensor([[256] + list(short.encode())])
    with torch.no_grad():
        logits = model(ids[:, :-1], mod_routing="threshold").logits.float()
    want = float(F.log_softmax(logits[0], -1).gather(1, ids[0, 1:, None]).sum())
    assert got[0] == pytest.approx(want, abs=1e-4)
    # the long text spans two windows: under a model that predicts uniformly (all weights
    # zero), every token is scored exactly once, log(1/257) each
    uniform = MoMForCausalLM(CONFIG).eval()
    with torch.no_grad():
        for p in uniform.parameters():
            p.zero_()
    total = MoMHarnessLM(uniform, TOKENIZER).loglikelihood_rolling(
        [request("loglikelihood_rolling", long)])[0]
    assert total == pytest.approx(len(long) * math.log(1 / 257), rel=1e-5)
    assert math.isfinite(got[1])


def test_generate_until_is_greedy_decoding_cut_at_the_stop(model):
    lm = MoMHarnessLM(model, TOKENIZER, batch_size=3)
    # different lengths in one batch: left-padded, each as it would be alone
    prompts = ["The cat sat", "One, two,", "The dog ran down the road", "Hi"]
    settings = {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False}
    got = lm.generate_until([request("generate_until", p, dict(settings)) for p in prompts])
    for prompt, text in zip(prompts, got):
        ids = torch.tensor([list(prompt.encode())])
        new = model.generate(ids, 12, temperature=0, eos_token_id=256)[0, ids.shape[1]:].tolist()
        new = new[:new.index(256)] if 256 in new else new
        want = TOKENIZER.decode(new).split("\n\n")[0]
        assert text == want, prompt


def plant_task_that_runs_code(tasks_dir, tmp_path):
    """What a downloaded run directory could hold: task YAMLs named mom_cloze (one sorted
    before mom_cloze.yaml) whose `!function` hooks and module write a marker file."""
    marker = tmp_path / "code-ran"
    tasks_dir.mkdir(parents=True)
    (tasks_dir / "hook.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('imported')\n"
        f"def docs(dataset):\n    Path({str(marker)!r}).write_text('called')\n"
        f"    return dataset\n")
    docs = tasks_dir / "three.jsonl"
    docs.write_text("".join(json.dumps({"context": "a", "choices": ["b", "c"], "gold": 0}) + "\n"
                            for _ in range(3)))
    evil = TASK_YAML.replace("tiny_choice", "mom_cloze").format(jsonl=docs) + \
        "process_docs: !function hook.docs\n"
    for name in ("a_mom_cloze.yaml", "mom_cloze.yaml"):
        (tasks_dir / name).write_text(evil.replace("{{question}}", "{{context}}")
                                      .replace("{{answer}}", "{{gold}}"))
    return marker


@pytest.mark.slow
def test_mom_eval_tasks_runs_the_shipped_task_and_names_unknown_tasks(tmp_path):
    data = write_byte_data(tmp_path / "data")
    run = tmp_path / "run"
    mom_train(*tiny_args(data, run, "--train.max_steps", "4", "--train.eval_interval", "4"))
    marker = plant_task_that_runs_code(run / "lm_eval" / "tasks", tmp_path)
    out = tmp_path / "results.json"
    proc = run_python(["-m", "mom_ds.cli.evaluate", str(run), "--tasks", "mom_cloze",
                       "--limit", "12", "--output", str(out), "--model.temperature", "0.5"],
                      timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the planted task neither ran its code nor replaced mom_cloze (it has 3 documents)
    assert not marker.exists(), marker.read_text()
    results = json.loads(out.read_text())
    acc = results["results"]["mom_cloze"]["acc,none"]
    assert 0 <= acc <= 1 and results["n-samples"]["mom_cloze"]["effective"] == 12
    # the standard error lm_eval prints for a mean of 12 zeros and ones, by hand
    assert results["results"]["mom_cloze"]["acc_stderr,none"] == \
        pytest.approx(math.sqrt(acc * (1 - acc) / 11))
    assert results["mom_ds"]["step"] == 4 and "mom_cloze" in proc.stdout
    assert results["mom_ds"]["model"]["temperature"] == 0.5  # the override reached the model
    # a name the harness does not know: one error with the close names, nothing written
    proc = run_python(["-m", "mom_ds.cli.evaluate", str(run), "--tasks", "lambada_opena",
                       "--output", str(tmp_path / "no.json")], timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "knows no task 'lambada_opena'" in proc.stderr and "lambada_openai" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "no.json").exists()
    # a hub task offline (conftest sets HF_DATASETS_OFFLINE): one error with the fix
    proc = run_python(["-m", "mom_ds.cli.evaluate", str(run), "--tasks", "arc_easy",
                       "--limit", "2", "--output", str(tmp_path / "no.json")], timeout=600)
    assert proc.returncode == 2 and "Fix: run where the Hugging Face hub is reachable" in \
        proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
