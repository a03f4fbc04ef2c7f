"""A small Flask application for the end-to-end test of examples/http
(``http_flask_app:app``): routing, query strings, JSON bodies, a streamed response,
Flask's own error pages."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from flask import Flask, Response, jsonify, request, stream_with_context

app = Flask(__name__)


@app.get("/")
def index() -> str:
    return "flask says hi"


@app.get("/greet/<name>")
def greet(name: str) -> Any:
    return jsonify(hello=name, lang=request.args.get("lang", "en"))


@app.post("/sum")
def total() -> Any:
    numbers = request.get_json()
    return jsonify(sum=sum(numbers), count=len(numbers))


@app.post("/upload")
def upload() -> Any:
    data = request.get_data()
    return jsonify(size=len(data), first=data[:4].decode("latin-1"))


@app.get("/stream")
def stream() -> Response:
    def numbers() -> Iterator[str]:
        for i in range(5):
            yield f"{i}\n"

    return Response(stream_with_context(numbers()), mimetype="text/plain")
