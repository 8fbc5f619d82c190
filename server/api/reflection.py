"""Server reflection that keeps the proto comments, so that `grpcurl describe` shows them.

grpcio-reflection answers with descriptors from a descriptor pool, and a pool's files
forget their source info (the comments) when copied out. scripts/generate.py writes the
contracts with their source info to tally/v1/descriptor_set.binpb; `SourcePool` answers
like the process's default pool but hands out those full copies of tally's files (and of
the google/api files they import). Other files (health, reflection itself) go out as the
pool has them, without comments.
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib import resources
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor

DESCRIPTOR_SET = "descriptor_set.binpb"


def _drop_json_names(messages: Iterable[descriptor_pb2.DescriptorProto]) -> None:
    for message in messages:
        for field in message.field:
            field.ClearField("json_name")
        _drop_json_names(message.nested_type)


def load_sources() -> dict[str, descriptor_pb2.FileDescriptorProto]:
    """The files of the generated descriptor set by name, with their source info.

    protoc records each field's JSON name (lowerCamelCase), which the pool's own copies
    leave out; grpcurl prints fields by their JSON name when it has one. Dropping them
    keeps grpcurl's output in the proto field names (`event_id`), as the README shows.
    """
    data = resources.files("tally.v1").joinpath(DESCRIPTOR_SET).read_bytes()
    files = descriptor_pb2.FileDescriptorSet.FromString(data).file
    for file in files:
        _drop_json_names(file.message_type)
    return {file.name: file for file in files}


class _File:
    """A FileDescriptor whose CopyToProto includes source info when it is known."""

    def __init__(self, file: FileDescriptor, sources: dict[str, descriptor_pb2.FileDescriptorProto]) -> None:
        self._file = file
        self._sources = sources
        self.name = file.name

    @property
    def dependencies(self) -> list[_File]:
        return [_File(d, self._sources) for d in self._file.dependencies]

    def CopyToProto(self, proto: descriptor_pb2.FileDescriptorProto) -> None:
        source = self._sources.get(self.name)
        if source is None:
            self._file.CopyToProto(proto)
        else:
            proto.CopyFrom(source)


class SourcePool:
    """The lookups that grpcio-reflection makes, on `pool`, with files that keep their comments."""

    def __init__(
        self,
        sources: dict[str, descriptor_pb2.FileDescriptorProto],
        pool: descriptor_pool.DescriptorPool | None = None,
    ) -> None:
        self._sources = sources
        self._pool = pool or descriptor_pool.Default()

    def FindFileByName(self, name: str) -> _File:
        """The file `name`, copied out with its comments when it is one of Tally's."""
        return _File(self._pool.FindFileByName(name), self._sources)

    def FindFileContainingSymbol(self, symbol: str) -> _File:
        """The file that defines `symbol`, copied out with its comments when it is one of Tally's."""
        return _File(self._pool.FindFileContainingSymbol(symbol), self._sources)

    def FindMessageTypeByName(self, name: str) -> Any:
        """The pool's message descriptor of that full name."""
        return self._pool.FindMessageTypeByName(name)

    def FindExtensionByNumber(self, message: Any, number: int) -> Any:
        """The pool's extension of `message` with that field number."""
        return self._pool.FindExtensionByNumber(message, number)

    def FindAllExtensions(self, message: Any) -> Any:
        """The pool's extensions of `message`."""
        return self._pool.FindAllExtensions(message)
