"""The paper's baselines and inference on a tiny model: self-training, the reranker, `reproduce`."""

import json
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from conftest import LENGTHS
from reftkit.commands.sample import correct_examples, example_from_sample, read_samples, summarize
from reftkit.config import EvalConfig, OfflineSTConfig, OnlineSTConfig, ReproduceConfig, RerankerConfig
from reftkit.data.prompts import IGNORE_INDEX
from reftkit.data.readers import DataError
from reftkit.data.records import Example
from reftkit.grading.cot import program_header, response_text
from reftkit.grading.reward_model import new_reranker, reranker_text, score_texts
from reftkit.trainers import offline_st
from reftkit.trainers.online_st import mixed_nll, train_online_st
from reftkit.trainers.reranker import pos_weight
from reftkit.training.device import make_accelerator


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sample_row(ex, output, correct):
    return {"id": ex.id, "output": output, "correct": correct, "extracted": ex.answer if correct else None}


def test_correct_samples_become_deduplicated_training_examples():
    ex = Example("q1", "Tom has 2 apples and buys 3. How many?", "ref", "5")
    rows = [{"index": 0, "output": "2 + 3 = 5\nTherefore, the answer is: 5", "correct": True},
            {"index": 0, "output": "2 + 3 = 5\nTherefore, the answer is: 5.0", "correct": True},  # same reasoning
            {"index": 0, "output": "2 * 3 = 6\nTherefore, the answer is: 5", "correct": True},
            {"index": 0, "output": "2 - 3\nTherefore, the answer is: -1", "correct": False}]
    kept = correct_examples(rows, [ex], "natural")
    assert [k.cot for k in kept] == ["2 + 3 = 5", "2 * 3 = 6"]
    assert response_text(kept[0]) == "2 + 3 = 5\nTherefore, the answer is: 5"  # trained on exactly this

    body = "    a = 2\n    return a + 3\n"
    program = example_from_sample(ex, body, "program")
    assert program.cot == body and response_text(program, "program") == body
    row = {"index": 0, "output": program_header(ex.question) + body, "correct": True}
    assert correct_examples([row], [ex], "program")[0].cot == body  # the header is not part of the target


def test_samples_file_errors_name_the_file_line_and_field(tmp_path, splits):
    train = splits[0]
    good = sample_row(train[0], "x", False)
    path = write_rows(tmp_path / "s.jsonl", [good, {**good, "id": "nope"}])
    with pytest.raises(DataError, match=r"s\.jsonl line 2: field 'id' = 'nope'"):
        read_samples(path, train)
    write_rows(path, [good, {"id": train[0].id, "output": "x"}])
    with pytest.raises(DataError, match=r"s\.jsonl line 2: field 'correct' is missing"):
        read_samples(path, train)
    assert read_samples(write_rows(path, [good]), train)[0]["index"] == 0


@pytest.mark.slow
def test_offline_st_trains_on_the_data_plus_distinct_correct_samples(tmp_path, splits, warm_checkpoint, monkeypatch):
    train = splits[0]
    correct = "Therefore, the answer is: " + train[0].answer
    rows = [sample_row(train[0], "a\n" + correct, True), sample_row(train[0], "a\n" + correct, True),
            sample_row(train[1], "b\n" + correct, True), sample_row(train[2], "wrong", False)]
    seen = {}

    def spy(cfg, data, eval_set=None):
        seen["data"] = data
        return real(cfg, data, eval_set)

    def spy_draw(*args, **kwargs):
        seen["drawn"] = real_draw(*args, **kwargs)
        return seen["drawn"]

    real, real_draw = offline_st.train_sft, offline_st.draw_samples
    monkeypatch.setattr(offline_st, "train_sft", spy)
    monkeypatch.setattr(offline_st, "draw_samples", spy_draw)
    cfg = OfflineSTConfig(model=str(warm_checkpoint), output_dir=tmp_path / "run",
                          samples_file=str(write_rows(tmp_path / "s.jsonl", rows)),
                          epochs=1, batch_size=16, lr=1e-3, eval_every_epoch=False, progress=False, **LENGTHS)
    final = offline_st.train_offline_st(cfg, train)
    assert len(seen["data"]) == len(train) + 2
    assert [e.cot for e in seen["data"][len(train):]] == ["a", "b"]
    assert (final / "model.safetensors").exists()

    # Without a samples file it draws num_samples per question from the model first.
    drawn = OfflineSTConfig(model=str(warm_checkpoint), output_dir=tmp_path / "drawn", num_samples=2, epochs=1,
                            batch_size=16, max_train_examples=8, eval_every_epoch=False, progress=False, **LENGTHS)
    offline_st.train_offline_st(drawn, train)
    drawn_rows = seen["drawn"]
    assert len(drawn_rows) == 16  # 8 questions x 2 samples
    assert seen["data"][:8] == train[:8]
    # Each question with a correct sample adds at least one example, each correct sample at most one.
    correct = [r for r in drawn_rows if r["correct"]]
    extra = seen["data"][8:]
    assert len({r["index"] for r in correct}) <= len(extra) <= len(correct)
    assert {e.id for e in extra} == {train[r["index"]].id for r in correct}


