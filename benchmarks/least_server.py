"""The least server: the smallest HTTP classifier that does a /classify answer's essential work.

A reference for ``serve_bench.py`` (``--least-server``, on by default on the CPU), not a server
to deploy. It does what every answer of the real server must do — read the request (httptools on
uvloop, as uvicorn does), decode the PNG and make the tensor (the server's own
:class:`~serving.images.Preprocessor`), batch requests per exit graph, run ONNX Runtime with
the server's session options in one inference thread (a request alone runs on the event loop, as
the server runs its short graphs), softmax, and write a small JSON answer — and nothing else:
no ASGI or framework, no admission, deadlines, policies, metrics, request ids or logs.

Timed beside raw ORT and the real server in the same rounds, it separates what the host takes
from a Python server of this shape (wrk and the event loop sharing two cores with ORT's two
threads) from what the real server's code takes on top: the real server's saturation and
one-connection figures can be read against it as well as against raw ORT.

    python -m benchmarks.least_server --model-dir runs/bench/resnet18-cifar100 --port 8200

Serves ``POST /classify[?exit=N]`` (body: the image bytes), ``GET /readyz`` and a
``GET /v1/model`` that says how a lone request runs. HTTP as a benchmark needs it: keep-alive
connections, one request at a time per connection (no pipelining; ``Connection: close`` is not
honoured). Other flags of ``python -m serving``
are accepted and ignored, so that the benchmark can start it as it starts the server.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import parse_qs

import httptools
import numpy as np
import uvloop
from PIL import Image

from serving.images import Preprocessor
from serving.manifest import load_manifest
from serving.sessions import DEFAULT_SPIN_US, open_session
from serving.settings import ServerSettings

# The real server's defaults, which serve_bench runs it with.
MAX_BATCH = ServerSettings.model_fields["max_batch_size"].default
MAX_PIXELS = ServerSettings.model_fields["max_pixels"].default


class ExitGraph:
    """One exit's session and its queue: a batch runs in the inference thread while requests
    queue; when it ends, everything queued (up to MAX_BATCH) runs next. A request that finds
    nothing queued or running anywhere runs on the event loop."""

    def __init__(self, exit_number: int, path: Path, executor: ThreadPoolExecutor, busy: list[int]) -> None:
        self.exit = exit_number
        self.session = open_session(path, spin_us=DEFAULT_SPIN_US)
        self.input = self.session.get_inputs()[0].name
        self.executor, self.busy = executor, busy  # busy[0]: requests in flight, every exit
        self.pending: list[tuple[np.ndarray, Connection]] = []
        self.running = False

    def add(self, x: np.ndarray, conn: Connection) -> None:
        self.pending.append((x, conn))
        self.busy[0] += 1
        if len(self.pending) == 1:  # requests parsed in this loop turn join the same batch
            asyncio.get_running_loop().call_soon(self.kick)

    def kick(self) -> None:
        if self.running or not self.pending:
            return
        batch, self.pending = self.pending[:MAX_BATCH], self.pending[MAX_BATCH:]
        x = np.stack([item[0] for item in batch])
        if self.busy[0] == 1:  # alone on the server: no hand-off to the inference thread
            try:
                logits = self.session.run(None, {self.input: x})[0]
            except Exception:
                logits = None
            self.finish(batch, logits)
            return
        self.running = True
        future = asyncio.get_running_loop().run_in_executor(self.executor, self.session.run, None, {self.input: x})
        future.add_done_callback(lambda f: self.finish(batch, None if f.exception() else f.result()[0]))

    def finish(self, batch: list, logits: np.ndarray | None) -> None:
        """Answer the batch (``logits`` None: ORT failed, a 500 each) and start the next one."""
        self.running = False
        self.busy[0] -= len(batch)
        for j, (_, conn) in enumerate(batch):
            if logits is None:
                conn.reply(500, b'{"error":"internal_error"}')
            else:
                conn.answer(self.exit, logits[j])
        self.kick()


class Connection(asyncio.Protocol):
    def __init__(self, server: LeastServer) -> None:
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.body: list[bytes] = []
        self.url = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.reply(400, b'{"error":"bad_request"}')
            self.transport.close()

    def on_message_begin(self) -> None:
        self.url, self.body = b"", []

    def on_url(self, url: bytes) -> None:
        self.url += url  # a long URL may come in pieces

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        body = b"".join(self.body)
        self.server.handle(self, self.parser.get_method(), httptools.parse_url(self.url), body)

    def reply(self, status: int, body: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return  # the client went away
        head = b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
        self.transport.write(head % (status, b"OK" if status == 200 else b"Error", len(body)) + body)

    def answer(self, exit_number: int, logits: np.ndarray) -> None:
        e = np.exp(logits - logits.max())
        label = int(e.argmax())
        body = {"exit": exit_number, "label": label, "probability": float(e[label] / e.sum())}
        self.reply(200, json.dumps(body).encode())


class LeastServer:
    def __init__(self, model_dir: Path) -> None:
        manifest = load_manifest(model_dir, verify=True)
        self.preprocess = Preprocessor.from_spec(manifest.input, MAX_PIXELS)
        executor = ThreadPoolExecutor(1, thread_name_prefix="least-ort")
        busy = [0]
        self.exits = {e.exit: ExitGraph(e.exit, model_dir / e.path, executor, busy) for e in manifest.exits}
        self.main_exit = manifest.num_exits
        x = np.zeros((1, *self.preprocess(_blank_png(manifest.input)).shape), np.float32)
        for graph in self.exits.values():  # warm every graph at batch 1 and at a full batch
            for n in (1, MAX_BATCH):
                graph.session.run(None, {graph.input: np.repeat(x, n, axis=0)})

    def handle(self, conn: Connection, method: bytes, url, body: bytes) -> None:
        path = url.path
        if method == b"GET" and path == b"/readyz":
            conn.reply(200, b'{"status":"ready"}')
        elif method == b"GET" and path == b"/v1/model":
            # serve_bench asks every server how a lone request runs
            conn.reply(200, b'{"lone_requests":"the exit graphs","batching":{"lone_on_event_loop":"all"}}')
        elif method == b"POST" and path == b"/classify":
            query = parse_qs(url.query.decode()) if url.query else {}
            try:
                graph = self.exits.get(int(query.get("exit", [self.main_exit])[0]))
            except ValueError:
                graph = None
            if graph is None:
                conn.reply(422, b'{"error":"invalid_parameters"}')
                return
            try:
                x = self.preprocess(body)
            except Exception:
                conn.reply(400, b'{"error":"bad_image"}')
                return
            graph.add(x, conn)
        else:
            conn.reply(404, b'{"error":"not_found"}')


def _blank_png(spec) -> bytes:
    buf = io.BytesIO()
    Image.new("L" if spec.channels == 1 else "RGB", (spec.width, spec.height)).save(buf, format="PNG")
    return buf.getvalue()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.least_server", description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8200)
    args, _ = parser.parse_known_args(argv)  # the server's other flags: ignored
    server = LeastServer(args.model_dir)

    async def serve() -> None:
        listener = await asyncio.get_running_loop().create_server(lambda: Connection(server), args.host, args.port)
        await listener.serve_forever()

    uvloop.run(serve())


if __name__ == "__main__":
    main()
