"""The floor a Python front door must beat: one aiohttp process, one JSON parse and one ``session.run`` a request.

No batching, no checks beyond what ONNX Runtime does, no metrics: what a user writes in twenty lines. Used by
``benchmarks/serving.py``; runs alone too:

    .venv/bin/python benchmarks/plain_server.py model.onnx name port
"""

from __future__ import annotations

import sys

import numpy as np
import onnxruntime as ort
import orjson
from aiohttp import web

#: v2 datatypes of the outputs the benchmark's models have.
V2_TYPES = {"float32": "FP32", "float64": "FP64", "int64": "INT64", "int32": "INT32"}


def create_app(model_path: str, name: str) -> web.Application:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(model_path, sess_options=options, providers=["CPUExecutionProvider"])
    feeds_of = {i.name: i for i in session.get_inputs()}

    async def ready(_: web.Request) -> web.Response:
        return web.json_response({"ready": True})

    async def infer(request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        feeds = {
            t["name"]: np.asarray(t["data"], dtype=np.float32).reshape(t["shape"])
            for t in body["inputs"]
            if t["name"] in feeds_of
        }
        outputs = session.run(None, feeds)
        answer = {
            "model_name": name,
            "outputs": [
                {"name": o.name, "datatype": V2_TYPES[str(r.dtype)], "shape": list(r.shape), "data": r.ravel()}
                for o, r in zip(session.get_outputs(), outputs, strict=True)
            ],
        }
        return web.Response(
            body=orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY), content_type="application/json"
        )

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_get("/v2/health/ready", ready)
    app.router.add_post(f"/v2/models/{name}/infer", infer)
    return app


if __name__ == "__main__":
    model, model_name, port = sys.argv[1:4]
    web.run_app(create_app(model, model_name), host="127.0.0.1", port=int(port), print=None, access_log=None)
