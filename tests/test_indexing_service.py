"""The internal IndexingService: only the service credential opens it, its input is
validated like any RPC's, and Envoy's public listener does not route it; EmbedTexts gives
the index owner's embeddings (an agent process without the model classifies with them)."""

import uuid

import grpc
import numpy as np
from agentmesh.indexing.v1 import indexing_service_pb2 as indexing_pb
from agentmesh.indexing.v1 import indexing_service_pb2_grpc as indexing_grpc

from server import domain_settings
from server.envoy import EnvoySidecar
from server.main import Application
from server.servicers.indexing import MAX_EMBED_TEXT_CHARS, MAX_EMBED_TEXTS
from tests.harness import Stubs, new_user
from tests.rpc_errors import error_info, field_violations
from tests.test_auth import expect_code


def _passage(index: int, dimension: int) -> indexing_pb.IndexedPassage:
    return indexing_pb.IndexedPassage(
        index=index,
        text=f"passage {index}",
        start=index * 10,
        end=index * 10 + 9,
        dense=[1.0] + [0.0] * (dimension - 1),
        sparse_indices=[index + 1],
        sparse_values=[1.0],
    )


async def test_only_the_service_credential_opens_it(app: Application, stubs: Stubs) -> None:
    indexing = indexing_grpc.IndexingServiceStub(stubs.channel)
    dimension = app.domain.knowledge.embedder.dimension
    document_id = uuid.uuid4()
    request = indexing_pb.UpsertPassagesRequest(
        document_id=str(document_id),
        generation="g1",
        owner_id=str(uuid.uuid4()),
        passages=[_passage(0, dimension), _passage(1, dimension)],
    )
    error = await expect_code(indexing.UpsertPassages(request), grpc.StatusCode.UNAUTHENTICATED)
    assert error_info(error).reason == "TOKEN_MISSING"
    user = await new_user(stubs)
    error = await expect_code(
        indexing.UpsertPassages(request, metadata=user.metadata), grpc.StatusCode.UNAUTHENTICATED
    )
    assert error_info(error).reason == "TOKEN_INVALID"
    assert await app.domain.knowledge.indexed_chunks(document_id) == 0

    service = (("authorization", f"Bearer {domain_settings.index_token(app.settings)}"),)
    await indexing.UpsertPassages(request, metadata=service)
    assert await app.domain.knowledge.indexed_chunks(document_id) == 2
    await indexing.DeleteDocumentPassages(
        indexing_pb.DeleteDocumentPassagesRequest(
            document_id=str(document_id), keep_generation="g1"
        ),
        metadata=service,
    )
    assert await app.domain.knowledge.indexed_chunks(document_id) == 2
    await indexing.DeleteGeneration(
        indexing_pb.DeleteGenerationRequest(document_id=str(document_id), generation="g1"),
        metadata=service,
    )
    assert await app.domain.knowledge.indexed_chunks(document_id) == 0


