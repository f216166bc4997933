"""Model compression before export: knowledge distillation (`distill.py`, `trainer.py`, `students.py`) and
structured / unstructured pruning (`prune.py`); `stages.py` is the pipeline seam (`distill_model`, `prune_model`)
and `config.py` the recipe sections (`DistillSection`, `PruneSection`).

Submodules import torch and transformers; this package file imports nothing heavy, so the recipe can load
`edgepack.compress.config` quickly.
"""

from edgepack.compress.config import DistillSection, PruneSection

__all__ = ["DistillSection", "PruneSection"]
