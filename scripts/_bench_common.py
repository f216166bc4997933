"""Shared pieces of the benchmark scripts: the MiniLM run context, subprocess timing, docs/benchmarks.md sections."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH_DOC = REPO / "docs" / "benchmarks.md"


def machine_line() -> str:
    """CPU, cores and int8 ISA (`edgepack.runtime.host`), library versions and the date: every table's header."""
    import platform

    import onnxruntime
    import torch

    from edgepack.runtime.host import host_line

    return (f"{host_line()}; Python {platform.python_version()}, onnxruntime {onnxruntime.__version__}, torch "
            f"{torch.__version__}; {time.strftime('%Y-%m-%d')}")


def run_child(args: list[str], *, timeout: float = 3600) -> dict[str, Any]:
    """Run `python <args>` in a fresh process; it must print one JSON object on its last stdout line."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"status": "crashed", "error": last[:200], "wall_s": wall}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.setdefault("wall_s", wall)
    return result


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section between `<!-- name:start -->` and `<!-- name:end -->` in docs/benchmarks.md."""
    BENCH_DOC.parent.mkdir(exist_ok=True)
    text = BENCH_DOC.read_text() if BENCH_DOC.exists() else "# edgepack benchmarks\n\n"
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    BENCH_DOC.write_text(text)


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


class DemoContext:
    """The demo recipe's model (family), data split and run folder, with its stages, as the benchmarks use them.

    Everything goes through the library's stage functions (`edgepack.stages`), so a benchmark's FP32 and INT8 models
    are the ones `edgepack run recipes/minilm.yaml` makes (same folders, same hashes).
    """

    def __init__(self, out: Path, recipe: Any = None) -> None:
        from edgepack.pipeline import RunContext, load_split, open_recipe_model
        from edgepack.recipe import DEMO_RECIPE

        self.recipe = recipe or DEMO_RECIPE
        self.out = out
        self.family = open_recipe_model(self.recipe)
        self.split = load_split(self.recipe)
        self._run = RunContext(self.recipe, out, self.family, self.split)

    @property
    def adapter(self) -> Any:  # the benchmarks' older name for the family
        return self.family

    def export(self) -> Path:
        from edgepack import stages

        result = stages.export(self.family, check_samples=self.split.evaluation, options=self.recipe.export,
                               max_length=self.recipe.data.max_length, root=self.out)
        return result.folder / "model.onnx"

    def quantize(self, fp32: Path, **overrides: Any) -> Path:
        """The recipe's quantize stage (`overrides`: quantize keys to change, e.g. graph="qdq", mode="dynamic")."""
        from edgepack import stages
        from edgepack.families import open_model

        data = self.recipe.data
        options = self.recipe.quantize.model_copy(update=overrides) if overrides else self.recipe.quantize
        result = stages.quantize(fp32, open_model(str(fp32)), calibration=self.split.calibration,
                                 options=options, max_length=data.max_length, padding=data.padding,
                                 root=self.out, cache_dir=self.out / "cache",
                                 providers=self.recipe.validate_.providers)
        return result.folder / "model.onnx"

    def validate(self, variants: dict[str, Path], *, samples: Any, providers: Any, settings: Any,
                 fresh: bool = False) -> dict[str, Any]:
        """{"reference": first variant, "variants": {...}} with each variant compared to the first.

        The validate stage (a rerun reuses its folder); `fresh` measures again (repeated rounds of one benchmark).
        """
        import tempfile

        from edgepack import stages
        from edgepack.artifacts import sha256_file
        from edgepack.onnx_files import model_bytes
        from edgepack.runtime.harness import validate_variants

        first = next(iter(variants))
        compared = {name: None if name == first else first for name in variants}
        if not fresh:
            result = stages.validate(variants, self.family, samples=samples, providers=providers, settings=settings,
                                     compared_to=compared, root=self.out, cache_dir=self.out / "ep-cache")
            return {"reference": first, "variants": result.metrics["variants"]}
        with tempfile.TemporaryDirectory(prefix="round-", dir=self.out) as workdir:
            rows = validate_variants(variants, family=self.family, samples=samples, providers=providers,
                                     workdir=Path(workdir), settings=settings, compared_to=compared,
                                     cache_dir=self.out / "ep-cache")
        for name, path in variants.items():
            rows[name].update(size_bytes=model_bytes(path), sha256=sha256_file(path))
        return {"reference": first, "variants": rows}


def report_of(results: dict[str, Any], variants: dict[str, Path], ctx: DemoContext) -> Any:
    """A typed Report around `DemoContext.validate` results, for the report's table functions."""
    from edgepack import __version__
    from edgepack.report.model import DataInfo, Report, Variant

    rows = {name: Variant(path=str(variants[name]), size_bytes=entry["size_bytes"], sha256=entry["sha256"],
                          compared_to=entry.get("compared_to"), providers=entry["providers"])
            for name, entry in results["variants"].items()}
    return Report(edgepack_version=__version__, recipe=ctx.recipe.dump(), model=ctx.family.describe(),
                  data=DataInfo(path=ctx.recipe.data.path, n_calibration=len(ctx.split.calibration),
                                n_evaluation=len(ctx.split.evaluation)),
                  reference=results["reference"], primary_output=ctx.family.primary_output, passed=True,
                  variants=rows)
