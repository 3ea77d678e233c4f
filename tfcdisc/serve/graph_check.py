"""What an export's graph may run: inference, never file, process or network I/O.

tfcdisc's own loaders score with the export's Keras model, loaded in safe mode (no
Lambda layers, no code); the SavedModel's graph is what serving systems run (TF Serving,
a user's ``tf.saved_model.load``), and a crafted graph can hold any op: a
``tf.io.write_file`` in a serving signature was run. So every loader also refuses a graph
with an op outside the allow-list: by name, the ops the exports of this project's
models need (`INFERENCE`; a new layer type may add one: its export test then fails,
naming it), and the checkpoint ops only in the functions the saver runs (and no
signature does). Being registered as stateless is not enough: ``DebugIdentity`` writes
dump files and ``GenerateVocabRemapping`` reads any file, and both are "stateless".
Attributes that ask an allowed op for I/O (``Copy`` with ``debug_ops_spec``) are refused
too.
"""

from __future__ import annotations

from typing import Iterable

from tensorflow.core.protobuf import saved_model_pb2

# Pure computations inference uses: arithmetic, shapes, neural-network kernels, JPEG
# decoding and resizing, strings (the duplicate table's hashes), control flow.
MATH = frozenset("""
Abs Add AddN AddV2 All Any ArgMax ArgMin Atan2 AvgPool BatchMatMulV2 BatchMatMulV3 BiasAdd
Bitcast BitwiseAnd BitwiseOr BitwiseXor BroadcastArgs BroadcastTo Cast Ceil ClipByValue
Concat ConcatV2 Const Conv2D Conv3D Cos Cumsum DepthwiseConv2dNative Einsum Elu Equal Erf
Exp ExpandDims Expm1 Fill Floor FloorDiv FloorMod FusedBatchNormV3 GatherNd GatherV2
Greater GreaterEqual Identity IdentityN IsFinite IsInf IsNan LeakyRelu Less LessEqual Log
Log1p LogSoftmax LogicalAnd LogicalNot LogicalOr MatMul Max MaxPool Maximum Mean Min
Minimum Mod Mul Neg NotEqual OneHot OnesLike Pack Pad PadV2 Placeholder PlaceholderWithDefault
Pow Prod Range Rank RealDiv Reciprocal Relu Relu6 Reshape ResizeArea ResizeBicubic
ResizeBilinear ResizeNearestNeighbor ReverseV2 Round Rsqrt ScatterNd SearchSorted Select
SelectV2 Selu Shape ShapeN Sigmoid Sign Sin Size Slice Softmax Softplus Softsign Split
SplitV Sqrt Square SquaredDifference Squeeze StopGradient StridedSlice Sub Sum Tanh Tile
TopKV2 Transpose Unpack Where ZerosLike DecodeJpeg EnsureShape StringLength
StringToHashBucketFast StringJoin StaticRegexFullMatch
TensorListFromTensor TensorListGetItem TensorListLength TensorListReserve
TensorListSetItem TensorListStack TensorListElementShape EmptyTensorList TensorListPushBack
TensorListPopBack TensorListConcatV2
Erfc Erfinv Tan Acos Asin Atan Cosh Sinh Asinh Acosh Atanh Lgamma Digamma Cumprod Xlogy
Xdivy DivNoNan MulNoNan SegmentSum UnsortedSegmentSum UnsortedSegmentMax Unique InTopKV2
MirrorPad MaxPoolV2 MaxPool3D AvgPool3D Conv2DBackpropInput Conv3DBackpropInputV2
DepthToSpace SpaceToDepth BatchToSpaceND SpaceToBatchND FusedBatchNorm FusedBatchNormV2 LRN
Bucketize MatrixBandPart LinSpace Roll ReverseSequence TensorScatterUpdate TensorScatterAdd
ExtractImagePatches CheckNumerics ResourceGather Sort BroadcastGradientArgs Cross
""".split())
# Stateful, and all an inference graph needs: variables, tables, control flow, checks.
INFERENCE_STATEFUL = frozenset({
    "VarHandleOp", "ReadVariableOp", "AssignVariableOp", "VarIsInitializedOp",
    "DisableCopyOnRead", "DestroyResourceOp", "StatefulPartitionedCall", "PartitionedCall",
    "If", "StatelessIf", "While", "StatelessWhile", "Case", "StatelessCase", "Assert",
    "HashTableV2", "MutableHashTableV2", "LookupTableFindV2", "LookupTableImportV2",
    "LookupTableSizeV2", "InitializeTableV2", "NoOp"})
INFERENCE = MATH | INFERENCE_STATEFUL
# What a SavedModel's own saver runs (save and restore of its variables).
CHECKPOINT = frozenset({"SaveV2", "RestoreV2", "MergeV2Checkpoints", "ShardedFilename"})
# Attributes through which an allowed op is asked for I/O (a debugger's dump URL).
IO_ATTRIBUTES = frozenset({"debug_ops_spec", "debug_urls", "tensor_debug_mode"})


def _problem_of(node, checkpoint: bool) -> str | None:
    if node.op not in INFERENCE and not (checkpoint and node.op in CHECKPOINT):
        return f"runs {node.op}"
    asked = IO_ATTRIBUTES.intersection(node.attr)
    if asked:
        return f"gives {node.op} the I/O attribute {sorted(asked)[0]}"
    return None


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
            why = _problem_of(node, checkpoint=False)
            if why:
                return f"its graph {why} (node {node.name}), which is not inference"
        for name, function in library.items():
            for node in function.node_def:
                why = _problem_of(node, checkpoint=name in saving)
                if why:
                    return f"its graph {why} (in function {name}), which is not inference"
    return None
