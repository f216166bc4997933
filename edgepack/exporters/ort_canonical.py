"""Byte-identical .ort files: rewrite the one part of ONNX Runtime's ORT-format output whose layout is random.

Why the converter's output differs from run to run (onnxruntime 1.2x, `InferenceSession::SaveToOrtFormat`):
the FlatBuffer is built back to front as [root offset, "ORTM", session table, kernel type string resolver, model,
ORT version string]. The model (graph, nodes, initializers) is written from ordered containers and comes out the
same every time. The kernel type string resolver (`KernelTypeStrResolver::SaveToOrtFormat`, onnxruntime
core/framework/kernel_type_str_resolver.cc) walks `op_kernel_type_str_map_`, an `InlinedHashMap`
(absl::flat_hash_map) whose iteration order depends on a per-process hash seed and on where the table lands on the
heap, and creates one FlatBuffers table per operator in that order. `CreateVectorOfSortedTables` then sorts the
*vector of offsets* by op id, so the file reads the same (ORT loads it fine, and every reader sees identical
content), but the tables sit at other offsets: a few KB near the start of the file differ, run to run and even
between two conversions in one process. Nothing else in the file depends on time, path, thread count or host.

What we do (our own code: ORT has no option for it): keep everything from the model on, byte for byte, and
rebuild the front (resolver + session table + header) with the `flatbuffers` builder, creating the tables in the
sorted order the vector already has. The offsets into the kept part are plain arithmetic on positions. The result
is checked: it parses, it names the same ORT version, model bytes and resolver content as ORT's file, and its
length keeps every kept object's alignment. The model part is never copied through Python objects (a 2 GB .ort
costs its size once in memory, read through mmap).
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import flatbuffers
from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs import (
    ArgTypeAndIndex,
    InferenceSession,
    KernelTypeStrArgsEntry,
    KernelTypeStrResolver,
    OpIdKernelTypeStrArgsEntry,
)

from edgepack.errors import EdgepackError

IDENTIFIER = b"ORTM"
#: InferenceSession fields: 0 ort_version, 1 model, 2 session_state (deprecated), 3 kernel_type_str_resolver
_KNOWN_FIELDS = {0, 1, 3}
#: the canonical file's length is a multiple of this (>= every alignment FlatBuffers uses in an .ort)
_ALIGN = 64

#: (op id, ((kernel type string, ((arg type, index), ...)), ...)) in the file's (sorted) order
ResolverEntries = tuple[tuple[bytes, tuple[tuple[bytes, tuple[tuple[int, int], ...]], ...]], ...]


class OrtLayoutError(EdgepackError):
    """The .ort does not have the layout this module knows (a newer ORT format): it is left as ORT wrote it."""


@dataclass(frozen=True)
class _Layout:
    root: int  # position of the session table
    fields: dict[int, int]  # field index -> absolute position of the object it points to
    keep_from: int  # first byte of the part kept as is (the model table or its vtable)


def canonicalize_ort(path: Path) -> bool:
    """Rewrite `path` in canonical layout, in place (atomically). False when it already was canonical."""
    path = Path(path)
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        prefix, keep_from = canonical_prefix(data)
        if data[:keep_from] == prefix:
            return False
        tmp = path.with_name(f".{path.name}.canonical-{os.getpid()}")
        try:
            with open(tmp, "wb") as out:
                out.write(prefix)
                out.write(memoryview(data)[keep_from:])
            with open(tmp, "rb") as written, mmap.mmap(written.fileno(), 0, access=mmap.ACCESS_READ) as result:
                check_same_content(data, result)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    os.replace(tmp, path)
    return True


def canonical_bytes(data: bytes) -> bytes:
    """The canonical layout of an .ort held in memory (tests, small models)."""
    prefix, keep_from = canonical_prefix(data)
    out = prefix + bytes(memoryview(data)[keep_from:])
    check_same_content(data, out)
    return out


def canonical_prefix(data: bytes | mmap.mmap) -> tuple[bytes, int]:
    """(new front of the file, position in `data` from which the rest is kept)."""
    layout = _parse(data)
    entries = read_resolver(data)
    return _build_prefix(layout, entries, total=len(data)), layout.keep_from


# ------------------------------------------------------------------------------------------------------ reading


def _u32(data: bytes | mmap.mmap, pos: int) -> int:
    return struct.unpack_from("<I", data, pos)[0]


def _parse(data: bytes | mmap.mmap) -> _Layout:
    if len(data) < 16 or data[4:8] != IDENTIFIER:
        raise OrtLayoutError("not an ORT format model (no 'ORTM' file identifier)")
    root = _u32(data, 0)
    vtable = root - struct.unpack_from("<i", data, root)[0]
    vtable_size = struct.unpack_from("<H", data, vtable)[0]
    fields = {}
    for index in range((vtable_size - 4) // 2):
        voffset = struct.unpack_from("<H", data, vtable + 4 + 2 * index)[0]
        if voffset:
            if index not in _KNOWN_FIELDS:
                raise OrtLayoutError(f"the session table has field {index}, unknown to this canonicalizer")
            fields[index] = root + voffset + _u32(data, root + voffset)
    if not {0, 1} <= fields.keys():
        raise OrtLayoutError("the session table has no ORT version or no model")
    model = fields[1]
    model_vtable = model - struct.unpack_from("<i", data, model)[0]
    keep_from = min(model, model_vtable)
    if fields[0] < keep_from or (3 in fields and fields[3] >= keep_from) or root >= keep_from:
        raise OrtLayoutError("the file is not laid out as [session, resolver, model, version]")
    return _Layout(root, fields, keep_from)


def read_resolver(data: bytes | mmap.mmap) -> ResolverEntries:
    """The kernel type string resolver's content, in the order of its (sorted) vectors."""
    resolver = InferenceSession.InferenceSession.GetRootAs(data, 0).KernelTypeStrResolver()
    if resolver is None:
        return ()
    entries = []
    for i in range(resolver.OpKernelTypeStrArgsLength()):
        op = resolver.OpKernelTypeStrArgs(i)
        strs = []
        for j in range(op.KernelTypeStrArgsLength()):
            entry = op.KernelTypeStrArgs(j)
            args = tuple((entry.Args(k).ArgType(), entry.Args(k).Index()) for k in range(entry.ArgsLength()))
            strs.append((entry.KernelTypeStr(), args))
        entries.append((op.OpId(), tuple(strs)))
    return tuple(entries)


