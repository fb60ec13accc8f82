"""A non-Rust gRPC client that knows nothing of deadbolt's protos: it
discovers the API through v1alpha server reflection (what grpcio-reflection,
grpcui and several GUI clients speak), builds the ListExperiments request
from the reflected descriptors and calls it. Prints one JSON line:
{"services": [...], "runs": [names...]}.

    python reflect_list.py HOST:PORT
"""
import json
import sys

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

SERVICE = "deadbolt.v1.ExperimentService"


def main(addr: str) -> None:
    channel = grpc.insecure_channel(addr)
    db = ProtoReflectionDescriptorDatabase(channel)
    services = sorted(db.get_services())
    pool = DescriptorPool(db)
    method = pool.FindServiceByName(SERVICE).FindMethodByName("ListExperiments")
    request_cls = message_factory.GetMessageClass(method.input_type)
    response_cls = message_factory.GetMessageClass(method.output_type)
    call = channel.unary_unary(
        f"/{SERVICE}/ListExperiments",
        request_serializer=request_cls.SerializeToString,
        response_deserializer=response_cls.FromString,
    )
    response = call(request_cls(page_size=10), timeout=30)
    print(json.dumps({"services": services, "runs": [r.name for r in response.runs]}))


if __name__ == "__main__":
    main(sys.argv[1])
