module leanserve.dev/hack/loadgen

go 1.24.0