# ------------------------------------------------------------------------------------------------------ writing


def _build_prefix(layout: _Layout, entries: ResolverEntries, *, total: int) -> bytes:
    """Header, session table and resolver; objects at `layout.keep_from` and after are referenced, not copied.

    The builder's offsets count back from the end of what it wrote, which will sit at `keep_from`'s new place;
    an object of the kept part at original position p is then at offset keep_from - p (zero or negative).
    """
    builder = flatbuffers.Builder(4096)
    resolver = _build_resolver(builder, entries) if 3 in layout.fields else None
    builder.StartObject(4)
    # PrependUOffsetTRelativeSlot skips a value equal to its default 0: the model can sit exactly at offset 0
    for slot, target in ((3, resolver), (1, layout.keep_from - layout.fields[1]),
                         (0, layout.keep_from - layout.fields[0])):
        if target is not None:
            builder.PrependUOffsetTRelative(target)
            builder.Slot(slot)
    session = builder.EndObject()
    builder.Prep(4, 0)
    # FlatBuffers aligns every object relative to the end of the buffer and makes the whole buffer a multiple of
    # its largest alignment; the kept part stays at the end, so a total length that is a multiple of 64 (more than
    # any FlatBuffers alignment ORT uses) keeps each kept object aligned. Fixed, so it does not depend on ORT's
    # length either (that moves by 8 bytes with the resolver's layout).
    kept = total - layout.keep_from
    pad = -(builder.Offset() + 8 + kept) % _ALIGN
    builder.Pad(pad)
    for byte in reversed(IDENTIFIER):
        builder.PrependByte(byte)
    builder.PrependUOffsetTRelative(session)
    prefix = bytes(builder.Bytes[builder.Head():])
    if (len(prefix) + kept) % _ALIGN:
        raise OrtLayoutError("the rebuilt header does not keep the model's alignment")
    return prefix


def _build_resolver(builder: flatbuffers.Builder, entries: ResolverEntries) -> int:
    op_tables = []
    for op_id, strs in entries:
        str_tables = []
        for kernel_type_str, args in strs:
            arg_tables = []
            for arg_type, index in args:
                ArgTypeAndIndex.Start(builder)
                ArgTypeAndIndex.AddArgType(builder, arg_type)
                ArgTypeAndIndex.AddIndex(builder, index)
                arg_tables.append(ArgTypeAndIndex.End(builder))
            args_vector = _vector(builder, arg_tables)
            name = builder.CreateString(kernel_type_str)
            KernelTypeStrArgsEntry.Start(builder)
            KernelTypeStrArgsEntry.AddKernelTypeStr(builder, name)
            KernelTypeStrArgsEntry.AddArgs(builder, args_vector)
            str_tables.append(KernelTypeStrArgsEntry.End(builder))
        strs_vector = _vector(builder, str_tables)
        op_name = builder.CreateString(op_id)
        OpIdKernelTypeStrArgsEntry.Start(builder)
        OpIdKernelTypeStrArgsEntry.AddOpId(builder, op_name)
        OpIdKernelTypeStrArgsEntry.AddKernelTypeStrArgs(builder, strs_vector)
        op_tables.append(OpIdKernelTypeStrArgsEntry.End(builder))
    ops_vector = _vector(builder, op_tables)
    KernelTypeStrResolver.Start(builder)
    KernelTypeStrResolver.AddOpKernelTypeStrArgs(builder, ops_vector)
    return KernelTypeStrResolver.End(builder)


def _vector(builder: flatbuffers.Builder, tables: list[int]) -> int:
    builder.StartVector(4, len(tables), 4)
    for table in reversed(tables):
        builder.PrependUOffsetTRelative(table)
    return builder.EndVector()


# ------------------------------------------------------------------------------------------------------ checking


def check_same_content(original: bytes | mmap.mmap, canonical: bytes | mmap.mmap) -> None:
    """The rewritten file names the same version, the same model bytes and the same resolver content."""
    before, after = _parse(original), _parse(canonical)
    shift = after.keep_from - before.keep_from
    if len(canonical) - after.keep_from != len(original) - before.keep_from or \
            after.fields[1] - before.fields[1] != shift or after.fields[0] - before.fields[0] != shift:
        raise OrtLayoutError("the rewritten .ort does not point at the model it kept")
    if read_resolver(original) != read_resolver(canonical):
        raise OrtLayoutError("the rewritten .ort has another kernel type string resolver")
