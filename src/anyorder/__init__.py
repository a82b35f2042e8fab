"""anyorder: vision transformers whose blocks run in any order (LayerShuffle), as a library.

Modules: config, data, model, orders, train, evaluate, checkpoint, files, summary, errors;
export (one ONNX graph per block), runtime (any order of any subset of them, ONNX Runtime),
pyfunc (the MLflow model flavour of an export), gates (when a registered version is promoted).
"""
