"""Server reflection on the served API (README, "The gRPC API"): a real reflection client
(grpcio-reflection's descriptor database, what grpcurl and grpcui speak) against a
started front end, under both ingresses, finds KnowledgeService with its methods and
the health service, and resolves the method's message types from the server alone."""

from __future__ import annotations

import shutil

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from serving.config import INGRESSES, FrontendConfig
from serving.grpc_api import METHODS, SERVICE
from serving.local import launcher
from serving.local.ports import free_ports
from tests.test_hostile import TOKEN

pytestmark = pytest.mark.stack

HEALTH = "grpc.health.v1.Health"


@pytest.fixture(scope="module", params=INGRESSES)
def address(request, published_repo, tmp_path_factory):
    """A front end (embedded backend, a token configured) under each ingress."""
    repo = tmp_path_factory.mktemp("reflection") / "repo"
    shutil.copytree(published_repo, repo)
    grpc_port, http_port = free_ports(2)
    cfg = FrontendConfig(backend="onnxruntime", repository=repo, auth_token=TOKEN)
    try:
        address = launcher.start(cfg, grpc_port=grpc_port, http_port=http_port, ingress=request.param)
        launcher.wait_healthy(address)
        yield address
    finally:
        launcher.stop()


def test_a_reflection_client_lists_the_service_and_its_methods(address):
    with grpc.insecure_channel(address) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        listed = set(db.get_services())
        assert {SERVICE, HEALTH} <= listed, listed
        assert not any(s.startswith("ray.") for s in listed), "Serve's internal API is not advertised"
        pool = DescriptorPool(db)
        service = pool.FindServiceByName(SERVICE)
        assert {m.name for m in service.methods} == set(METHODS)
        generate = service.methods_by_name["Generate"]
        # The message types come from the server too: a client with no generated code can build calls.
        assert generate.input_type.full_name == "gem.knowledge.v1.GenerateRequest"
        assert "features" in generate.input_type.fields_by_name
        assert {m.name for m in pool.FindServiceByName(HEALTH).methods} >= {"Check"}


def test_reflection_answers_an_unknown_symbol_with_not_found(address):
    with grpc.insecure_channel(address) as channel:
        pool = DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        with pytest.raises(KeyError):
            pool.FindServiceByName("gem.knowledge.v1.NoSuchService")
