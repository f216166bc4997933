"""Distillation experiments on recipes/minilm-small.yaml's data: student shapes at equal size, losses, and steps/s.

Every run trains with `edgepack.compress.stages.distill_model` on the recipe's training texts (the broad corpus mixed
with the task's sentences, `pipeline.distill_texts`), then scores the student in PyTorch on the in-domain test pairs
and the recipe's out-of-domain evaluation sets (R@1 of query -> document), beside the teacher's figures.

    python scripts/bench_students.py shapes --max-steps 1000     # equal-size shapes, the same steps each
    python scripts/bench_students.py losses --max-steps 1000     # loss sets on the recipe's shape
    flock /work/bench.lock python scripts/bench_students.py speed  # steps/s: teacher per step vs cache, bucketing
    python scripts/bench_students.py render                       # rewrite the docs section from results.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import REPO, machine_line, markdown_table, write_section  # noqa: E402

RECIPE = REPO / "recipes" / "minilm-small.yaml"

#: student shapes of about the same size (~10M parameters, ~10 MB in INT8, 70% of it the word embeddings); `recipe`
#: is the recipe's shape
SHAPES: dict[str, dict[str, Any]] = {
    "3 layers x 256, FFN 768 (recipe)": {"keep_layers": [0, 2, 5], "ffn_ratio": 0.5, "hidden_ratio": 1 / 3},
    "2 layers x 256, FFN 1536": {"keep_layers": [0, 5], "ffn_ratio": 0.0, "hidden_ratio": 1 / 3},
    "4 layers x 256, FFN 384": {"keep_layers": [0, 2, 3, 5], "ffn_ratio": 0.75, "hidden_ratio": 1 / 3},
    # all six layers, hidden narrowed to 192 (6 heads): 8.6M parameters, a little smaller than the others (hidden 224,
    # 7 heads, would be 10.2M at 1.7x the recipe's FLOPs per token)
    "6 layers x 192, FFN 768": {"keep_layers": [0, 1, 2, 3, 4, 5], "ffn_ratio": 0.5, "hidden_ratio": 0.5},
}
RECIPE_LOSSES = {"cosine": 1.0, "similarity": 10.0, "contrastive": 0.2}
LOSS_SETS: dict[str, dict[str, float]] = {
    "cosine + similarity + contrastive (recipe)": RECIPE_LOSSES,
    "cosine + similarity": {"cosine": 1.0, "similarity": 10.0},
    "recipe + attention-relation (MiniLM-v2, last layer)": {**RECIPE_LOSSES, "attention-relation": 0.5},
}
#: the losses of the recipe before this benchmark (hidden states and relations: token-level, for the speed rows)
BEFORE_LOSSES = {"cosine": 1.0, "similarity": 10.0, "hidden": 1.0, "attention-relation": 0.5}


def load_recipe(minutes: float | None = None) -> Any:
    import yaml

    from edgepack.recipe import parse_recipe

    data = yaml.safe_load(RECIPE.read_text())
    if minutes is not None:
        data["distill"]["max_train_minutes"] = minutes
    return parse_recipe(data, source=str(RECIPE))


def recipe_data(recipe: Any, out: Path) -> dict[str, Any]:
    """Training texts and early-stopping pairs as the recipe's distill stage gets them, and the test sets."""
    from edgepack.calibration_data import TextSample
    from edgepack.pipeline import RunContext, distill_texts, load_evaluation_sets, load_split, open_recipe_model

    ctx = RunContext(recipe, out, open_recipe_model(recipe), load_split(recipe),
                     evaluation_sets=load_evaluation_sets(recipe))
    texts, eval_pairs = distill_texts(ctx)
    sets = {"in-domain": [(s.text, s.pair) for s in ctx.split.evaluation if isinstance(s, TextSample)]}
    sets.update({name: [(s.text, s.pair) for s in samples] for name, samples in ctx.evaluation_sets.items()})
    return {"texts": texts, "eval_pairs": eval_pairs, "sets": sets, "stats": ctx.data_stats}


def score(model_dir: Path, sets: dict[str, list[tuple[str, str]]]) -> dict[str, float]:
    """R@1 per set (query -> its document among all documents), in PyTorch."""
    import torch

    from edgepack.compress.distill import encode, retrieval_metrics
    from edgepack.compress.students import load_pretrained, load_tokenizer
    from edgepack.families.sentence_encoder import sentence_transformers_head

    torch.set_num_threads(1)
    model, tokenizer = load_pretrained(model_dir, task="sentence-embedding").eval(), load_tokenizer(model_dir)
    pooling, normalize = sentence_transformers_head(model_dir)
    result = {}
    for name, pairs in sets.items():
        queries = encode(model, tokenizer, [q for q, _ in pairs], pooling=pooling, normalize=normalize)
        docs = encode(model, tokenizer, [d for _, d in pairs], pooling=pooling, normalize=normalize)
        result[name] = retrieval_metrics(queries, docs)["paraphrase_recall_at_1"]
    return result


