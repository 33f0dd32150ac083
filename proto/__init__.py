"""seqserve.proto: the gRPC contract (`seqserve.proto`, package `seqserve.v1`) and its generated code.

`seqserve_pb2`, `seqserve_pb2_grpc` (and the `.pyi` stubs) are written by `make proto`
(`proto/generate.py`, grpcio-tools) and never edited by hand; a test fails when they are stale.
"""
