"""The installed moeserve.v1 stubs are what protoc makes of protos/moeserve/v1/inference.proto today."""

from __future__ import annotations

from pathlib import Path

import grpc_tools
from google.protobuf import descriptor_pb2
from grpc_tools import protoc

from moeserve.v1 import inference_pb2, inference_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
PROTO = "moeserve/v1/inference.proto"


def _compile(tmp_path: Path) -> descriptor_pb2.FileDescriptorProto:
    out = tmp_path / "inference.pb"
    include = Path(grpc_tools.__file__).parent / "_proto"
    rc = protoc.main(["protoc", f"-I{ROOT / 'protos'}", f"-I{include}", f"--descriptor_set_out={out}", PROTO])
    assert rc == 0, "protoc could not compile inference.proto"
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    (fdp,) = [f for f in files if f.name == PROTO]
    _drop_json_names(fdp.message_type)  # the Python generator leaves json_name out of what it embeds
    return fdp


def _drop_json_names(messages) -> None:
    for msg in messages:
        for f in msg.field:
            f.ClearField("json_name")
        _drop_json_names(msg.nested_type)


def test_generated_descriptor_matches_the_proto(tmp_path):
    fresh = _compile(tmp_path)
    installed = descriptor_pb2.FileDescriptorProto.FromString(inference_pb2.DESCRIPTOR.serialized_pb)
    # Equal messages: a field, type or service changed in the .proto without regenerating fails here
    # (fix: `make setup`, or `.venv/bin/pip install --no-deps --no-build-isolation -e .`).
    assert installed == fresh, "stale stubs: regenerate them from protos/ (make setup)"


def test_grpc_stub_has_every_rpc_of_the_proto(tmp_path):
    fresh = _compile(tmp_path)
    (service,) = fresh.service
    assert service.name == "Inference"
    methods = {m.name for m in service.method}
    assert methods == {"Generate", "GenerateStream", "ModelInfo", "Chat", "ChatStream"}
    servicer = inference_pb2_grpc.InferenceServicer
    assert all(callable(getattr(servicer, m, None)) for m in methods)
    stream = {m.name: (m.client_streaming, m.server_streaming) for m in service.method}
    assert stream == {"Generate": (False, False), "GenerateStream": (False, True), "ModelInfo": (False, False),
                      "Chat": (False, False), "ChatStream": (False, True)}


def test_contract_field_names_are_kept():
    """Clients are written against these names (issue 3); renaming one is a breaking change."""
    fields = lambda msg: set(msg.DESCRIPTOR.fields_by_name)  # noqa: E731
    assert {"prompt", "token_ids", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
            "stop_token_ids", "ignore_eos", "request_id"} <= fields(inference_pb2.GenerateRequest)
    assert {"request_id", "token_ids", "text", "finish_reason", "usage", "time_to_first_token"} <= fields(
        inference_pb2.GenerateResponse)
    assert {"prompt_tokens", "completion_tokens"} <= fields(inference_pb2.Usage)
    assert {"architecture", "vocab_size", "context_length", "num_experts", "num_experts_per_tok", "dtype"} <= fields(
        inference_pb2.ModelInfoResponse)
    assert set(inference_pb2.FinishReason.keys()) >= {"length", "stop", "eos", "cancelled"}
    assert inference_pb2.GenerateRequest.DESCRIPTOR.oneofs_by_name["input"].fields == [
        inference_pb2.GenerateRequest.DESCRIPTOR.fields_by_name["prompt"],
        inference_pb2.GenerateRequest.DESCRIPTOR.fields_by_name["token_ids"],
    ]