async def test_bad_input_is_invalid_argument(app: Application, stubs: Stubs) -> None:
    indexing = indexing_grpc.IndexingServiceStub(stubs.channel)
    service = (("authorization", f"Bearer {domain_settings.index_token(app.settings)}"),)
    mismatched = indexing_pb.IndexedPassage(index=0, text="x", sparse_indices=[1, 2])
    cases = [
        (
            indexing_pb.UpsertPassagesRequest(generation="g", owner_id=str(uuid.uuid4())),
            "document_id",
        ),
        (
            indexing_pb.UpsertPassagesRequest(
                document_id=str(uuid.uuid4()), owner_id=str(uuid.uuid4())
            ),
            "generation",
        ),
        (
            indexing_pb.UpsertPassagesRequest(
                document_id=str(uuid.uuid4()),
                generation="g",
                owner_id=str(uuid.uuid4()),
                passages=[mismatched],
            ),
            "passages",
        ),
    ]
    for request, field in cases:
        error = await expect_code(
            indexing.UpsertPassages(request, metadata=service), grpc.StatusCode.INVALID_ARGUMENT
        )
        assert field in field_violations(error)
    error = await expect_code(
        indexing.DeleteGeneration(
            indexing_pb.DeleteGenerationRequest(document_id="nope", generation="g"),
            metadata=service,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "document_id" in field_violations(error)


async def test_envoy_does_not_route_it(app: Application, envoy: EnvoySidecar) -> None:
    """Not even with the service credential: the public listener answers it itself."""
    service = (("authorization", f"Bearer {domain_settings.index_token(app.settings)}"),)
    request = indexing_pb.DeleteGenerationRequest(document_id=str(uuid.uuid4()), generation="g")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{envoy.port}") as channel:
        indexing = indexing_grpc.IndexingServiceStub(channel)
        await expect_code(
            indexing.DeleteGeneration(request, metadata=service), grpc.StatusCode.UNIMPLEMENTED
        )


async def test_embed_texts_needs_the_service_credential(app: Application, stubs: Stubs) -> None:
    indexing = indexing_grpc.IndexingServiceStub(stubs.channel)
    request = indexing_pb.EmbedTextsRequest(
        texts=["hello there"], kind=indexing_pb.EMBEDDING_KIND_QUERY
    )
    error = await expect_code(indexing.EmbedTexts(request), grpc.StatusCode.UNAUTHENTICATED)
    assert error_info(error).reason == "TOKEN_MISSING"
    wrong = (("authorization", "Bearer not-the-service-credential"),)
    error = await expect_code(
        indexing.EmbedTexts(request, metadata=wrong), grpc.StatusCode.UNAUTHENTICATED
    )
    assert error_info(error).reason == "TOKEN_INVALID"
    user = await new_user(stubs)  # a valid user token is no service credential either
    error = await expect_code(
        indexing.EmbedTexts(request, metadata=user.metadata), grpc.StatusCode.UNAUTHENTICATED
    )
    assert error_info(error).reason == "TOKEN_INVALID"


async def test_embed_texts_gives_the_models_embeddings(app: Application, stubs: Stubs) -> None:
    indexing = indexing_grpc.IndexingServiceStub(stubs.channel)
    service = (("authorization", f"Bearer {domain_settings.index_token(app.settings)}"),)
    embedder = app.domain.knowledge.embedder
    texts = ["What is the parental leave policy?", "Hello!", "Order 98765"]
    for kind in (indexing_pb.EMBEDDING_KIND_QUERY, indexing_pb.EMBEDDING_KIND_PASSAGE):
        response = await indexing.EmbedTexts(
            indexing_pb.EmbedTextsRequest(texts=texts, kind=kind), metadata=service
        )
        expected = embedder.encode_passages_sync(texts)
        assert len(response.embeddings) == len(texts)
        for embedding, vector in zip(response.embeddings, expected, strict=True):
            assert len(embedding.values) == embedder.dimension
            assert np.allclose(np.asarray(embedding.values), vector, atol=1e-5)


async def test_embed_texts_refuses_bad_input(app: Application, stubs: Stubs) -> None:
    indexing = indexing_grpc.IndexingServiceStub(stubs.channel)
    service = (("authorization", f"Bearer {domain_settings.index_token(app.settings)}"),)
    query = indexing_pb.EMBEDDING_KIND_QUERY
    cases = [
        (indexing_pb.EmbedTextsRequest(texts=["hello"]), {"kind"}),
        (indexing_pb.EmbedTextsRequest(texts=["hello"], kind=9), {"kind"}),  # type: ignore[arg-type]
        (indexing_pb.EmbedTextsRequest(kind=query), {"texts"}),
        (indexing_pb.EmbedTextsRequest(texts=["x"] * (MAX_EMBED_TEXTS + 1), kind=query), {"texts"}),
        (
            indexing_pb.EmbedTextsRequest(
                texts=["fine", "", "y" * (MAX_EMBED_TEXT_CHARS + 1)], kind=query
            ),
            {"texts[1]", "texts[2]"},
        ),
    ]
    for request, fields in cases:
        error = await expect_code(
            indexing.EmbedTexts(request, metadata=service), grpc.StatusCode.INVALID_ARGUMENT
        )
        assert set(field_violations(error)) == fields, request
