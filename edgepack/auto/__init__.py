"""`edgepack auto`: search compression x quantization settings against measured budgets.

The search space is the recipe's `auto:` section (`config.py`, imported by the recipe, so this package imports
nothing heavy at the top), its knobs a registry (`space.py`); candidates are recipe variants run by the normal
stages (`jobs.py`) on a local process pool or Ray (`backends.py`); optuna samples and prunes (`search.py`); the
finalists get the full harness and the report its Pareto front (`driver.py`, `pareto.py`).

>>> from edgepack.auto.driver import run_auto          # doctest: +SKIP
>>> report = run_auto(recipe, Path("runs/auto"), budgets=["accuracy_drop=0.5"])   # doctest: +SKIP
"""
