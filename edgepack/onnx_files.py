"""ONNX files: loading user-supplied ones with one-line errors, and the one 2 GiB external-data rule for saving.

An ONNX file names its external data files itself (`location` of each external tensor), so a file from elsewhere
could make ONNX Runtime read any file the user can: `check_external_data` refuses, before ORT or onnx open a
data file, a location that is absolute, climbs out with '..', is (or passes through) a symlink, or is not a
regular file inside the model's folder, and data ranges past the end of their file (a truncated copy).
onnx >= 1.16 and onnxruntime >= 1.19 check some of this themselves, with other messages; ours holds whatever
versions are installed and names the tensor and the fix.

No torch import: bundles and probes use it too.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath

import onnx

from edgepack.errors import BadInputError

_TWO_GIB = 2**31


def load_onnx_checked(path: Path) -> onnx.ModelProto:
    """Load (graph only) and check an ONNX file; a missing, truncated or non-ONNX file is a BadInputError."""
    if not path.is_file():
        raise BadInputError(f"ONNX model {path} does not exist; pass the path of an .onnx file "
                            "(edgepack export writes one)")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf's DecodeError and onnx's ValidationError share no useful base
        raise _invalid(path, err) from None
    check_external_data(model, path)  # before onnx's checker opens any data file
    try:
        # with external data the checker must know the model's folder (in memory it looks in the cwd)
        onnx.checker.check_model(str(path) if _has_external_data(model) else model)
    except Exception as err:
        raise _invalid(path, err) from None
    return model


def _invalid(path: Path, err: Exception) -> BadInputError:
    reason = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
    return BadInputError(f"{path} is not a valid ONNX model ({reason}); the file may be truncated — "
                         "re-export it with `edgepack export`")


def _has_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in _all_tensors(model))


def check_onnx_file(path: Path) -> None:
    """The external-data check for an ONNX file that is not otherwise loaded here (the graph is parsed, no
    weights read): every path into ORT goes through this or `load_onnx_checked` first."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # not parseable: the loaders downstream say so in their own words
        return
    check_external_data(model, path)


def check_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Refuse external-data locations outside the folder of `path` (see the module docstring)."""
    folder = Path(path).resolve().parent
    for tensor in _all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        where = f"{path}: tensor '{tensor.name}' keeps its data in '{location}'"
        fix = "keep the data files in the model's folder, named relative to it (onnx.save_model(..., " \
              "save_as_external_data=True))"
        _check_location(location, folder, where=where, fix=fix)
        _check_range(folder / location, info, where=where)


def _check_location(location: str, folder: Path, *, where: str, fix: str) -> None:
    if not location:
        raise BadInputError(f"{where}: an external tensor without a location; {fix}")
    parts = PureWindowsPath(location).parts + PurePosixPath(location).parts
    if PurePosixPath(location).is_absolute() or PureWindowsPath(location).is_absolute() or \
            PureWindowsPath(location).drive or ".." in parts or "\x00" in location:
        raise BadInputError(f"{where}, which is outside the model's folder (absolute or '..'); refusing to read "
                            f"it; {fix}")
    target = folder / location
    step = folder
    for part in PurePosixPath(location).parts:
        step = step / part
        if step.is_symlink():
            raise BadInputError(f"{where}, and {step} is a symbolic link (to {os.path.realpath(step)}); refusing "
                                f"to follow it; copy the data file into the folder instead; {fix}")
    if not target.resolve().is_relative_to(folder):
        raise BadInputError(f"{where}, which resolves outside the model's folder; refusing to read it; {fix}")
    if not target.is_file():
        state = "does not exist" if not target.exists() else "is not a regular file"
        raise BadInputError(f"{where}, which {state}; copy the model's .data file beside it")


def _check_range(target: Path, info: dict[str, str], *, where: str) -> None:
    try:
        offset = int(info.get("offset", "0") or 0)
        length = int(info["length"]) if info.get("length") else None
    except ValueError:
        raise BadInputError(f"{where} with a non-numeric offset or length; re-save the model") from None
    size = target.stat().st_size
    if offset < 0 or (length is not None and length < 0) or offset + (length or 0) > size:
        raise BadInputError(f"{where} at bytes {offset}..{offset + (length or 0)}, but the file has {size} bytes "
                            "(truncated or another file); copy the complete .data file")


def _all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor a model can carry: initializers, sparse ones, Constant attributes, in every subgraph and
    function (what onnx.external_data_helper walks, without its private helpers)."""
    graphs = [model.graph, *(node_graph for function in model.functions for node in function.node
                             for node_graph in _attribute_graphs(node))]
    while graphs:
        graph = graphs.pop()
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield from (sparse.values, sparse.indices)
        for node in graph.node:
            yield from _attribute_tensors(node)
            graphs.extend(_attribute_graphs(node))
    for function in model.functions:
        for node in function.node:
            yield from _attribute_tensors(node)


