"""Export: one ONNX graph per block plus stem, head and manifest (`blocks`), the order-agnostic
ONNX Runtime (`runtime`), whole-order graphs (`compose`), finding an export from a path or an
MLflow model URI (`sources`), and the `anyorder-run` command (`cli`).
"""
