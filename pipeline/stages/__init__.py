"""One entry point per DVC stage, run by dvc.yaml as `python -m pipeline.stages.<stage>`: the
stage's settings and input checks through the plumbing (`pipeline.stage`), the compute in the
library (`anyorder`), its outputs and MLflow logging through `pipeline.outputs`."""
