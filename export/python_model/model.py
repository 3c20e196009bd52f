"""Triton python-backend model that runs an ONNX graph with ONNX Runtime.

The local Triton (the nvidia-pytriton wheel's server) has only the python backend, so
every ONNX model of the repository is also served through this file, copied next to
its `model.onnx` in each version folder. It is generic: inputs, outputs and the file
come from the model config.

The dynamic batcher hands `execute` a list of requests; they are merged into one
ONNX Runtime call (ragged sequence axes zero-padded to the longest, which the model
masks) and split back. If the merged call fails, each request runs alone so that one
bad request fails only itself.

A model Triton does not batch (`max_batch_size: 0`: a user-indexed FM, whose user
inputs and candidates have different row counts, and the adapter beside it) runs each
request alone; its callers merge calls before Triton.
"""

import json
import os
import sys
from pathlib import Path

# The stub runs the system Python and ignores PYTHONPATH; the launcher passes the
# server environment's site-packages in GEM_PYTHONPATH.
for _path in reversed(os.environ.get("GEM_PYTHONPATH", "").split(os.pathsep)):
    if _path and _path not in sys.path:
        sys.path.insert(0, _path)

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402


def _merge(arrays: list[np.ndarray]) -> np.ndarray:
    if len(arrays) == 1:
        return arrays[0]
    if arrays[0].ndim > 1:
        width = max(a.shape[1] for a in arrays)
        arrays = [np.pad(a, ((0, 0), (0, width - a.shape[1]))) if a.shape[1] < width else a for a in arrays]
    return np.concatenate(arrays)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        path = Path(args["model_repository"]) / args["model_version"] / params.get("onnx_file", "model.onnx")
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("intra_op_threads", "0"))
        # Idle pool threads spin by default, taking the cores that the other models of
        # the ensemble (separate stub processes) need.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        # Inputs declared [1] and reshaped to [] arrive as [B, 1]; the graph wants [B].
        self.inputs = [(i["name"], "reshape" in i) for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]
        self.batched = int(config.get("max_batch_size", 0)) > 0

    def _feeds(self, request):
        feeds = {}
        for name, scalar in self.inputs:
            array = pb_utils.get_input_tensor_by_name(request, name).as_numpy()
            feeds[name] = array.reshape(-1) if scalar and array.ndim == 2 else array
        return feeds

    def _respond(self, results):
        tensors = [pb_utils.Tensor(n, np.ascontiguousarray(r)) for n, r in zip(self.outputs, results, strict=True)]
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def _run_alone(self, feeds):
        try:
            return self._respond(self.session.run(self.outputs, feeds))
        except Exception as e:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"inference failed: {e}"))

    def execute(self, requests):
        feeds = [self._feeds(r) for r in requests]
        if len(feeds) == 1 or not self.batched:
            return [self._run_alone(f) for f in feeds]
        try:
            merged = {name: _merge([f[name] for f in feeds]) for name, _ in self.inputs}
            results = self.session.run(self.outputs, merged)
        except Exception:
            return [self._run_alone(f) for f in feeds]
        sizes = [len(next(iter(f.values()))) for f in feeds]
        splits = np.cumsum(sizes)[:-1]
        parts = [np.split(r, splits) for r in results]
        return [self._respond([p[i] for p in parts]) for i in range(len(feeds))]

    def finalize(self):
        self.session = None
