"""The recipe's `auto:` section: the search space, the budgets and how the search spends its measurements.

Typed like every recipe section (pydantic, frozen, unknown keys rejected with a did-you-mean). It imports neither
optuna nor the recipe, so loading a recipe stays fast; knob names and values are checked against the knob
registry and the recipe schema when the search starts (`space.SearchSpace.build`).

    auto:
      space:                          # knob -> values (a list) or a range ({low, high, step} / {low, high, log})
        layers_kept: [4, 5, 6]        # named knobs: auto/space.py KNOBS (docs/auto.md lists them)
        ffn_prune: [0.0, 0.25, 0.5]
        smoothquant: [search, off]
        quantize.calibrator: [minmax, percentile]   # or any recipe key, by its dotted path
      budgets: {accuracy_drop: 0.5}   # more (or stricter) with --budget NAME=VALUE
      trials: 24
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edgepack.errors import BadInputError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RangeDomain(_Section):
    """A numeric range: integers when low, high and step are integers, else floats (`log`: sampled log-uniform)."""

    low: float
    high: float
    step: float | None = Field(None, gt=0)
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> RangeDomain:
        if self.high < self.low:
            raise BadInputError(f"auto.space range low={self.low} > high={self.high}; write low <= high")
        if self.log and (self.low <= 0 or self.step is not None):
            raise BadInputError("auto.space range with log: true needs low > 0 and no step")
        return self

    @property
    def integer(self) -> bool:
        return all(float(v).is_integer() for v in (self.low, self.high, self.step or 1)) and not self.log


#: knob values: a list of choices (YAML scalars; null allowed) or a range
Domain = list[Any] | RangeDomain


class AutoSection(_Section):
    #: knob -> domain; empty: the search has one point, the recipe itself
    space: dict[str, Domain] = Field(default_factory=dict)
    #: budget name -> limit (`auto/budgets.py` BUDGETS: accuracy_drop, size_mb, peak_rss_mb, p50_ms, ...)
    budgets: dict[str, float] = Field(default_factory=dict)
    #: candidates the sampler proposes (the recipe's own point is the first, when it lies in the space)
    trials: int = Field(24, ge=1)
    #: what "smallest" means when choosing among the candidates that meet every budget
    objective: Literal["size_mb", "p50_ms", "peak_rss_mb"] = "size_mb"
    #: the task metric accuracy_drop reads (null: the family's first, e.g. paraphrase_recall_at_1, top1_accuracy)
    metric: str | None = None
    #: optuna sampler: tpe (with constant liar for parallel trials) | random | grid (every point of a space of
    #: lists, in optuna's grid order; trials beyond the grid's size are not asked)
    sampler: Literal["tpe", "random", "grid"] = "tpe"
    #: trials before TPE models the results (random until then)
    startup_trials: int = Field(8, ge=1)
    seed: int = 0
    #: candidates built and measured at once (the local process pool or Ray tasks in flight)
    workers: int = Field(1, ge=1)
    #: successive halving on the evaluation split: rung r sees n / reduction_factor^(rungs-1-r) samples
    rungs: int = Field(3, ge=1)
    reduction_factor: int = Field(3, ge=2)
    #: candidates that get the full harness (fresh processes, every EP, the recipe's runs): the best by the
    #: objective that meet the budgets on the evaluation split, then the rest of the Pareto front
    finalists: int = Field(3, ge=1)
    #: timed runs of the latency figure at each rung (the finalists get validate.runs)
    rung_runs: int = Field(10, ge=1)
    #: a candidate whose proxy (exact size, analytic memory) misses a budget by more than this fraction is pruned
    #: before any evaluation
    proxy_margin: float = Field(0.25, ge=0)

    @field_validator("space")
    @classmethod
    def _nonempty_lists(cls, value: dict[str, Domain]) -> dict[str, Domain]:
        for name, domain in value.items():
            if isinstance(domain, list) and not domain:
                raise BadInputError(f"auto.space.{name} is an empty list; give at least one value")
        return value


__all__ = ["AutoSection", "Domain", "RangeDomain"]