def _attribute_tensors(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    for attribute in node.attribute:
        if attribute.HasField("t"):
            yield attribute.t
        yield from attribute.tensors
        if attribute.HasField("sparse_tensor"):
            yield from (attribute.sparse_tensor.values, attribute.sparse_tensor.indices)
        for sparse in attribute.sparse_tensors:
            yield from (sparse.values, sparse.indices)


def _attribute_graphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attribute in node.attribute:
        if attribute.HasField("g"):
            yield attribute.g
        yield from attribute.graphs


def external_data_threshold() -> int:
    """Bytes of weights above which a model is saved with its weights in an external `<model>.onnx.data` file.

    Protobuf cannot serialise a message of 2 GiB or more, so every stage that writes a model (export, the
    calibration graph, SmoothQuant's rewrite, the quantizer, fp16 and fixed-shape copies) asks this one function;
    the 64 MiB margin leaves room for the graph itself and the outputs calibration adds. The environment variable
    EDGEPACK_EXTERNAL_DATA_BYTES lowers it, so the tests carry a small model through every stage as external data.
    """
    override = os.environ.get("EDGEPACK_EXTERNAL_DATA_BYTES")
    if override is None:
        return _TWO_GIB - 2**26
    try:
        value = int(override)
    except ValueError:
        raise BadInputError(f"EDGEPACK_EXTERNAL_DATA_BYTES={override!r} is not a number of bytes; unset it or give "
                            "an integer") from None
    return max(0, min(value, _TWO_GIB - 2**26))


def needs_external_data(model: onnx.ModelProto) -> bool:
    return model.ByteSize() >= external_data_threshold()


def save_onnx(model: onnx.ModelProto, path: Path) -> Path:
    """Save `model` at `path`; its weights go to `<name>.data` beside it when `needs_external_data`."""
    if needs_external_data(model):
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=0)
    else:
        onnx.save_model(model, str(path))
    return path


def externalize_if_large(path: Path) -> None:
    """After torch.onnx: `<name>.data` holds the weights when the model is over the threshold.

    Below 2 GB torch.onnx writes one file: over the (lowered) threshold it is rewritten with external data. Over
    2 GB it writes one file per weight beside the model (`onnx__MatMul_55`, ...): they are gathered into
    `<name>.data` by `consolidate_external_data`, a tensor at a time.
    """
    model = onnx.load(str(path), load_external_data=False)
    if _has_external_data(model):
        consolidate_external_data(model, path)
        return
    if path.stat().st_size >= external_data_threshold():
        save_onnx(onnx.load(str(path)), path)


