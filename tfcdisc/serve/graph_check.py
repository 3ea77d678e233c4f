"""What an export's graph may run: inference, never file, process or network I/O.

tfcdisc's own loaders score with the export's Keras model, loaded in safe mode (no
Lambda layers, no code); the SavedModel's graph is what serving systems run (TF Serving,
a user's ``tf.saved_model.load``), and a crafted graph can hold any op: a
``tf.io.write_file`` in a serving signature was run. So every loader also refuses a graph
with an op outside the allow-list: the ops this TensorFlow registers as stateless (pure
computations) except those that read files, plus the stateful ops an inference graph
needs (variables, hash tables, control flow, asserts); the checkpoint ops only in the
functions the saver runs (and no signature does). An op this TensorFlow does not know
is refused too.
"""

from __future__ import annotations

from typing import Iterable

from tensorflow.core.protobuf import saved_model_pb2
from tensorflow.python.framework import op_def_registry

# Registered stateless, yet they read files.
READS_FILES = frozenset({"ReadFile", "MatchingFiles", "ImmutableConst"})
# Stateful, and all an inference graph needs: variables, tables, control flow, checks.
INFERENCE_STATEFUL = frozenset({
    "VarHandleOp", "ReadVariableOp", "AssignVariableOp", "VarIsInitializedOp",
    "DisableCopyOnRead", "DestroyResourceOp", "StatefulPartitionedCall", "If", "While",
    "Case", "Assert", "HashTableV2", "MutableHashTableV2", "LookupTableFindV2",
    "LookupTableImportV2", "LookupTableSizeV2", "InitializeTableV2", "NoOp"})
# What a SavedModel's own saver runs (save and restore of its variables).
CHECKPOINT = frozenset({"SaveV2", "RestoreV2", "MergeV2Checkpoints"})


def _allowed(op: str, checkpoint: bool) -> bool:
    if op in INFERENCE_STATEFUL or (checkpoint and op in CHECKPOINT):
        return True
    definition = op_def_registry.get(op)
    return definition is not None and not definition.is_stateful and op not in READS_FILES


def _called(nodes: Iterable) -> set[str]:
    """Functions named in the nodes' attributes (calls, branches, loop bodies)."""
    out = set()
    for node in nodes:
        for attr in node.attr.values():
            if attr.HasField("func"):
                out.add(attr.func.name)
            out.update(f.name for f in attr.list.func)
    return out


def _closure(start: set[str], library: dict) -> set[str]:
    seen, todo = set(), list(start)
    while todo:
        name = todo.pop()
        if name in seen or name not in library:
            continue
        seen.add(name)
        todo.extend(_called(library[name].node_def))
    return seen


def problem(saved_model_pb: bytes) -> str | None:
    """What in a ``saved_model.pb`` is not inference (the op and where), or None."""
    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString(saved_model_pb)
    for meta_graph in saved.meta_graphs:
        graph = meta_graph.graph_def
        library = {f.signature.name: f for f in graph.library.function}
        saver = {name.split(":")[0] for name in (meta_graph.saver_def.save_tensor_name,
                                                  meta_graph.saver_def.restore_op_name)}
        main = [n for n in graph.node if n.name not in saver]
        served = _closure(_called(main), library)  # what signatures and init ops can reach
        saving = _closure(_called(n for n in graph.node if n.name in saver), library) - served
        for node in main:
            if not _allowed(node.op, checkpoint=False):
                return f"its graph runs {node.op} (node {node.name})"
        for name, function in library.items():
            for node in function.node_def:
                if not _allowed(node.op, checkpoint=name in saving):
                    return f"its graph runs {node.op} (in function {name})"
    return None
