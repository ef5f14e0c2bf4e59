"""llama.cpp itself, for the GGUF export tests and benches: the prebuilt ``xllamacpp`` wheel (llama.cpp's own server,
C++ and all, in a Python extension; MIT), chosen over ``llama-cpp-python`` (a source build of llama.cpp at install
time) and ``llama-cpp-py-sync`` because it ships prebuilt CPU wheels for Linux, macOS and Windows and exposes the
native server, whose ``/completion`` returns every generated token id (``return_tokens``) and whose ``/tokenize``
shows how llama.cpp cuts text. The OpenAI-style entry point of the Python binding is not used: it leaves out the
tokens of an incomplete UTF-8 character, so a byte-level model's ids could not be compared one by one."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path


class LlamaCpp:
    """One GGUF file served by llama.cpp on a loopback port (chosen by the system), 2 threads, until ``close``."""

    def __init__(self, gguf_file: str | Path, *, n_ctx: int = 512, threads: int = 2) -> None:
        import xllamacpp as xlc  # the dev extra's

        params = xlc.CommonParams()
        params.model.path = str(gguf_file)
        params.n_ctx = n_ctx
        params.n_parallel = 1
        params.cpuparams.n_threads = threads
        params.cpuparams_batch.n_threads = threads
        params.warmup = False
        params.port = 0
        self.server = xlc.Server(params)
        self.address = self.server.listening_address

    def _post(self, path: str, body: dict) -> dict:
        request = urllib.request.Request(
            self.address + path, json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=300) as reply:
            return json.loads(reply.read())

    def complete(self, prompt: list[int], n: int) -> dict:
        """llama.cpp's reply for ``n`` greedy tokens after the token ids ``prompt`` (the end token does not stop it):
        ``tokens``, and ``timings`` (``prompt_per_second``, ``predicted_per_second``)."""
        body = {"prompt": prompt, "n_predict": n, "temperature": 0, "top_k": 1, "ignore_eos": True}
        return self._post("/completion", {**body, "return_tokens": True, "cache_prompt": False})

    def greedy(self, prompt: list[int], n: int) -> list[int]:
        """``n`` greedy token ids after the token ids ``prompt`` (the end token does not stop it)."""
        return self.complete(prompt, n)["tokens"]

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's token ids for ``text``, with the BOS its metadata asks for."""
        return self._post("/tokenize", {"content": text, "add_special": True})["tokens"]

    def close(self) -> None:
        del self.server
