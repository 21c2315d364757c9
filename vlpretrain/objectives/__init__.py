"""Training objectives, one file each, registered by name (`train.objective`): clip, siglip, coca, distill.

`registry` holds the contract (`Objective`) and the registry; importing this package imports every entry, so each
registers itself. Adding an objective is one file here plus its line below.
"""

from vlpretrain.objectives import clip, coca, distill, siglip  # noqa: F401  (each registers itself)
from vlpretrain.objectives.registry import (
    OBJECTIVES,
    PER_FORWARD,
    Objective,
    Outputs,
    build_objective,
    check_objective,
    objective_class,
    register,
    total,
)

__all__ = ["OBJECTIVES", "PER_FORWARD", "Objective", "Outputs", "build_objective", "check_objective", "objective_class",
           "register", "total"]
