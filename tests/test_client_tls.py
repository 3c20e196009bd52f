"""The client over TLS and its user agent, against a canned KnowledgeService on the loopback.

The server is a plain grpcio server (no model, no Ray) whose replies are schema-correct
but canned; its certificate is self-signed, made here for a host name the loopback
address does not have, so the client needs `grpc.ssl_target_name_override` too.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime
import json
from collections.abc import Iterator
from importlib import metadata

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from gem.knowledge import AsyncKnowledgeClient, KnowledgeClient
from gem.knowledge.v1 import knowledge_pb2 as pb
from gem.knowledge.v1 import knowledge_pb2_grpc as pb_grpc
from gem.knowledge.wire import decode, encode

HOST = "knowledge.test"
TASKS = ["click", "conversion"]
VERSIONS = pb.ModelVersions(fm=3, adapter=1)


class CannedService(pb_grpc.KnowledgeServiceServicer):
    """One ad-side input, `ad_id`; `labels` of 0.5 for every row. Keeps each call's
    `user-agent` metadata."""

    def __init__(self) -> None:
        self.user_agents: list[str] = []

    def _seen(self, context: grpc.ServicerContext) -> None:
        self.user_agents += [v for k, v in context.invocation_metadata() if k == "user-agent"]

    def GetModelInfo(self, request, context):
        self._seen(context)
        return pb.GetModelInfoResponse(
            schema_name="canned",
            inputs=[pb.TensorInfo(name="ad_id", dtype=pb.DATA_TYPE_INT64, shape=[-1], kind="sparse", side="ad")],
            outputs=[pb.TensorInfo(name="labels", dtype=pb.DATA_TYPE_FLOAT32, shape=[-1, len(TASKS)], kind="output")],
            tasks=TASKS,
            surfaces=["feed"],
            versions=VERSIONS,
            backend="onnxruntime",
            max_examples_per_call=512,
        )

    def Generate(self, request, context):
        self._seen(context)
        rows = len(decode("ad_id", request.features["ad_id"]))
        labels = np.full((rows, len(TASKS)), 0.5, np.float32)
        return pb.GenerateResponse(outputs={"labels": encode(labels)}, versions=VERSIONS)


@pytest.fixture(scope="module")
def certificate() -> tuple[bytes, bytes]:
    """A self-signed certificate for HOST and its key, PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(HOST)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


@contextlib.contextmanager
def serve(credentials: grpc.ServerCredentials | None) -> Iterator[tuple[str, CannedService]]:
    """A CannedService on 127.0.0.1: TLS with `credentials`, plaintext without."""
    service = CannedService()
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(2))
    pb_grpc.add_KnowledgeServiceServicer_to_server(service, server)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        yield f"127.0.0.1:{port}", service
    finally:
        server.stop(None)


@pytest.fixture
def tls_server(certificate) -> Iterator[tuple[str, CannedService]]:
    cert, key = certificate
    with serve(grpc.ssl_server_credentials([(key, cert)])) as served:
        yield served


def tls_args(cert: bytes) -> dict:
    return {
        "credentials": grpc.ssl_channel_credentials(root_certificates=cert),
        "options": [("grpc.ssl_target_name_override", HOST)],
    }


def expected_user_agent() -> str:
    return f"gem-knowledge-client/{metadata.version('gem-knowledge-client')}"


def test_client_talks_tls(tls_server, certificate):
    address, service = tls_server
    with KnowledgeClient(address, timeout_s=10, **tls_args(certificate[0])) as client:
        assert client.info().schema_name == "canned"
        reply = client.generate({"ad_id": np.arange(3)})
    np.testing.assert_array_equal(reply.outputs["labels"], np.full((3, 2), 0.5, np.float32))
    assert (reply.fm_version, reply.adapter_version) == (3, 1)
    assert [agent.split()[0] for agent in service.user_agents] == [expected_user_agent()] * 2


def test_async_client_talks_tls(tls_server, certificate):
    address, _ = tls_server

    async def call():
        async with AsyncKnowledgeClient(address, timeout_s=10, **tls_args(certificate[0])) as client:
            return await client.generate({"ad_id": np.arange(4)})

    reply = asyncio.run(call())
    assert reply.outputs["labels"].shape == (4, 2) and reply.fm_version == 3


def test_client_talks_mutual_tls(certificate):
    # The test's one certificate serves as server, client and the CA of both.
    cert, key = certificate
    server_credentials = grpc.ssl_server_credentials([(key, cert)], root_certificates=cert, require_client_auth=True)
    with serve(server_credentials) as (address, _):
        anonymous = tls_args(cert)
        with KnowledgeClient(address, timeout_s=5, retries=0, **anonymous) as client, pytest.raises(grpc.RpcError) as e:
            client.info()
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        credentials = grpc.ssl_channel_credentials(root_certificates=cert, private_key=key, certificate_chain=cert)
        with KnowledgeClient(address, timeout_s=10, **{**anonymous, "credentials": credentials}) as client:
            assert client.info().schema_name == "canned"


def test_tls_checks_the_server_name(tls_server, certificate):
    # Without the override the client checks the certificate against "127.0.0.1".
    address, service = tls_server
    credentials = grpc.ssl_channel_credentials(root_certificates=certificate[0])
    with (
        KnowledgeClient(address, timeout_s=5, retries=0, credentials=credentials) as client,
        pytest.raises(grpc.RpcError) as e,
    ):
        client.info()
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "hostname verification" in e.value.details().lower(), e.value.details()
    assert service.user_agents == []


def test_tls_client_against_a_plaintext_server_is_unavailable(certificate):
    with (
        serve(None) as (address, service),
        KnowledgeClient(address, timeout_s=5, retries=0, **tls_args(certificate[0])) as client,
        pytest.raises(grpc.RpcError) as e,
    ):
        client.info()
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    # gRPC's own words say what went wrong: "... Tls handshake failed (TSI_PROTOCOL_FAILURE) ...".
    assert "handshake failed" in e.value.details().lower(), e.value.details()
    assert service.user_agents == []


def test_plaintext_is_the_default_and_calls_carry_the_client_version():
    with serve(None) as (address, service):
        with KnowledgeClient(address, timeout_s=10) as client:
            client.generate({"ad_id": np.arange(2)})

        async def call():
            async with AsyncKnowledgeClient(address, timeout_s=10) as client:
                await client.info()

        asyncio.run(call())
    # gRPC appends its own agent (grpc-python/<version> ...) after the primary one.
    assert len(service.user_agents) == 3
    assert all(agent.split()[0] == expected_user_agent() for agent in service.user_agents), service.user_agents


def test_no_retries_is_a_valid_channel():
    from gem.knowledge.client import channel_options

    (method,) = json.loads(dict(channel_options(0))["grpc.service_config"])["methodConfig"]
    assert "retryPolicy" not in method


def test_channel_options_are_laid_over_the_clients_own():
    from gem.knowledge.client import channel_options

    options = dict(channel_options(3, [("grpc.max_receive_message_length", 1 << 20), ("grpc.keepalive_time_ms", 1)]))
    assert options["grpc.max_receive_message_length"] == 1 << 20 and options["grpc.keepalive_time_ms"] == 1
    assert options["grpc.primary_user_agent"] == expected_user_agent()
    assert len(channel_options(3, [("grpc.enable_retries", 0)])) == len(channel_options(3))
