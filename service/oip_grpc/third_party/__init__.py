"""The Open Inference Protocol's gRPC definition and protoc's output from it: code whose shape is not ours.

* `grpc_predict_v2.proto`: the messages, field numbers and service of the Open Inference Protocol
  (KServe's open_inference_grpc.proto, Apache-2.0; the file Triton's grpc_service.proto extends), cut
  to the six RPCs hydra-serve implements, with comments on how we use them. Not a verbatim copy, but
  its layout is the protocol's: it changes only when the protocol does (stock tritonclient.grpc must
  keep working, tests/service/test_grpc_codegen.py), never to suit our code.
* `grpc_predict_v2_pb2.py` and `grpc_predict_v2_pb2.pyi`: generated from it by protoc (grpcio-tools
  1.75.1) through ../generate.py, which says how to regenerate them and why they are checked in.
  Nothing in them is edited by hand except the one edit generate.py makes and documents: the
  descriptor goes into a private pool rather than protobuf's default one.

Our code (../generate.py, ../codec.py, ../server.py) stays outside this folder.
"""
