"""Judge training pipeline: task sources, a sandbox for generated code, automatic labelling of draft/target
mismatches (AutoJudge, Garipov et al. 2025), hand labels (Bachmann et al. 2025's TokenCourt form), training
the linear head, and evaluating it against standard speculative and target-only decoding.

Offline tooling around engine/: it reuses the engine's model, decoding loop and judge file, never imports
Ray, and is not on the serving path. docs/judge.md describes the pipeline, the data formats and the commands.
"""

from __future__ import annotations


class TrainingError(ValueError):
    """Something the user can fix (a bad task source, data from another target, too little data); the
    message says what and how. `judgeserve` prints it as one line."""
