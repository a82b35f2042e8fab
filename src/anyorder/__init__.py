"""anyorder: vision transformers whose blocks run in any order (LayerShuffle), as a library.

Subpackages by concern: `data` (sources, splits, prepared data, model inputs), `model` (the
any-order ViT and its variants, checkpoints, merging), `training` (the loop, resume, torchrun),
`evaluation` (accuracy over orders, pruning, analysis, gates, intervals), `robustness`
(nullspace noise, attacks, corruptions), `export` (per-block ONNX, the order-agnostic runtime,
`anyorder-run`), `serving` (HTTP service, workers, router; the `serve` extra).
Modules: `settings` (the typed-settings machinery), `config` (the pipeline's params schema),
`report` (the report's tables), `pyfunc` (the MLflow model flavour of an export), `device`,
`threads`, `files` (atomic, reproducible writes), `errors`.
"""