def train(name: str, overrides: dict[str, Any], data: dict[str, Any], recipe: Any, out: Path) -> dict[str, Any]:
    from edgepack.compress.stages import distill_model
    from edgepack.families import default_model_path

    options = recipe.distill.model_copy(update={**overrides, "task": "sentence-embedding"})
    folder = out / name.split(" (")[0].replace(" ", "_").replace(",", "").replace("+", "p")
    start = time.perf_counter()
    metrics = distill_model(Path(default_model_path()), folder / "model", texts=data["texts"],
                            eval_pairs=data["eval_pairs"], options=options)
    train = metrics["train"]
    row = {"name": name, "overrides": overrides, "student_params": metrics["student_params"], "steps": train["steps"],
           "train_min": train["wall_s"] / 60, "stage_min": (time.perf_counter() - start) / 60,
           "steps_per_s": train["steps"] / max(train["steps_wall_s"], 1e-9), "cache": metrics.get("teacher_cache"),
           "r1": score(folder / "model", data["sets"])}
    print(json.dumps(row), flush=True)
    return row


def teacher_scores(data: dict[str, Any], out: Path) -> dict[str, float]:
    from edgepack.families import default_model_path

    path = out / "teacher-scores.json"
    if not path.is_file():
        path.write_text(json.dumps(score(Path(default_model_path()), data["sets"])))
    return json.loads(path.read_text())


def speed(data: dict[str, Any], recipe: Any, out: Path, steps: int) -> list[dict[str, Any]]:
    """Steps/s of the same student and batch: teacher forward per step (before) vs cache, bucketing, bf16."""
    base = {"max_steps": steps, "max_train_minutes": None, "early_stop_patience": None, "epochs": 1,
            "max_length": 128, "precision": "fp32", "teacher_precision": None}  # fp32 unless a row says bf16
    before_losses = BEFORE_LOSSES
    runs = [("teacher forward per step (before)", {"teacher_cache": False, "length_bucketing": False,
                                                   "losses": before_losses}),
            ("teacher cache", {"teacher_cache": True, "length_bucketing": False, "losses": before_losses}),
            ("teacher cache + length bucketing", {"teacher_cache": True, "length_bucketing": True,
                                                  "losses": before_losses}),
            ("+ embedding-level losses (recipe)", {"teacher_cache": True, "length_bucketing": True}),
            ("+ bf16 autocast (AMX)", {"teacher_cache": True, "length_bucketing": True, "precision": "bf16"})]
    texts = data["texts"][: steps * 32 + 64]  # one epoch of `steps` steps: the cache is built for these texts only
    small = {**data, "texts": texts, "eval_pairs": data["eval_pairs"][:32]}
    rows = []
    for name, overrides in runs:
        row = train(name, {**base, **overrides}, {**small, "sets": {}}, recipe, out / "speed")
        rows.append({**row, "cache_build_s": (row["cache"] or {}).get("build_s")})
    return rows


# ------------------------------------------------------------------------------------------------- report


def shape_of(overrides: dict[str, Any]) -> tuple[int, int, int]:
    """(layers, hidden, FFN) of a student of all-MiniLM-L6-v2 (hidden 384 in 32-wide heads, FFN 1536)."""
    shape = {**SHAPES["3 layers x 256, FFN 768 (recipe)"], **overrides}
    hidden = 384 - round(384 * shape["hidden_ratio"] / 32) * 32
    return len(shape["keep_layers"]), hidden, 1536 - round(1536 * shape["ffn_ratio"] / 8) * 8


def layer_mflop(layers: int, hidden: int, ffn: int) -> float:
    """Multiply-adds x 2 per token in the transformer layers' Linear weights (what latency scales with)."""
    return 2 * layers * (4 * hidden * hidden + 2 * hidden * ffn) / 1e6


