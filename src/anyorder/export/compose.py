"""Composing an order of an export's blocks into one ONNX graph: stem -> blocks -> head, built with
`onnx.compose` from the export's verified files. `BlockRuntime` runs an order that recurs this way,
as a single session call instead of one call per block.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Union

import numpy as np


def compose_order(export_dir: Union[str, Path], manifest: dict, order: list[int]):
    """stem -> blocks of `order` -> head as one ONNX model (slots baked in as constants). The
    files are the verified ones of the export directory; nothing is re-exported."""
    import onnx
    from onnx import compose, helper, numpy_helper

    export_dir = Path(export_dir)
    graphs = manifest["graphs"]
    by_index = {entry["index"]: entry["file"] for entry in graphs["blocks"]}
    combined = compose.add_prefix(onnx.load(str(export_dir / graphs["stem"]["file"])), "stem_")
    current = "stem_tokens"
    for slot, index in enumerate(order):
        block = onnx.load(str(export_dir / by_index[index]))
        if manifest.get("slot_input"):  # the slot becomes a constant of this position
            inputs = [i for i in block.graph.input if i.name != "slot"]
            del block.graph.input[:]
            block.graph.input.extend(inputs)
            block.graph.initializer.append(
                numpy_helper.from_array(np.array([slot], dtype=np.int64), "slot"))
        block = compose.add_prefix(block, f"s{slot}_")
        combined = compose.merge_models(combined, block, io_map=[(current, f"s{slot}_tokens")])
        current = f"s{slot}_tokens_out"
    head = compose.add_prefix(onnx.load(str(export_dir / graphs["head"]["file"])), "head_")
    combined = compose.merge_models(combined, head, io_map=[(current, "head_tokens")])
    # Names the runtime feeds and reads: "images" in, "logits" out.
    rename = {"stem_images": "images", "head_logits": "logits"}
    for value in [*combined.graph.input, *combined.graph.output]:
        value.name = rename.get(value.name, value.name)
    for node in combined.graph.node:
        node.input[:] = [rename.get(n, n) for n in node.input]
        node.output[:] = [rename.get(n, n) for n in node.output]
    del combined.graph.value_info[:]
    helper.set_model_props(combined, {"anyorder.order": json.dumps(order)})
    return combined
