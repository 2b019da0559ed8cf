"""`vlpipe score`: the official metrics of a predictions file, without a model or caches.

The predictions are read in the submission formats `vlpipe predict` writes (and the official
evaluators read): VQA results json, GQA predictions json, NLVR2 csv; easy-VQA uses the GQA
layout. The annotations go through the same readers as training, so a figure printed here is
the figure `vlpipe evaluate` prints for the same predictions.
"""

from __future__ import annotations

from vlpipe.errors import EvaluationError
from vlpipe.fusion.tasks import get_task
from vlpipe.pipelines.configs import ScoreJob
from vlpipe.pipelines.data import DataSpec


def run_score(job: ScoreJob) -> dict:
    spec = DataSpec.of(job.task, job.data, job.eval)
    task = get_task(spec.task, spec.evaluation())
    records = [r for r in spec.records() if r.labelled]
    if not records:
        raise EvaluationError(
            f"{', '.join(map(str, spec.annotations))}: no labelled questions to score"
        )
    return task.evaluate(task.read_predictions(job.predictions), records)
