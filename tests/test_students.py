"""Students that keep what the teacher knows: the teacher-output cache (same losses as recomputing), length
bucketing, the contrastive loss, and the out-of-domain evaluation sets through a recipe, on tiny BERTs (~20 s)."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch

from edgepack.calibration_data import read_samples, sample_path
from edgepack.compress.distill import build_objective, number_examples, pad_collate, tokenize_texts
from edgepack.compress.students import StudentSpec, build_student, load_pretrained, load_tokenizer
from edgepack.compress.teacher_cache import TeacherCache
from edgepack.compress.trainer import DistEnv, bucketed_micro_batches, epoch_micro_batches
from tests.test_distill import make_encoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ALL_LOSSES = {"cosine": 1.0, "similarity": 10.0, "contrastive": 0.5, "hidden": 1.0, "attention-relation": 0.5}


@pytest.fixture(scope="module")
def texts() -> list[str]:
    samples = read_samples(sample_path(), pair_field="paraphrase")
    short = [s.text for s in samples[:20]]
    return short + [f"{a} {b} {a}" for a, b in zip(short, short[1:], strict=False)]  # lengths from ~8 to ~60 tokens


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, minilm_path):
    return make_encoder(tmp_path_factory.mktemp("teacher"), minilm_path, layers=4, hidden=32, heads=4)


def _objective(teacher_dir):
    torch.manual_seed(0)
    teacher = load_pretrained(teacher_dir, task="sentence-embedding")
    student, info = build_student(teacher, StudentSpec(keep_layers=(1, 3), ffn_ratio=0.5, hidden_ratio=0.5))
    objective = build_objective(student, teacher, task="sentence-embedding", weights=ALL_LOSSES, keep_layers=(1, 3),
                                pooling="mean", normalize=True, student_channels=info["hidden_channels"])
    return objective, teacher


@pytest.mark.parametrize(("dtype", "rtol"), [("float32", 1e-5), ("float16", 2e-3)])
def test_cached_teacher_outputs_give_the_same_losses_as_recomputing(teacher_dir, texts, dtype, rtol):
    objective, teacher = _objective(teacher_dir)
    examples = tokenize_texts(load_tokenizer(teacher_dir), texts, max_length=64)
    layers = sorted({t for _, t in objective.context.layer_map})
    cache = TeacherCache.build(teacher, objective.head, examples, needs=objective.needs, hidden_layers=layers,
                               batch_size=7, dtype=dtype)  # cached in batches unlike the training batches
    assert cache.stats["texts"] == len(texts) and set(cache.hidden) == {0, 2, 4} and cache.qkv is not None
    batch_numbers = [3, 25, 0, 38, 11, 30, 7, 20]  # short and long texts padded together
    plain = pad_collate([examples[i] for i in batch_numbers], pad_id=0)
    cached = pad_collate([number_examples(examples)[i] for i in batch_numbers], pad_id=0)
    assert cached["cache_index"].tolist() == batch_numbers
    objective.eval()
    with torch.no_grad():
        total, parts = objective(**plain)  # teacher forward on this batch
        objective.use_cache(cache)
        total_cached, parts_cached = objective(**cached)  # teacher outputs from the cache
    torch.testing.assert_close(parts_cached, parts, rtol=rtol, atol=1e-6)
    torch.testing.assert_close(total_cached, total, rtol=rtol, atol=1e-6)
    assert all(p > 0 for p in parts.tolist())  # every loss, token-level ones included, is compared


def test_cache_refuses_more_memory_than_allowed(teacher_dir, texts):
    from edgepack.errors import BadInputError

    objective, teacher = _objective(teacher_dir)
    examples = tokenize_texts(load_tokenizer(teacher_dir), texts, max_length=64)
    with pytest.raises(BadInputError, match=r"teacher_cache_max_mb=0.*drop the token-level losses"):
        TeacherCache.build(teacher, objective.head, examples, needs=objective.needs, hidden_layers=(0, 2, 4),
                           max_mb=0.0001)


def test_length_buckets_pad_less_and_still_see_every_text_once_per_epoch():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 128, size=1000).tolist()
    env = DistEnv()
    plain = epoch_micro_batches(len(lengths), env=env, micro=16, seed=0, epoch=0)
    bucketed = bucketed_micro_batches(lengths, env=env, micro=16, seed=0, epoch=0)
    assert len(bucketed) == len(plain) == 62
    seen = [i for batch in bucketed for i in batch]
    assert len(set(seen)) == len(seen) == 62 * 16

    def padded(batches):
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    assert padded(bucketed) < 0.75 * padded(plain)  # tokens the model runs, padding included
    assert bucketed != bucketed_micro_batches(lengths, env=env, micro=16, seed=0, epoch=1)  # reshuffled per epoch
    # two ranks: micro-batch k of both ranks is global batch k of one process
    ranks = [bucketed_micro_batches(lengths, env=DistEnv(rank=r, world=2), micro=8, seed=0, epoch=0) for r in (0, 1)]
    assert [a + b for a, b in zip(*ranks, strict=True)] == bucketed


def test_trainer_with_cache_and_buckets_lowers_the_loss(teacher_dir, texts):
    from edgepack.compress.trainer import Trainer, TrainOptions

    objective, teacher = _objective(teacher_dir)
    examples = tokenize_texts(load_tokenizer(teacher_dir), texts, max_length=64)
    objective.use_cache(TeacherCache.build(teacher, objective.head, examples, needs=objective.needs,
                                           hidden_layers=(0, 2, 4)))
    options = TrainOptions(epochs=6, batch_size=8, lr=3e-3, length_bucketing=True)
    result = Trainer(objective, number_examples(examples), collate=functools.partial(pad_collate, pad_id=0),
                     options=options).fit()
    curve = [h["loss"] for h in result.history]
    assert len(curve) == 6 * 4 and sum(curve[-4:]) < 0.8 * sum(curve[:4]), curve
    assert 0 < result.steps_wall_s <= result.wall_s


def test_recipe_reports_out_of_domain_sets_per_variant(tiny_bert_dir, small_sentences, tmp_path):
    """A recipe with a corpus, the teacher cache and two evaluation sets: every variant's R@1 on each set is in the
    report (equal to the metric computed from the PyTorch model's embeddings), the OOD gate reads them."""
    from edgepack.compress.distill import encode, retrieval_metrics
    from edgepack.pipeline import run_recipe
    from edgepack.recipe import parse_recipe
    from tests.test_pipeline import tiny_recipe

    sets = [{"name": name, "path": f"bundled:retrieval-{name}.jsonl", "field": "query", "pair_field": "document",
             "max_samples": 24} for name in ("manpages", "debian")]
    corpus = {"path": "bundled:distill-corpus-python.jsonl.gz", "pair_field": "pair", "max_samples": 40,
              "task_share": 0.25, "validation_pairs": 4}
    recipe = parse_recipe(tiny_recipe(
        tiny_bert_dir, small_sentences, data={"n_calibration": 24, "evaluation_sets": sets},
        distill={"enabled": True, "keep_layers": [1], "ffn_ratio": 0.5, "epochs": 1, "batch_size": 8,
                 "losses": {"cosine": 1.0, "similarity": 1.0, "contrastive": 0.1}, "teacher_cache": True,
                 "length_bucketing": True, "teacher_precision": "fp32",
                 "data": {"path": str(small_sentences), "pair_field": "paraphrase", "corpus": corpus}},
        quantize={"max_cosine_drop": None}, bundle={"enabled": False},
        gates={"min_cosine": None, "min_evaluation_set_ratio": 0.01}))
    report = run_recipe(recipe, tmp_path)
    for variant in report.variants.values():
        assert set(variant.evaluation_sets) == {"manpages", "debian"}
        assert all(e.samples == 24 and 0 <= e.metrics["paraphrase_recall_at_1"] <= 1
                   for e in variant.evaluation_sets.values())
    # the teacher's R@1 on man pages, recomputed from its PyTorch embeddings: the query finds its own document
    pairs = [json.loads(line) for line in sample_path("retrieval-manpages.jsonl").read_text().splitlines()[:24]]
    teacher, tokenizer = load_pretrained(tiny_bert_dir, task="sentence-embedding"), load_tokenizer(tiny_bert_dir)
    q = encode(teacher, tokenizer, [p["query"] for p in pairs], pooling="mean", normalize=True)
    d = encode(teacher, tokenizer, [p["document"] for p in pairs], pooling="mean", normalize=True)
    want = retrieval_metrics(q, d)
    got = report.variants["fp32"].evaluation_sets["manpages"].metrics
    assert got["paraphrase_recall_at_1"] == pytest.approx(want["paraphrase_recall_at_1"])
    assert got["paraphrase_mrr"] == pytest.approx(want["paraphrase_mrr"], abs=1e-4)
    gate = next(g for g in report.gates if g.name == "min_evaluation_set_ratio")
    assert gate.value is not None
    distill = json.loads(next(tmp_path.glob("distill-*/manifest.json")).read_text())["metrics"]
    corpus_stats = distill["data"]["corpus"]
    assert corpus_stats["kept"] - corpus_stats["validation_pairs"] == 40 and distill["data"]["task_share"] == 0.25
    assert distill["teacher_cache"]["texts"] == distill["train_texts"]
    md = (tmp_path / "report.md").read_text()
    assert "## Evaluation sets (CPU EP)" in md and "| manpages (24) | debian (24) |" in md
