"""The v2 gRPC protocol's definitions (grpc_predict_v2.proto) and the modules protoc generates from them."""
