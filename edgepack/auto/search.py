"""`edgepack auto`: search the recipe's `auto.space` for the smallest model that meets every budget.

How measurement is spent, cheapest first:
1. proxies, as soon as a candidate is built: its exact file size and an analytic lower bound of its memory (the
   weights must be resident: initializer bytes, plus the runtime baseline for the whole process); a candidate that
   already misses a budget on them is pruned before any run (the INT8 stage's own proxies, its budget cosine and
   the sensitivity-ranked float fallback, happen inside the candidate's quantize stage);
2. successive halving on the evaluation split (optuna's `SuccessiveHalvingPruner`): rung r measures the candidate
   in a fresh process on the first n / eta^(R-1-r) evaluation samples (task metric vs the FP32 reference on the same
   samples, its fidelity: the primary output's cosine to the reference's on the same samples, a short latency, the
   model's peak memory); only the best 1/eta of each rung by the objective (budget violations first) go on to the
   next; an early rung judges accuracy_drop and min_cosine with one sample's slack;
3. the full harness (`stages.validate`: fresh processes, every EP asked, the recipe's warm-up and runs) for the
   finalists only; the choice and the budgets are judged on its figures.
Candidates come from optuna's TPE sampler (constant liar while several are in flight); the recipe itself is the
first trial when it lies in the space. Every candidate is a recipe run through the normal stages into the run
folder, so candidates share every stage they have in common and a rerun reuses all of them (the sampler is
seeded, so a serial rerun proposes the same candidates and finds each one measured).
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edgepack.artifacts import content_hash
from edgepack.auto.backends import Backend
from edgepack.auto.budgets import Budget, Measurement
from edgepack.auto.jobs import BuildJob, EvalJob, run_job
from edgepack.auto.space import SearchSpace
from edgepack.errors import BadInputError
from edgepack.recipe import Recipe
from edgepack.reporter import get_reporter

#: objective value of a candidate that misses a budget: above every candidate that meets them all
INFEASIBLE = 10.0
#: proposals in a row that repeat an earlier candidate's recipe before the search counts the space as exhausted
MAX_REPEATS = 50
#: fewest evaluation samples a rung measures (a task metric on fewer says little)
MIN_RUNG_SAMPLES = 8


@dataclass
class Candidate:
    trial: int
    params: dict[str, Any]
    recipe: dict[str, Any]
    state: str = "running"  # running | complete | pruned | failed
    reason: str | None = None
    build: dict[str, Any] = field(default_factory=dict)
    measured: Measurement = field(default_factory=Measurement)
    rung: int = -1
    value: float | None = None
    workers: set[str] = field(default_factory=set)
    #: set after the harness: the variant name in the report, and its harness figures
    variant: str | None = None
    harness: Measurement | None = None

    @property
    def best(self) -> Measurement:
        return self.harness or self.measured


@dataclass
class SearchSettings:
    budgets: list[Budget]
    objective: str
    trials: int
    ep: str
    provider_for_rungs: str


def rung_sizes(n: int, *, rungs: int, eta: int) -> list[int]:
    """Evaluation samples per rung, ending with all n: 100, 3 rungs, eta 3 -> [12, 34, 100]."""
    sizes = [max(min(n, MIN_RUNG_SAMPLES), math.ceil(n / eta ** (rungs - 1 - r))) for r in range(rungs)]
    return sorted(set(sizes))


class Search:
    """One search: the study, the candidates, and the jobs in flight on the backend."""

    def __init__(self, recipe: Recipe, space: SearchSpace, out: Path, *, settings: SearchSettings,
                 backend: Backend) -> None:
        import optuna

        self.recipe, self.space, self.out, self.settings, self.backend = recipe, space, out, settings, backend
        auto = recipe.auto
        self.eta = auto.reduction_factor
        sampler = make_sampler(auto, space)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.study = optuna.create_study(direction="minimize", sampler=sampler,
                                         pruner=optuna.pruners.SuccessiveHalvingPruner(
                                             min_resource=1, reduction_factor=self.eta))
        self.candidates: list[Candidate] = []
        self._trials: dict[int, Any] = {}
        #: candidate recipe's content hash -> the candidate (repeats are not built again)
        self._by_recipe: dict[str, Candidate] = {}
        #: built model's content hash -> the first candidate that built it (another recipe, the same model: not
        #: measured again)
        self._by_model: dict[str, Candidate] = {}
        self.reference: dict[str, Any] = {}
        self.reference_evals: dict[int, dict[str, Any]] = {}
        self.sizes: list[int] = []
        self.metric: str | None = None
        #: the reference's task metric in the harness (finalists' accuracy_drop is against it)
        self.harness_reference_metric: float | None = None
        self.counts = {"built": 0, "pruned_by_proxy": 0, "pruned_by_halving": 0, "failed": 0, "rung_evaluations": 0}

    # ------------------------------------------------------------------------------------------------ jobs

    def _run_now(self, jobs: list[Any]) -> list[dict[str, Any]]:
        handles = [self.backend.submit(run_job, job) for job in jobs]
        pending = list(handles)
        while pending:
            done = self.backend.wait(pending)
            pending = [h for h in pending if h not in done]
        return [self._result(h) for h in handles]

    def _result(self, handle: Any) -> dict[str, Any]:
        try:
            return self.backend.result(handle)
        except Exception as error:  # a worker that died (killed for memory, a Ray node lost): that job failed
            return {"ok": False, "error": f"worker failed: {type(error).__name__}: {error}"[:300], "exit_code": 1}

    def _eval_job(self, recipe: dict[str, Any], model: str, samples: int, label: str) -> EvalJob:
        reference = self.reference_evals.get(samples, {}).get("outputs") if label != "reference" else None
        return EvalJob(recipe=recipe, root=str(self.out), model=model, samples=samples,
                       runs=self.recipe.auto.rung_runs, provider=self.settings.provider_for_rungs, label=label,
                       reference_outputs=reference)

    # ------------------------------------------------------------------------------------------- reference

    def measure_reference(self) -> None:
        """Export the FP32 reference and measure it once per rung size (accuracy_drop is against it)."""
        tree = self.space.tree({})
        for section in ("distill", "prune", "quantize"):
            tree[section]["enabled"] = False
        built = self._run_now([BuildJob(tree, str(self.out), "reference")])[0]
        if not built["ok"]:
            raise BadInputError(f"auto: the reference (the recipe's FP32 export) failed: {built['error']}")
        self.reference = built
        n = self.recipe.data.n_evaluation
        self.sizes = rung_sizes(n, rungs=self.recipe.auto.rungs, eta=self.eta)
        evals = self._run_now([self._eval_job(tree, built["model"], size, "reference") for size in self.sizes])
        for size, result in zip(self.sizes, evals, strict=True):
            if not result["ok"]:
                raise BadInputError(f"auto: measuring the FP32 reference failed: {result['error']}")
            self.reference_evals[size] = result
        self.metric = self._metric_name(evals[-1]["metrics"])

    def _metric_name(self, metrics: dict[str, float]) -> str | None:
        from edgepack.report.gates import FIDELITY_KEYS

        wanted = self.recipe.auto.metric
        task = [k for k in metrics if k not in FIDELITY_KEYS]
        if wanted is not None and wanted not in metrics:
            raise BadInputError(f"auto.metric '{wanted}': the model's task metrics on this data are "
                                f"{', '.join(task) or 'none'}")
        name = wanted or (task[0] if task else None)
        if name is None and any(b.name == "accuracy_drop" for b in self.settings.budgets):
            raise BadInputError("budget accuracy_drop needs a task metric, and this data gives none: add "
                                "data.pair_field (paraphrase pairs) or data.label_field (class labels)")
        return name

    # ------------------------------------------------------------------------------------------- measuring

    def _reference_cost(self) -> float:
        ref = self.reference_evals[self.sizes[-1]]
        return {"size_mb": self.reference["size_bytes"] / 1e6, "p50_ms": ref.get("p50_ms") or 1.0,
                "peak_rss_mb": (ref.get("peak_mb") or 1.0) - (ref.get("baseline_mb") or 0.0)
                }[self.settings.objective] or 1.0

    def objective_value(self, m: Measurement, *, slack_samples: int | None = None) -> float:
        """Objective / the reference's when every measured budget holds; else INFEASIBLE + the violations.

        `slack_samples`: an early rung on that many samples judges the budgets read from samples with one sample's
        slack (`with_slack`)."""
        cost = getattr(m, self.settings.objective)
        ratio = 1.0 if cost is None else float(cost) / self._reference_cost()
        judged = with_slack(m, slack_samples) if slack_samples else m
        violation = sum(v for b in self.settings.budgets if (v := b.violation(judged)) is not None)
        return ratio if violation == 0 else INFEASIBLE + violation + ratio

    def proxy(self, built: dict[str, Any]) -> Measurement:
        baseline = self.reference_evals[self.sizes[-1]].get("baseline_mb") or 0.0
        weights = float(built["weights_mb"])
        return Measurement(size_mb=built["size_bytes"] / 1e6, peak_rss_mb=weights,
                           process_peak_rss_mb=baseline + weights, how="proxy",
                           estimated=("peak_rss_mb", "process_peak_rss_mb"))

    def from_eval(self, result: dict[str, Any], size_mb: float) -> Measurement:
        ref = self.reference_evals[result["samples"]]
        metric = result["metrics"].get(self.metric) if self.metric else None
        ref_metric = ref["metrics"].get(self.metric) if self.metric else None
        drop = None if metric is None or ref_metric is None else round((ref_metric - metric) * 100, 6)
        peak, base = result.get("peak_mb"), result.get("baseline_mb")
        fidelity = result["metrics"]
        return Measurement(size_mb=size_mb, metric=metric, accuracy_drop=drop,
                           cosine_mean=fidelity.get("cosine_mean"), cosine_min=fidelity.get("cosine_min"),
                           peak_rss_mb=None if peak is None or base is None else peak - base,
                           process_peak_rss_mb=peak, p50_ms=result.get("p50_ms"), p90_ms=result.get("p90_ms"),
                           samples=result["samples"], how="rung")

    # ----------------------------------------------------------------------------------------------- trials

    def _ask(self) -> Candidate | None:
        """A candidate whose recipe no earlier trial had. TPE re-proposes points of a small categorical space: a
        repeat is told the earlier trial's result (its value, or pruned) and asked again, never built or measured
        twice; None when `MAX_REPEATS` proposals in a row were repeats (the space is exhausted)."""
        import optuna

        for _ in range(MAX_REPEATS):
            trial = self.study.ask()
            params = self.space.suggest(trial)
            tree = self.space.tree(params)
            key = content_hash(tree)
            earlier = self._by_recipe.get(key)
            if earlier is None:
                candidate = Candidate(trial.number, params, tree)
                self._trials[trial.number] = trial
                self._by_recipe[key] = candidate
                self.candidates.append(candidate)
                return candidate
            self.counts["repeats_skipped"] = self.counts.get("repeats_skipped", 0) + 1
            if earlier.state == "complete" and earlier.value is not None:
                self.study.tell(trial, earlier.value)
            else:
                self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        return None

    def _finish(self, candidate: Candidate, state: str, reason: str | None = None) -> None:
        import optuna

        candidate.state, candidate.reason = state, reason
        trial = self._trials[candidate.trial]
        trial.set_user_attr("measured", candidate.measured.to_json())
        if reason:
            trial.set_user_attr("reason", reason)
        if state == "complete":
            self.study.tell(trial, candidate.value)
        else:
            self.study.tell(trial, state=optuna.trial.TrialState.PRUNED if state == "pruned"
                            else optuna.trial.TrialState.FAIL)
        get_reporter().info(f"- trial {candidate.trial} {state}: {describe_params(candidate.params)}"
                            f"{' — ' + reason if reason else ''}{self._figures(candidate.measured)}")

    @staticmethod
    def _figures(m: Measurement) -> str:
        parts = [f"{m.size_mb:.2f} MB" if m.size_mb is not None else None,
                 f"drop {m.accuracy_drop:.2f} pt on {m.samples}" if m.accuracy_drop is not None else None,
                 f"cosine {m.cosine_mean:.4f}" if m.cosine_mean is not None else None,
                 f"p50 {m.p50_ms:.1f} ms" if m.p50_ms is not None else None,
                 f"RSS +{m.peak_rss_mb:.0f} MiB" if m.peak_rss_mb is not None and m.how != "proxy" else None]
        text = ", ".join(p for p in parts if p)
        return f" ({text})" if text else ""

    def on_build(self, candidate: Candidate, result: dict[str, Any]) -> EvalJob | None:
        candidate.workers.add(str(result.get("worker")))
        if not result["ok"]:
            self.counts["failed"] += 1
            self._finish(candidate, "failed", result["error"])
            return None
        self.counts["built"] += 1
        candidate.build = result
        candidate.measured = self.proxy(result)
        earlier = self._by_model.setdefault(str(result.get("model_sha256") or id(candidate)), candidate)
        if earlier is not candidate:
            self._same_model(candidate, earlier)
            return None
        missed = self._proxy_misses(candidate.measured)
        if missed:
            self.counts["pruned_by_proxy"] += 1
            self._finish(candidate, "pruned", f"proxy: {missed}")
            return None
        candidate.rung = 0
        return self._eval_job(candidate.recipe, result["model"], self.sizes[0], f"trial {candidate.trial}")

    def _same_model(self, candidate: Candidate, earlier: Candidate) -> None:
        """A knob that changed nothing (CLE with no equalizable pair, 16-bit on a tensor kept float): the same model
        file as an earlier trial's. Not measured or sent to the harness again; optuna is told the earlier result
        (its value once complete, else pruned), and the trial is not counted against `trials` (run_trials)."""
        import optuna

        self.counts["same_model"] = self.counts.get("same_model", 0) + 1
        candidate.measured = earlier.measured
        candidate.state, candidate.reason = "pruned", f"the same model as trial {earlier.trial} (another recipe)"
        trial = self._trials[candidate.trial]
        if earlier.state == "complete" and earlier.value is not None:
            self.study.tell(trial, earlier.value)
        else:
            self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        get_reporter().info(f"- trial {candidate.trial} skipped: {describe_params(candidate.params)} — "
                            f"{candidate.reason}")

    def _proxy_misses(self, m: Measurement) -> str | None:
        margin = self.recipe.auto.proxy_margin
        for budget in self.settings.budgets:
            violation = budget.violation(m)
            if violation is None:
                continue
            allowed = margin if budget.name in m.estimated else 0.0
            if violation > allowed:
                value = budget.value(m)
                bound = "at least " if budget.name in m.estimated else ""
                return f"{budget.name} {bound}{value:.2f} > {budget.limit:g} {budget.kind.unit}"
        return None

    def on_eval(self, candidate: Candidate, result: dict[str, Any]) -> EvalJob | None:
        candidate.workers.add(str(result.get("worker")))
        if not result["ok"]:
            self.counts["failed"] += 1
            self._finish(candidate, "failed", result["error"])
            return None
        self.counts["rung_evaluations"] += 1
        candidate.measured = self.from_eval(result, candidate.measured.size_mb or 0.0)
        unmeasured = self._unmeasured_fidelity(candidate.measured, result)
        if unmeasured:
            self.counts["pruned_by_fidelity"] = self.counts.get("pruned_by_fidelity", 0) + 1
            self._finish(candidate, "pruned", unmeasured)
            return None
        last = candidate.rung == len(self.sizes) - 1
        candidate.value = self.objective_value(candidate.measured, slack_samples=None if last else result["samples"])
        trial = self._trials[candidate.trial]
        trial.report(candidate.value, step=self.eta ** candidate.rung)
        if last:
            self._finish(candidate, "complete")
            return None
        if trial.should_prune():
            self.counts["pruned_by_halving"] += 1
            self._finish(candidate, "pruned", f"successive halving: not in the best 1/{self.eta} at rung "
                                              f"{candidate.rung} ({result['samples']} samples)")
            return None
        candidate.rung += 1
        return self._eval_job(candidate.recipe, candidate.build["model"], self.sizes[candidate.rung],
                              f"trial {candidate.trial}")

    def _unmeasured_fidelity(self, m: Measurement, result: dict[str, Any]) -> str | None:
        """A min_cosine budget on a candidate whose output cannot be compared with the reference's: refused (a budget
        that cannot be read is not met)."""
        budget = next((b for b in self.settings.budgets if b.name == "min_cosine"), None)
        if budget is None or m.cosine_mean is not None:
            return None
        why = result.get("fidelity_note") or "the family gives no cosine for this output"
        return f"{budget.describe()} cannot be measured: {why}"

    def run_trials(self) -> None:
        """Ask, build, measure rung by rung, until `trials` candidates have finished."""
        if self.recipe.auto.sampler == "grid":
            points = grid_points(self.space)
            self.settings.trials = min(self.settings.trials, len(points))
        else:
            base = self.space.base_point()
            points = [base] if base is not None else []
        for point in points:
            self.study.enqueue_trial(point)
        inflight: dict[Any, tuple[Candidate, str]] = {}
        asked = 0
        while True:
            while len(inflight) < self.backend.workers and asked < self.settings.trials:
                candidate = self._ask()
                asked += 1
                if candidate is None:  # every proposal repeats a measured candidate
                    asked = self.settings.trials
                    break
                job = BuildJob(candidate.recipe, str(self.out), f"trial {candidate.trial}")
                inflight[self.backend.submit(run_job, job)] = (candidate, "build")
            if not inflight:
                return
            for handle in self.backend.wait(list(inflight)):
                candidate, kind = inflight.pop(handle)
                result = self._result(handle)
                follow = self.on_build(candidate, result) if kind == "build" else self.on_eval(candidate, result)
                if kind == "build" and (candidate.reason or "").startswith("the same model as") \
                        and self.recipe.auto.sampler != "grid" and self.counts["same_model"] <= MAX_REPEATS:
                    asked -= 1  # a knob that changed nothing: ask again (bounded like recipe repeats)
                if follow is not None:
                    inflight[self.backend.submit(run_job, follow)] = (candidate, "eval")


def with_slack(m: Measurement, samples: int) -> Measurement:
    """`m` as an early rung on `samples` samples judges it: one sample's slack on the figures read from samples.
    accuracy_drop: one sample of n moves a fraction metric by 100/n points (more than a 0.5 point budget on 26);
    cosine_mean: the mean with its worst sample counted as a perfect match, + (1 - cosine_min) / n.

    >>> judged = with_slack(Measurement(accuracy_drop=5.0, cosine_mean=0.9, cosine_min=0.5), 10)
    >>> judged.accuracy_drop, round(judged.cosine_mean, 6)
    (-5.0, 0.95)
    """
    drop, cosine = m.accuracy_drop, m.cosine_mean
    if cosine is not None and m.cosine_min is not None:
        cosine = min(1.0, cosine + (1.0 - m.cosine_min) / samples)
    return replace(m, accuracy_drop=None if drop is None else drop - 100.0 / samples, cosine_mean=cosine)


def _meets(candidate: Candidate, budgets: list[Budget]) -> bool:
    return all(b.met(candidate.measured) for b in budgets)


def promote_pruned(search: Search, *, wanted: int) -> list[Candidate]:
    """Successive halving judges early rungs on few samples: when fewer than `wanted` complete candidates meet the
    budgets on the full split, the halving-pruned ones that met them at their rung (best first) are measured on the
    full split too. Returns those promoted."""
    budgets = search.settings.budgets
    have = sum(1 for c in search.candidates if c.state == "complete" and _meets(c, budgets))
    pruned = sorted((c for c in search.candidates if c.state == "pruned" and c.rung >= 0 and c.value is not None
                     and c.value < INFEASIBLE), key=lambda c: c.value or 0.0)[: max(0, wanted - have)]
    if not pruned:
        return []
    full = search.sizes[-1]
    results = search._run_now([search._eval_job(c.recipe, c.build["model"], full, f"trial {c.trial}")
                               for c in pruned])
    for candidate, result in zip(pruned, results, strict=True):
        if not result["ok"]:
            continue
        candidate.measured = search.from_eval(result, candidate.measured.size_mb or 0.0)
        candidate.value = search.objective_value(candidate.measured)
        candidate.rung, candidate.state = len(search.sizes) - 1, "complete"
        candidate.reason = f"promoted after the search ({candidate.reason}; too few finalists met the budgets)"
        search.counts["promoted"] = search.counts.get("promoted", 0) + 1
    return pruned


def make_sampler(auto: Any, space: SearchSpace) -> Any:
    """TPE or random; grid is a random sampler that never samples: every grid point is enqueued (`grid_points`)."""
    import optuna

    if auto.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=auto.seed, n_startup_trials=auto.startup_trials, constant_liar=True)
    return optuna.samplers.RandomSampler(seed=auto.seed)


def grid_points(space: SearchSpace) -> list[dict[str, Any]]:
    """Every point of a space of lists (optuna's GridSampler stops the study from inside `tell`, which an
    ask-and-tell loop cannot take, so the grid is enqueued instead)."""
    ranges = [d.name for d in space.dimensions if d.choices is None]
    if ranges:
        raise BadInputError(f"auto.sampler grid needs a list of values for every knob; {', '.join(ranges)} "
                            "is a range: list its values, or use sampler tpe")
    labels = [d.labels for d in space.dimensions]
    return [dict(zip((d.name for d in space.dimensions), point, strict=True)) for point in itertools.product(*labels)]


def describe_params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items()) or "the recipe as written"


def elapsed(start: float) -> float:
    return round(time.perf_counter() - start, 1)


__all__ = ["Candidate", "Search", "SearchSettings", "describe_params", "promote_pruned", "rung_sizes"]
