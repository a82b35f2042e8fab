"""The pipeline around the library: one script per DVC stage (`stages`), the stage plumbing
(`stage`: arguments, settings, checks, the stage's MLflow run; `tracking`: the MLflow side;
`outputs`: what several stages write and log, figures included), the Prefect flow and its
scheduler (`orchestration`), the studies (`studies`) and the quiet environment (`env`).

Run from the project root: `python -m pipeline.stages.<stage>` (as dvc.yaml does),
`python -m pipeline.orchestration.flow run`, `python -m pipeline.studies.study`.
"""