def test_mixed_nll_weighs_reference_and_own_tokens_as_configured():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 7)
    labels = torch.tensor([[IGNORE_INDEX, 1, 2, 3], [IGNORE_INDEX, IGNORE_INDEX, 4, 5], [IGNORE_INDEX, 6, 0, 1]])
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none",
                                            ignore_index=IGNORE_INDEX)
    ref = (nll[0].sum() + nll[1].sum()) / 5  # rows 0-1: 3 + 2 response tokens
    own = nll[2].sum() / 3
    got = mixed_nll(logits, labels, torch.tensor([False, False, True]), 0.25)
    assert got.item() == pytest.approx((0.75 * ref + 0.25 * own).item(), rel=1e-6)
    # No correct sample in the batch: the reference CoTs carry the whole loss.
    assert mixed_nll(logits, labels, torch.tensor([False, False, False]), 0.5).item() == pytest.approx(
        (nll.sum() / 8).item(), rel=1e-6)


@pytest.mark.slow
def test_online_st_trains_on_its_own_correct_samples(tmp_path, splits, warm_checkpoint):
    train, test = splits
    cfg = OnlineSTConfig(model=str(warm_checkpoint), output_dir=tmp_path, batch_size=8, num_samples=2, lr=1e-3,
                         max_train_examples=16, eval_batch_size=16, progress=False, **LENGTHS)
    final = train_online_st(cfg, train, test[:8])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "own_samples" in r]
    assert len(steps) == 2  # 16 questions / 8 per batch
    for r in steps:  # 8 questions x 2 samples; duplicates of one question's correct reasoning count once
        correct = round(r["train_accuracy"] * 16)
        assert r["train_accuracy"] * 16 == pytest.approx(correct, abs=1e-6)
        assert correct / 2 <= r["own_samples"] <= correct
    assert any(r["own_samples"] > 0 for r in steps)  # the warm-up model gets some right
    assert [r["epoch"] for r in rows if "eval_accuracy" in r] == [1]
    before, after = load_file(str(warm_checkpoint / "model.safetensors")), load_file(str(final / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_pos_weight_balances_the_classes():
    assert pos_weight([1, 0, 0, 0]) == 3.0
    assert pos_weight([1, 1, 0]) == 0.5
    assert pos_weight([1, 1]) == 1.0 and pos_weight([]) == 1.0


@pytest.mark.slow
def test_reranker_learns_to_score_correct_samples_higher(tmp_path, splits, warm_checkpoint):
    from reftkit.trainers.reranker import train_reranker

    train = splits[0]
    rows = []
    for ex in train[:24]:  # an easy signal: the reference solution vs. a wrong answer with no reasoning
        rows += [sample_row(ex, response_text(ex), True), sample_row(ex, "Therefore, the answer is: 0", False)]
    cfg = RerankerConfig(model=str(warm_checkpoint), output_dir=tmp_path / "run",
                         samples_file=str(write_rows(tmp_path / "s.jsonl", rows)),
                         epochs=4, batch_size=8, lr=3e-3, progress=False, **LENGTHS)
    final = train_reranker(cfg, train)
    model = AutoModelForSequenceClassification.from_pretrained(final)  # a plain HF classifier
    from reftkit.modeling.model import load_tokenizer

    tokenizer = load_tokenizer(str(final))
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id
    texts = [reranker_text(train[i // 2], r["output"]) for i, r in enumerate(rows)]
    scores = score_texts(make_accelerator(cfg), model, tokenizer, texts, batch_size=5, max_length=112)
    good, bad = scores[0::2], scores[1::2]
    assert sum(g > b for g, b in zip(good, bad, strict=True)) >= 20  # of 24 pairs
    # Batched, right-padded scores equal one-at-a-time scores.
    one = model(**{k: v for k, v in tokenizer(texts[:1], return_tensors="pt").items() if k != "token_type_ids"}).logits
    assert scores[0] == pytest.approx(one[0, 0].item(), abs=1e-4)


def test_new_reranker_starts_from_the_sft_weights(tiny_checkpoint):
    model = new_reranker(str(tiny_checkpoint), pad_token_id=0)
    sft = load_file(str(tiny_checkpoint / "model.safetensors"))
    key = next(k for k in sft if k.endswith("layers.0.mlp.up_proj.weight"))
    assert torch.equal(model.state_dict()[key], sft[key])


def reproduce_config(tmp_path, model, train_file, test_file, **kw):
    return ReproduceConfig(
        model=str(model), train_file=str(train_file), eval_file=str(test_file), data_format="reft",
        output_dir=tmp_path / "run", progress=False, eval_batch_size=32, **LENGTHS,
        warmup={"epochs": 2, "lr": 1e-2, "batch_size": 16}, sft={"epochs": 1, "lr": 1e-3},
        train_samples={"num_samples": 2, "max_eval_examples": 16}, offline_st={"epochs": 1, "lr": 1e-3},
        online_st={"batch_size": 8, "num_samples": 2, "lr": 1e-3, "max_train_examples": 8},
        reft={"batch_size": 8, "num_samples": 2, "lr": 1e-4, "max_train_examples": 8},
        reranker={"epochs": 1, "lr": 1e-3, "batch_size": 16}, eval={"num_samples": 2, "max_eval_examples": 8}, **kw)


@pytest.mark.slow
def test_reproduce_writes_the_table_and_skips_finished_stages(tmp_path, splits, tiny_checkpoint, monkeypatch):
    from reftkit.commands import reproduce

    files = []
    for name, examples in zip(("train", "test"), splits, strict=True):
        files.append(write_rows(tmp_path / f"{name}.jsonl", [{"item_id": e.id, "question": e.question,
                                                              "answer_cot": e.cot, "answer_value": e.answer}
                                                             for e in examples]))
    cfg = reproduce_config(tmp_path, tiny_checkpoint, *files,
                           methods=["sft", "offline_st", "online_st", "reft", "grpo", "reft_sft"])
    start = time.time()
    results = reproduce.run_reproduce(cfg)
    elapsed = time.time() - start
    out = cfg.output_dir
    assert list(results) == ["warm-up SFT", "SFT", "Offline-ST", "Online-ST", "ReFT", "GRPO", "ReFT + SFT term"]
    # The RL family shares ReFT's budget (8 questions x 2 samples) and logs what it sampled.
    assert not (out / "grpo" / "final" / "value_head.safetensors").exists()
    assert json.loads((out / "reft_sft" / "final" / "trainer_state.json").read_text())["config"]["sft_coef"] == 0.1
    for method in ("ReFT", "GRPO", "ReFT + SFT term"):
        assert 0 < results[method]["sampled_tokens"] <= 16 * (LENGTHS["max_length"] - LENGTHS["max_prompt_tokens"])
    assert results["SFT"]["sampled_tokens"] is None and "vs_reft" not in results["ReFT"]
    greedy_of = {m: {json.loads(line)["id"]: json.loads(line)["correct"] for line in
                     (out / "eval" / d / "greedy" / "predictions.jsonl").read_text().splitlines()}
                 for m, d in (("GRPO", "grpo"), ("ReFT", "reft"))}
    only_grpo = sum(greedy_of["GRPO"][i] and not greedy_of["ReFT"][i] for i in greedy_of["ReFT"])
    assert results["GRPO"]["vs_reft"]["only_a_right"] == only_grpo and 0 <= results["GRPO"]["vs_reft"]["mcnemar_p"] <= 1
    for r in results.values():  # shares of the 8 test questions; a voted or reranked right answer is a pass
        assert r["k"] == 2 and all(r[key] * 8 == pytest.approx(round(r[key] * 8))
                                   for key in ("top1", "vote", "rerank", "pass"))
        assert r["vote"] <= r["pass"] and r["rerank"] <= r["pass"]
    seconds = [results[m]["train_seconds"] for m in results]  # each stage's own training time, to 0.1 s
    assert all(s > 0 for s in seconds) and sum(seconds) <= elapsed + 0.05 * len(seconds)
    table = (out / "results.md").read_text()
    assert "| ReFT |" in table and "| GRPO |" in table and "vote@2" in table and "McNemar p" in table
    saved = json.loads((out / "results.json").read_text())["results"]
    for method, row in saved.items():  # the table's p is results.json's, not another of the paired numbers
        if "vs_reft" in row:
            line = next(line for line in table.splitlines() if line.startswith(f"| {method} |"))
            assert line.endswith(f"p = {row['vs_reft']['mcnemar_p']:.2f} |"), (line, row["vs_reft"])
    for png in ("curves.png", "accuracy.png"):
        data = (out / png).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000, png
    samples = [json.loads(line) for line in (out / "eval" / "reft" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 8 * 2 and all("score" in s for s in samples)
    summary = summarize(samples, splits[1][:8])
    assert [results["ReFT"][k] for k in ("vote", "rerank", "pass")] == [
        summary["vote_accuracy"], summary["rerank_accuracy"], summary["pass_accuracy"]]
    greedy = [json.loads(line)
              for line in (out / "eval" / "reft" / "greedy" / "predictions.jsonl").read_text().splitlines()]
    assert len(greedy) == 8 and results["ReFT"]["top1"] == sum(g["correct"] for g in greedy) / 8

    # A rerun trains and samples nothing; with one method's model gone, only that method runs again.
    ran = []
    monkeypatch.setattr(reproduce, "_timed", lambda directory, run: ran.append(directory.name) or run())
    assert reproduce.run_reproduce(cfg) == results and ran == []
    shutil.rmtree(out / "reft")
    rerun = reproduce.run_reproduce(cfg)
    assert ran == ["reft", "reft"]  # the training stage, then its test-set sampling (in eval/reft)
    assert {m: r for m, r in rerun.items() if m != "ReFT"} == {m: r for m, r in results.items() if m != "ReFT"}


def test_reproduce_config_errors_name_the_stage_and_key():
    with pytest.raises(ValueError, match="section 'reft': kl_coeff"):
        ReproduceConfig(demo=True, reft={"kl_coeff": 0.1})
    with pytest.raises(ValueError, match="set train_file and eval_file"):
        ReproduceConfig()
    with pytest.raises(ValueError, match="demo makes its own data"):
        ReproduceConfig(demo=True, model="gpt2")
    demo = ReproduceConfig(demo=True)
    assert demo.stage("reft").max_train_examples == 800 and demo.stage("eval").num_samples == 8
    assert demo.stage("warmup").model == "tiny" and demo.stage("warmup").max_length == 176


@pytest.mark.slow
def test_few_shot_eval_prompts_with_training_examples_and_cuts_at_the_next_question(warm_checkpoint, splits, tmp_path):
    from reftkit.commands.evaluate import run_eval
    from reftkit.writers import write_examples

    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    write_examples(train, splits[0])
    write_examples(test, splits[1][:6])
    cfg = EvalConfig(model=str(warm_checkpoint), train_file=str(train), eval_file=str(test), few_shot=2,
                     output_dir=tmp_path / "out", data_format="reft", max_prompt_tokens=200, max_length=240,
                     progress=False)
    acc = run_eval(cfg)
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and acc == sum(r["correct"] for r in rows) / 6
    assert not any("Question:" in r["output"] for r in rows)
    with pytest.raises(ValueError, match="few_shot: the worked examples come from train_file"):
        EvalConfig(few_shot=2, eval_file=str(test))


def test_sample_draws_many_samples_of_a_question_in_chunks_of_eval_batch_size(tmp_path, splits, tiny_checkpoint,
                                                                             monkeypatch):
    """k samples of one question once went to `generate` in one call (memory grew with k).
    At most eval_batch_size rows are in flight, whatever k; the rows are as before: k per question,
    in (question, sample) order, sample numbers 0..k-1, and the same seed gives the same samples."""
    from conftest import LENGTHS
    from reftkit.commands.sample import run_sample
    from reftkit.config import SampleConfig
    from reftkit.rollout import decoding
    from reftkit.writers import write_examples

    calls = []
    real = decoding.generate

    def spy(lm, tokenizer, prompts, sampling, k=1, *args, **kwargs):
        calls.append((len(prompts), k))
        return real(lm, tokenizer, prompts, sampling, k, *args, **kwargs)

    monkeypatch.setattr(decoding, "generate", spy)
    write_examples(tmp_path / "test.jsonl", splits[1][:2])

    def sample(out, k, batch):
        calls.clear()
        summary = run_sample(SampleConfig(model=str(tiny_checkpoint), eval_file=str(tmp_path / "test.jsonl"),
                                          output_dir=tmp_path / out, num_samples=k, eval_batch_size=batch,
                                          progress=False, seed=3, **LENGTHS))
        rows = [json.loads(line) for line in (tmp_path / out / "samples.jsonl").read_text().splitlines()]
        return summary, rows, list(calls)

    summary, rows, made = sample("many", 10, 4)
    assert made == [(1, 4), (1, 4), (1, 2)] * 2  # per question: 4 + 4 + 2 rows, never all 10 at once
    assert [(r["id"], r["sample"]) for r in rows] == [(ex.id, j) for ex in splits[1][:2] for j in range(10)]
    assert summary["k"] == 10 and summary["questions"] == 2
    assert sample("again", 10, 4)[1] == rows  # same seed, same samples
    # k <= eval_batch_size: one call for the batch's prompts with all their samples, as before.
    assert sample("few", 2, 4)[2] == [(2, 2)]
