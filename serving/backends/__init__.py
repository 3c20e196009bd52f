"""Where the front end and the batch job get knowledge from: `base` (the `Backend`
interface, `Knowledge`, `make_backend`), `errors` (backend failures, each with the gRPC
status a caller gets for it), `triton` (Triton over gRPC, via `triton_client`) and `onnx`
(ONNX Runtime in this process)."""
