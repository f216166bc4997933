"""Distillation: student construction, losses, the trainer (resume, optimizers, precision), memory, bad inputs.

Tiny BERTs (hidden 32, 2-4 layers) with all-MiniLM-L6-v2's real tokenizer; one torch thread, because OpenMP threads
spinning on a shared 2-core machine make models this small ~20x slower.
"""

from __future__ import annotations

import functools
import shutil
import threading
from pathlib import Path

import pytest
import torch

from edgepack.calibration_data import TextSample, read_samples, sample_path
from edgepack.compress.config import DistillSection
from edgepack.compress.distill import LOSSES, build_objective, pad_collate, tokenize_texts
from edgepack.compress.stages import distill_model
from edgepack.compress.students import StudentSpec, build_student, load_pretrained
from edgepack.compress.trainer import Trainer, TrainOptions, optimizer_availability, train_peak_memory
from edgepack.errors import BadInputError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_encoder(folder: Path, tokenizer_dir: Path, *, layers: int = 4, hidden: int = 32, heads: int = 4,
                 intermediate: int = 64, dropout: float = 0.0, kind: str = "BertModel", **extra: int) -> Path:
    """A random BERT-like model saved as a sentence-transformers folder (mean pooling + normalize)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers,
                                     num_attention_heads=heads, intermediate_size=intermediate,
                                     max_position_embeddings=256, hidden_dropout_prob=dropout,
                                     attention_probs_dropout_prob=dropout, **extra)
    getattr(transformers, kind)(config).eval().save_pretrained(folder, safe_serialization=True)
    transformers.AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    for name in ("modules.json", "1_Pooling/config.json"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tokenizer_dir / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def pairs() -> list[tuple[str, str]]:
    samples = read_samples(sample_path(), pair_field="paraphrase")
    return [(s.text, s.pair) for s in samples]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory, minilm_path: Path) -> Path:
    return make_encoder(tmp_path_factory.mktemp("teacher"), minilm_path)


# ---------------------------------------------------------------------------------------------------- students


def test_student_keeps_chosen_layers_with_copied_weights_and_halved_ffn(teacher_dir):
    teacher = load_pretrained(teacher_dir, task="sentence-embedding")
    student, info = build_student(teacher, StudentSpec(keep_layers=(0, 2), ffn_ratio=0.5))
    assert info["student_layers"] == 2 and student.config.num_hidden_layers == 2
    assert student.config.intermediate_size == 32 and info["narrowing"]["ffn"] == {"asked_ratio": 0.5, "kept": 32,
                                                                                  "of": 64}
    for new, old in ((0, 0), (1, 2)):
        s_layer, t_layer = student.encoder.layer[new], teacher.encoder.layer[old]
        assert torch.equal(s_layer.attention.self.query.weight, t_layer.attention.self.query.weight)
        assert s_layer.intermediate.dense.weight.shape == (32, 32)  # (kept neurons, hidden)
        assert s_layer.output.dense.weight.shape == (32, 32)  # (hidden, kept neurons)
        # the kept neurons are teacher rows, copied exactly
        rows = {tuple(r.tolist()) for r in t_layer.intermediate.dense.weight}
        assert all(tuple(r.tolist()) in rows for r in s_layer.intermediate.dense.weight)
    assert info["student_params"] < info["teacher_params"]


# ------------------------------------------------------------------------------------------------ distillation


def test_distillation_loss_decreases_and_writes_a_loadable_encoder(teacher_dir, pairs, tmp_path):
    from edgepack.families import open_model

    options = DistillSection(enabled=True, num_layers=2, ffn_ratio=0.5, hidden_ratio=0.5, epochs=3, batch_size=16,
                             lr=2e-3, losses={"cosine": 1.0, "similarity": 1.0, "hidden": 1.0,
                                              "attention-relation": 1.0}, early_stop_patience=None)
    out = tmp_path / "student"
    metrics = distill_model(teacher_dir, out, texts=[t for t, _ in pairs[:160]], eval_pairs=pairs[600:632],
                            options=options)
    curve = [h["loss"] for h in metrics["train"]["history"]]
    assert len(curve) == 30  # 3 epochs x 160 // 16
    assert sum(curve[-5:]) / 5 < 0.8 * sum(curve[:5]) / 5, curve
    assert [e["epoch"] for e in metrics["train"]["evals"]] == [0, 1, 2]
    assert {"paraphrase_recall_at_1", "paraphrase_mrr", "similarity_agreement"} <= set(metrics["train"]["evals"][0])
    assert metrics["params_after"] < metrics["params_before"] / 2  # 2 of 4 layers, hidden 32 -> 16
    # the folder is a complete sentence encoder: narrowed config, pooling files, tokenizer
    adapter = open_model(str(out))
    assert (adapter.pooling, adapter.normalize) == ("mean", True)
    module = adapter.load_torch()
    assert module.encoder.config.hidden_size == 16 and module.encoder.config.num_attention_heads == 2
    feed = next(adapter.feeds([TextSample("The train to Leeds was late.")]))
    _, pooled = module(*(torch.from_numpy(feed[n]) for n in adapter.io.input_names))
    assert pooled.shape == (1, 16)


def _tiny_trainer(teacher_dir: Path, examples: list, options: TrainOptions, *, on_step=None) -> tuple[Trainer, torch.nn.Module]:
    torch.manual_seed(0)
    teacher = load_pretrained(teacher_dir, task="sentence-embedding")
    student, _ = build_student(teacher, StudentSpec(keep_layers=(1, 3)))
    objective = build_objective(student, teacher, task="sentence-embedding", weights={"cosine": 1.0, "hidden": 1.0},
                                keep_layers=(1, 3), pooling="mean", normalize=True)
    collate = functools.partial(pad_collate, pad_id=0)
    return Trainer(objective, examples, collate=collate, options=options, on_step=on_step), student


def test_resume_after_interruption_matches_an_uninterrupted_run(minilm_path, pairs, tmp_path):
    from transformers import AutoTokenizer

    # dropout on: resume must restore the RNG state too, not only weights and optimizer
    teacher_dir = make_encoder(tmp_path / "teacher", minilm_path, dropout=0.1)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    examples = tokenize_texts(tokenizer, [t for t, _ in pairs[:64]], max_length=64)
    base = {"epochs": 2, "batch_size": 8, "lr": 1e-3, "grad_accum": 2}
    reference, ref_student = _tiny_trainer(teacher_dir, examples, TrainOptions(**base))
    expected = reference.fit()

    class Interrupted(Exception):
        pass

    def interrupt(step: int, loss: float) -> None:
        if step == 11:  # in epoch 1 (8 steps per epoch); the last checkpoint is step 9's
            raise Interrupted

    folder = tmp_path / "checkpoints"
    options = TrainOptions(**base, checkpoint_dir=folder, checkpoint_every=3)
    first, _ = _tiny_trainer(teacher_dir, examples, options, on_step=interrupt)
    with pytest.raises(Interrupted):
        first.fit()
    assert sorted(p.name for p in folder.glob("step-*")) == ["step-00000008", "step-00000009"]
    assert {p.suffix for p in folder.rglob("*") if p.is_file()} == {".safetensors", ".json"}  # no pickle
    second, student = _tiny_trainer(teacher_dir, examples, options)
    resumed = second.fit()
    assert resumed.resumed_from.endswith("step-00000009")
    assert resumed.steps == expected.steps == 16
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in expected.history]
    for (name, got), want in zip(student.state_dict().items(), ref_student.state_dict().values(), strict=True):
        assert torch.equal(got, want), name
    # a checkpoint of another run is refused, not half-resumed
    other, _ = _tiny_trainer(teacher_dir, examples, TrainOptions(**{**base, "lr": 2e-3}, checkpoint_dir=folder))
    with pytest.raises(BadInputError, match=r"belongs to another run \(lr 0.001 -> 0.002\)"):
        other.fit()


@pytest.mark.parametrize(("optimizer", "precision"), [("adafactor", "fp32"), ("adamw", "bf16")])
def test_memory_saving_optimizer_and_mixed_precision_train(teacher_dir, pairs, optimizer, precision):
    from transformers import AutoTokenizer

    examples = tokenize_texts(AutoTokenizer.from_pretrained(teacher_dir), [t for t, _ in pairs[:32]], max_length=64)
    trainer, _ = _tiny_trainer(teacher_dir, examples, TrainOptions(epochs=3, batch_size=8, lr=3e-3,
                                                                   optimizer=optimizer, precision=precision))
    curve = [h["loss"] for h in trainer.fit().history]
    assert all(torch.isfinite(torch.tensor(curve)))
    assert sum(curve[-3:]) < sum(curve[:3])


def test_8bit_optimizer_is_reported_unavailable_or_works():
    status = optimizer_availability()["adamw-8bit"]
    if status == "ok":
        pytest.skip("bitsandbytes 8-bit optimizer works here")
    assert status.startswith("unavailable: ")
    model = torch.nn.Linear(4, 4)
    from edgepack.compress.trainer import OPTIMIZERS

    with pytest.raises(BadInputError, match="adamw-8bit is unavailable"):
        OPTIMIZERS.get("adamw-8bit")([{"params": list(model.parameters())}], TrainOptions(optimizer="adamw-8bit"))


def test_classifier_and_causal_lm_distillation_losses_decrease(minilm_path, pairs, tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    texts = [t for t, _ in pairs[:32]]
    # classifier: KL on temperature-scaled logits + CE on labels
    clf_dir = make_encoder(tmp_path / "clf", minilm_path, kind="BertForSequenceClassification", num_labels=3)
    teacher = load_pretrained(clf_dir, task="sequence-classification")
    student, _ = build_student(teacher, StudentSpec(num_layers=1))
    objective = build_objective(student, teacher, task="sequence-classification", weights={"kl": 1.0, "ce": 0.5})
    examples = tokenize_texts(tokenizer, texts, max_length=64, labels=[i % 3 for i in range(len(texts))])
    result = Trainer(objective, examples, collate=functools.partial(pad_collate, pad_id=0),
                     options=TrainOptions(epochs=4, batch_size=8, lr=3e-3)).fit()
    assert result.history[-1]["parts"][1] > 0  # CE saw the labels
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    # causal LM (Llama, GQA): KL on next-token distributions over real tokens
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    llama.save_pretrained(tmp_path / "llama", safe_serialization=True)
    teacher = load_pretrained(tmp_path / "llama", task="causal-lm")
    student, _ = build_student(teacher, StudentSpec(num_layers=1, ffn_ratio=0.5))
    assert student.model.layers[0].self_attn.layer_idx == 0
    objective = build_objective(student, teacher, task="causal-lm", weights={"kl": 1.0})
    result = Trainer(objective, tokenize_texts(tokenizer, texts, max_length=64),
                     collate=functools.partial(pad_collate, pad_id=0),
                     options=TrainOptions(epochs=4, batch_size=8, lr=3e-3)).fit()
    assert result.history[-1]["loss"] < 0.9 * result.history[0]["loss"]


def test_gradient_checkpointing_lowers_training_peak_memory(minilm_path, tmp_path):
    # 6 layers x 8 heads at sequence 256: attention maps dominate, as in a real encoder
    model_dir = make_encoder(tmp_path / "mid", minilm_path, layers=6, hidden=64, heads=8, intermediate=256)
    results: dict[bool, dict] = {}

    def probe(flag: bool) -> None:
        results[flag] = train_peak_memory(model_dir, sequence_length=256, batch_size=8, gradient_checkpointing=flag,
                                          steps=1)

    threads = [threading.Thread(target=probe, args=(flag,)) for flag in (False, True)]  # two fresh processes at once
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    plain, checkpointed = results[False]["train_peak_mb"], results[True]["train_peak_mb"]
    assert checkpointed < 0.6 * plain, (plain, checkpointed)  # measured: ~370 MB -> ~100 MB


# ---------------------------------------------------------------------------------------------- bad inputs


def test_student_larger_than_teacher_is_refused(teacher_dir):
    teacher = load_pretrained(teacher_dir, task="sentence-embedding")
    with pytest.raises(BadInputError, match=r"distill.keep_layers has 5 layers but the teacher has 4"):
        build_student(teacher, StudentSpec(keep_layers=(0, 1, 2, 3, 3)))
    with pytest.raises(BadInputError, match=r"distill.num_layers=6 .* a student must be smaller"):
        build_student(teacher, StudentSpec(num_layers=6))
    with pytest.raises(BadInputError, match=r"distill.student_config.hidden_size=64 is larger than the teacher's 32"):
        build_student(teacher, StudentSpec(config={"hidden_size": 64}))


def test_tokenizer_mismatch_and_pickle_checkpoints_are_refused(teacher_dir, pairs, tmp_path, minilm_path):
    from transformers import AutoTokenizer

    other = make_encoder(tmp_path / "other", minilm_path, layers=2)
    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.add_tokens(["edgepackzz"])
    tokenizer.save_pretrained(other)
    texts = [t for t, _ in pairs[:16]]
    with pytest.raises(BadInputError, match=r"distill.student: .*vocabulary differs from the teacher's"):
        distill_model(teacher_dir, tmp_path / "out", texts=texts, eval_pairs=[],
                      options=DistillSection(student=str(other)))
    pickled = tmp_path / "pickled"
    shutil.copytree(teacher_dir, pickled)
    (pickled / "model.safetensors").unlink()
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(BadInputError, match=r"refusing pickle checkpoint .*pytorch_model.bin; convert it to "
                                            r"safetensors"):
        distill_model(pickled, tmp_path / "out", texts=texts, eval_pairs=[], options=DistillSection())


def test_bad_distill_options_name_the_field(teacher_dir, pairs, tmp_path):
    texts = [t for t, _ in pairs[:16]]
    with pytest.raises(BadInputError, match=r"distill.ffn_ratio is 1.0; a ratio is the fraction removed"):
        DistillSection(ffn_ratio=1.0)
    with pytest.raises(BadInputError, match=r"unknown distillation loss 'cosin' \(did you mean 'cosine'\?\)"):
        distill_model(teacher_dir, tmp_path / "o", texts=texts, eval_pairs=[], options=DistillSection(losses={"cosin": 1}))
    with pytest.raises(BadInputError, match=r"distill.losses: every weight is 0"):
        distill_model(teacher_dir, tmp_path / "o", texts=texts, eval_pairs=[], options=DistillSection(losses={"mse": 0}))
    with pytest.raises(BadInputError, match=r"distill.batch_size=16 is not divisible by processes x grad_accum = 1 x 3"):
        distill_model(teacher_dir, tmp_path / "o", texts=texts, eval_pairs=[],
                      options=DistillSection(batch_size=16, grad_accum=3))
    assert {"cosine", "mse", "similarity", "hidden", "attention-relation", "kl", "ce"} <= set(LOSSES)
