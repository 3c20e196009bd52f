from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DataType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DATA_TYPE_UNSPECIFIED: _ClassVar[DataType]
    DATA_TYPE_INT64: _ClassVar[DataType]
    DATA_TYPE_FLOAT32: _ClassVar[DataType]

class Output(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTPUT_UNSPECIFIED: _ClassVar[Output]
    OUTPUT_LABELS: _ClassVar[Output]
    OUTPUT_ADAPTED_LABELS: _ClassVar[Output]
    OUTPUT_EMBEDDING: _ClassVar[Output]
    OUTPUT_USER_EMBEDDING: _ClassVar[Output]
DATA_TYPE_UNSPECIFIED: DataType
DATA_TYPE_INT64: DataType
DATA_TYPE_FLOAT32: DataType
OUTPUT_UNSPECIFIED: Output
OUTPUT_LABELS: Output
OUTPUT_ADAPTED_LABELS: Output
OUTPUT_EMBEDDING: Output
OUTPUT_USER_EMBEDDING: Output

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DataType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DataType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("features", "shared", "outputs", "fm_version", "user_embedding_once")
    class FeaturesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    class SharedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    SHARED_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    FM_VERSION_FIELD_NUMBER: _ClassVar[int]
    USER_EMBEDDING_ONCE_FIELD_NUMBER: _ClassVar[int]
    features: _containers.MessageMap[str, Tensor]
    shared: _containers.MessageMap[str, Tensor]
    outputs: _containers.RepeatedScalarFieldContainer[Output]
    fm_version: int
    user_embedding_once: bool
    def __init__(self, features: _Optional[_Mapping[str, Tensor]] = ..., shared: _Optional[_Mapping[str, Tensor]] = ..., outputs: _Optional[_Iterable[_Union[Output, str]]] = ..., fm_version: _Optional[int] = ..., user_embedding_once: bool = ...) -> None: ...

class ModelVersions(_message.Message):
    __slots__ = ("fm", "adapter")
    FM_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    fm: int
    adapter: int
    def __init__(self, fm: _Optional[int] = ..., adapter: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("outputs", "versions")
    class OutputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    outputs: _containers.MessageMap[str, Tensor]
    versions: ModelVersions
    def __init__(self, outputs: _Optional[_Mapping[str, Tensor]] = ..., versions: _Optional[_Union[ModelVersions, _Mapping]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TensorInfo(_message.Message):
    __slots__ = ("name", "dtype", "shape", "kind", "side", "max_length", "sequence")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SIDE_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DataType
    shape: _containers.RepeatedScalarFieldContainer[int]
    kind: str
    side: str
    max_length: int
    sequence: str
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DataType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., kind: _Optional[str] = ..., side: _Optional[str] = ..., max_length: _Optional[int] = ..., sequence: _Optional[str] = ...) -> None: ...

class GetModelInfoResponse(_message.Message):
    __slots__ = ("schema_name", "schema_yaml", "inputs", "outputs", "tasks", "surfaces", "versions", "backend", "max_examples_per_call", "available")
    SCHEMA_NAME_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_YAML_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    SURFACES_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    MAX_EXAMPLES_PER_CALL_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    schema_name: str
    schema_yaml: str
    inputs: _containers.RepeatedCompositeFieldContainer[TensorInfo]
    outputs: _containers.RepeatedCompositeFieldContainer[TensorInfo]
    tasks: _containers.RepeatedScalarFieldContainer[str]
    surfaces: _containers.RepeatedScalarFieldContainer[str]
    versions: ModelVersions
    backend: str
    max_examples_per_call: int
    available: _containers.RepeatedCompositeFieldContainer[ModelVersions]
    def __init__(self, schema_name: _Optional[str] = ..., schema_yaml: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[TensorInfo, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[TensorInfo, _Mapping]]] = ..., tasks: _Optional[_Iterable[str]] = ..., surfaces: _Optional[_Iterable[str]] = ..., versions: _Optional[_Union[ModelVersions, _Mapping]] = ..., backend: _Optional[str] = ..., max_examples_per_call: _Optional[int] = ..., available: _Optional[_Iterable[_Union[ModelVersions, _Mapping]]] = ...) -> None: ...