def render(results: dict[str, Any]) -> str:
    teacher = results["teacher"]
    names = list(teacher)
    lines = ["## Students: shapes, losses and steps/s (all-MiniLM-L6-v2 teacher)", "",
             f"Machine: {results['machine']}. `python scripts/bench_students.py {{shapes,losses,speed}}` on "
             "recipes/minilm-small.yaml's training texts "
             f"({results.get('stats', {}).get('training_texts', '?')} texts: the broad corpus with the task's "
             "sentences mixed in at 15%); R@1 in PyTorch (query -> its document among all documents of the set), "
             "FP32 students. Other engineers shared the 2 cores.", ""]
    header = ["student", "params", "MFLOP/token", "steps"] + [f"{n} R@1" for n in names]
    for key, title in (("shapes", "Shapes at equal size (the recipe's losses, the same number of steps)"),
                       ("losses", "Losses (the recipe's shape, the same number of steps)")):
        if not results.get(key):
            continue
        rows = [["teacher (6 x 384, FFN 1536)", "22.7M", f"{layer_mflop(6, 384, 1536):.1f}", ""]
                + [f"{teacher[n]:.3f}" for n in names]]
        for r in results[key]:
            layers, hidden, ffn = shape_of(r["overrides"])
            rows.append([r["name"], f"{r['student_params'] / 1e6:.1f}M", f"{layer_mflop(layers, hidden, ffn):.1f}",
                         str(r["steps"])] + [f"{r['r1'][n]:.3f} ({r['r1'][n] / teacher[n]:.2f}x)" for n in names])
        lines += [f"### {title}", "", markdown_table(header, rows), ""]
        missing = [n for n in {"shapes": SHAPES, "losses": LOSS_SETS}[key] if n not in {r["name"] for r in results[key]}]
        if missing:
            lines += [f"Not measured in this run: {', '.join(missing)}.", ""]
        if key == "losses" and len(results[key]) > 1:
            lines += [losses_spread(results[key], results.get("sizes", {})), ""]
    if not results.get("losses"):
        lines += [f"Loss sets ({', '.join(LOSS_SETS)}): not measured in this run (`bench_students.py losses`).", ""]
    if results.get("speed"):
        base = results["speed"][0]["steps_per_s"]
        rows = [[r["name"], f"{r['steps_per_s']:.2f}", f"{r['steps_per_s'] / base:.2f}x",
                 "" if r["cache_build_s"] is None else f"{r['cache_build_s']:.0f} s for {r['cache']['texts']} texts"]
                for r in results["speed"]]
        lines += ["### Steps/s (batch 32, 1 torch thread, the recipe's shape, measured under the bench lock)", "",
                  markdown_table(["configuration", "steps/s", "vs before", "teacher pass (once)"], rows), "",
                  "Steps/s counts optimizer steps only (the per-epoch evaluation excluded); the cached runs pay "
                  "the teacher pass once before training, which the last column shows."]
    return "\n".join(lines)


def losses_spread(rows: list[dict[str, Any]], sizes: dict[str, int]) -> str:
    """One sentence: how far apart the loss sets are (in queries of each set) and what the token-level ones cost."""
    spreads = []
    for name in rows[0]["r1"]:
        values = [r["r1"][name] for r in rows]
        size = sizes.get(name)
        queries = f" ({round((max(values) - min(values)) * size)} of {size} queries)" if size else ""
        spreads.append(f"{name} {max(values) - min(values):.3f}{queries}")
    costs = [f"{r['name']}: {(r['cache'] or {}).get('token_level_mb', 0):.0f} MB" for r in rows]
    return (f"Spread of R@1 between the loss sets: {', '.join(spreads)}. Token-level teacher outputs each run "
            f"cached (besides the pooled embeddings): {'; '.join(costs)}. Steps/s of these runs are not compared: "
            "they ran at different loads, outside the bench lock (see the steps/s table for that).")


def reuse_recipe_row(results: dict[str, Any], what: str, name: str, steps: int) -> dict[str, Any] | None:
    """The losses table's recipe row is the shapes table's recipe row when both ran the same steps."""
    if what != "losses" or not name.endswith("(recipe)"):
        return None
    row = next((r for r in results.get("shapes", []) if r["name"].endswith("(recipe)")), None)
    return {**row, "name": name} if row is not None and row["steps"] == steps else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["shapes", "losses", "speed", "render"])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--steps", type=int, default=40, help="speed: optimizer steps per configuration")
    parser.add_argument("--max-steps", type=int, default=1000,
                        help="shapes / losses: optimizer steps per run (the same for every run, whatever the load)")
    parser.add_argument("--only", nargs="*", default=None, help="names (prefixes) of the shapes / loss sets to run")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-students")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    if args.what != "render":
        recipe = load_recipe(args.minutes)
        data = recipe_data(recipe, args.out)
        results.update(machine=machine_line(), stats=data["stats"], teacher=teacher_scores(data, args.out),
                       sizes={name: len(pairs) for name, pairs in data["sets"].items()})
        table = {"shapes": SHAPES, "losses": {k: {"losses": v} for k, v in LOSS_SETS.items()}}.get(args.what)
        if table is not None:
            chosen = [k for k in table if args.only is None or any(k.startswith(p) for p in args.only)]
            done = {r["name"]: r for r in results.get(args.what, [])}
            budget = {"max_steps": args.max_steps, "max_train_minutes": None}  # equal steps: load-independent
            for name in chosen:
                same = reuse_recipe_row(results, args.what, name, args.max_steps)
                done[name] = same or train(name, {**table[name], **budget}, data, recipe, args.out / args.what)
                results[args.what] = list(done.values())
                results_path.write_text(json.dumps(results, indent=1))
        else:
            results["speed"] = speed(data, recipe, args.out, args.steps)
        results_path.write_text(json.dumps(results, indent=1))
    body = render(results)
    print(body)
    if not args.no_write:
        write_section("students", body)


if __name__ == "__main__":
    main()