def consolidate_external_data(model: onnx.ModelProto, path: Path, *, chunk: int = 1 << 24) -> None:
    """Move every external tensor of `model` (saved at `path`) into `<name>.data`, in graph order, copying
    `chunk` bytes at a time (memory stays at one chunk, whatever the model's size); the old files are removed."""
    check_external_data(model, path)
    folder = Path(path).parent
    target = folder / (Path(path).name + ".data")
    tmp = folder / f".{target.name}.tmp-{os.getpid()}"
    sources: set[Path] = set()
    with open(tmp, "wb") as out:
        for tensor in _all_tensors(model):
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                continue
            info = {entry.key: entry.value for entry in tensor.external_data}
            source = folder / info["location"]
            offset, length = int(info.get("offset") or 0), info.get("length")
            start = out.tell()
            with open(source, "rb") as handle:
                handle.seek(offset)
                remaining = int(length) if length else source.stat().st_size - offset
                while remaining > 0:
                    block = handle.read(min(chunk, remaining))
                    if not block:
                        raise BadInputError(f"{source}: ends before the {info.get('length')} bytes of tensor "
                                            f"'{tensor.name}'; the export was cut short — export again")
                    out.write(block)
                    remaining -= len(block)
            sources.add(source)
            del tensor.external_data[:]
            for key, value in (("location", target.name), ("offset", str(start)), ("length", str(out.tell() - start))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
    onnx.save_model(model, str(path))
    os.replace(tmp, target)
    for source in sources - {target}:
        source.unlink(missing_ok=True)


def without_weights(model: onnx.ModelProto, *, keep_bytes: int = 4096) -> onnx.ModelProto:
    """A copy of `model` whose initializers above `keep_bytes` keep their name, type and dims but no data.

    For shape inference and graph analysis of a model over 2 GB: `onnx.shape_inference.infer_shapes(model)`
    serializes its argument, and protobuf cannot serialize 2 GiB (EncodeError); type and shape inference read
    only an initializer's dims (small shape constants are kept for data propagation). Nothing reads the data:
    the stripped tensors point at an external location that does not exist."""
    graph = model.graph  # every part but the initializers, copied without touching `model`
    copy = onnx.helper.make_model(
        onnx.helper.make_graph(graph.node, graph.name, graph.input, graph.output, value_info=graph.value_info,
                               sparse_initializer=graph.sparse_initializer, doc_string=graph.doc_string),
        opset_imports=model.opset_import, functions=model.functions, ir_version=model.ir_version,
        producer_name=model.producer_name, producer_version=model.producer_version, domain=model.domain,
        model_version=model.model_version, doc_string=model.doc_string)
    copy.metadata_props.extend(model.metadata_props)
    for tensor in model.graph.initializer:
        size = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize * _count(tensor.dims) \
            if tensor.data_type else 0
        if size <= keep_bytes and tensor.data_location != onnx.TensorProto.EXTERNAL:
            copy.graph.initializer.append(tensor)
            continue
        stub = copy.graph.initializer.add()
        stub.name, stub.data_type = tensor.name, tensor.data_type
        stub.dims.extend(tensor.dims)
        stub.data_location = onnx.TensorProto.EXTERNAL
        entry = stub.external_data.add()
        entry.key, entry.value = "location", "edgepack-weights-not-loaded"
    return copy


def _count(dims: object) -> int:
    total = 1
    for dim in dims:  # type: ignore[attr-defined]
        total *= int(dim)
    return total


def external_data_files(path: Path) -> list[Path]:
    """The external data files `path` names (checked: inside its folder), sorted, without duplicates."""
    model = onnx.load(str(path), load_external_data=False)
    check_external_data(model, path)
    names = {entry.value for tensor in _all_tensors(model) if tensor.data_location == onnx.TensorProto.EXTERNAL
             for entry in tensor.external_data if entry.key == "location"}
    return [Path(path).parent / name for name in sorted(names)]


def model_digest(path: Path) -> str:
    """sha256 of a model *with its weights*: of the .onnx alone when it has no external data (so it equals the
    file's sha256), else of the .onnx's and each data file's sha256. A model saved with external data keeps only
    offsets in the .onnx: two models that differ in weights alone have the same .onnx bytes, so cache keys and
    input hashes use this, never the .onnx's sha256 alone."""
    import hashlib

    from edgepack.artifacts import sha256_file

    own = sha256_file(Path(path))
    files = external_data_files(Path(path))
    if not files:
        return own
    text = "\n".join([own, *(f"{f.name}:{sha256_file(f)}" for f in files)])
    return hashlib.sha256(text.encode()).hexdigest()


def model_bytes(path: Path) -> int:
    """Bytes of a model file plus its external data file, if any."""
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)
