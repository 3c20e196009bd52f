"""The KnowledgeService registered on Ray Serve's gRPC proxy with raw-bytes requests.

Ray Serve's proxy deserializes each request with the `request_deserializer` of the
handlers that the `grpc_servicer_functions` register, before any project code runs; the
generated `add_KnowledgeServiceServicer_to_server` registers `GenerateRequest.FromString`,
so malformed bytes fail inside gRPC with `UNKNOWN` ("Unexpected DecodeError") and never
reach the ingress or its metrics. `grpc_servicer_functions` takes any import path to a
function of that signature (it is the supported extension point: Serve keeps the
handlers' `request_deserializer` and replaces only the behaviour), so this one registers
the same two methods with an identity deserializer: the proxy forwards the bytes as they
came (no parse and re-serialize in the proxy), and the ingress parses them *after* the
token check, answering `INVALID_ARGUMENT` for bytes that are not the message.

Server reflection (Serve's `gRPCOptions.enable_reflection`, serving/local/launcher.py)
answers from the process's default descriptor pool: the generated module imported here
puts the service's file there in every process that registers it, the proxy's too.
"""

from __future__ import annotations

import grpc
from gem.knowledge.v1 import knowledge_pb2

_DESCRIPTOR = knowledge_pb2.DESCRIPTOR.services_by_name["KnowledgeService"]
SERVICE = _DESCRIPTOR.full_name
METHODS = tuple(m.name for m in _DESCRIPTOR.methods)


def _raw(data: bytes) -> bytes:
    return data


def add_KnowledgeServiceServicer_to_server(servicer, server) -> None:
    """Drop-in for the generated function of the same name (Serve calls it with a mock
    servicer and its proxy server)."""
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, name), request_deserializer=_raw, response_serializer=None
        )
        for name in METHODS
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    if hasattr(server, "add_registered_method_handlers"):
        server.add_registered_method_handlers(SERVICE, handlers)
