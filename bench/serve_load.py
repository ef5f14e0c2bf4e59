"""Load and fault test of `lmforge serve`: concurrent clients on loopback against classify and chat.

Starts the server as a subprocess (its memory is read from /proc), then for each phase runs N
concurrent clients for T seconds, each sending its next request as soon as the last one answered:

- ``classify``: one review per request, micro-batched by the server;
- ``chat``: non-streaming chat completions (greedy, max_tokens 32), decoded in batches when they share settings;
- ``overload``: a second server with a tiny queue (``--overload-queue``) and many clients: every answer must
  be 200 or 503 (with Retry-After), never a 500 or a dropped connection.

Reports requests/s, p50 / p99 latency, status counts and the server's resident memory over each phase
(first sample after warm-up, maximum, last) into bench/results/serve_load.json.

    .venv/bin/python bench/serve_load.py --classify runs/demo/reviews-sentiment/pretrained --chat runs/chat-zh

``--soak MINUTES`` (needs ``--ner`` too) runs one server for that long under mixed traffic instead:
classify, NER, chat and streamed chat, plus a share of hostile requests (malformed JSON, lone
surrogates, texts and input lists over the limits, an unknown model, a declared oversize body and a
chunked oversize body without Content-Length). Every request is bounded (client timeout) and goes to
loopback only. It reports status counts and p50 / p99 per kind, and the server's RSS sampled every
5 s: the growth from the sample after the first minute (warm-up) to the last. Targets: no 500 and no
transport error, RSS growth under 5%; into bench/results/serve_soak.json.

    .venv/bin/python bench/serve_load.py --soak 20 --classify RUN --ner RUN --chat RUN

``--upload-mb N`` offers one chunked upload of N MB (no Content-Length) over a raw socket to a server with
the default 1 MB body limit, and reports the bytes the server took before answering (413 expected) and
its RSS before and after; into bench/results/serve_upload.json.

    .venv/bin/python bench/serve_load.py --upload-mb 300 --classify RUN --chat RUN

``--gain COMPRESSED_RUN`` serves the classify and chat phases twice, from the fp32 models and from compressed
ones (a ``lmforge quantize`` / ``lmforge export --to onnx`` copy of --classify; the chat model decoded at
``--precision``, default int8), and reports requests/s of each and the ratio; into bench/results/serve_gain.json.

    .venv/bin/python bench/serve_load.py --gain runs/e5-sent-int8 --classify runs/e5-sent --chat runs/gpt-tiny-zh
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

REVIEWS = [
    "房间很干净，服务也热情，下次还来。",
    "太差了，空调坏了也没人修。",
    "位置不错，早餐一般。",
    "性价比很高，推荐！",
]


DEFAULT_OUT = str(Path(__file__).parent / "results" / "serve_load.json")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    models: dict[str, str], *, queue_size: int, max_batch: int, precision: str = "fp32"
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    lmforge = Path(sys.executable).with_name("lmforge")
    args = [str(lmforge), "serve", "--port", str(port), "--queue-size", str(queue_size), "--max-batch", str(max_batch)]
    args += ["--precision", precision]
    for name, path in models.items():
        args += ["--model", f"{name}={path}"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    raise RuntimeError("the server did not start within 120 s")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def run_phase(url: str, make_request, *, clients: int, seconds: float, pid: int) -> dict:
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    memory: list[float] = []
    stop_at = time.monotonic() + seconds

    async def client(i: int, http: httpx.AsyncClient) -> None:
        k = 0
        while time.monotonic() < stop_at:
            path, body = make_request(i, k)
            k += 1
            started = time.perf_counter()
            try:
                r = await http.post(url + path, json=body)
                key = str(r.status_code)
                if r.status_code == 503 and r.headers.get("retry-after") is None:
                    key = "503-without-retry-after"
                if r.status_code == 503:
                    await asyncio.sleep(0.05)  # a polite client backs off a little
            except httpx.TransportError as e:
                key = f"transport-error:{type(e).__name__}"
            latencies.append(time.perf_counter() - started)
            statuses[key] = statuses.get(key, 0) + 1

    async def sample_memory() -> None:
        while time.monotonic() < stop_at:
            memory.append(rss_mb(pid))
            await asyncio.sleep(0.5)

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        started = time.monotonic()
        await asyncio.gather(sample_memory(), *(client(i, http) for i in range(clients)))
        elapsed = time.monotonic() - started
    ok = statuses.get("200", 0)
    ms = sorted(1000 * x for x in latencies)
    return {
        "clients": clients,
        "seconds": round(elapsed, 1),
        "requests": len(latencies),
        "statuses": statuses,
        "ok_per_s": round(ok / elapsed, 1),
        "p50_ms": round(statistics.median(ms), 1),
        "p99_ms": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 1),
        "rss_mb": {"first": round(memory[0], 1), "max": round(max(memory), 1), "last": round(memory[-1], 1)},
    }


def classify_request(i: int, k: int) -> tuple[str, dict]:
    return "/v1/classify", {"model": "classify", "input": [REVIEWS[(i + k) % len(REVIEWS)]]}


def chat_request(i: int, k: int) -> tuple[str, dict]:
    return "/v1/chat/completions", {
        "model": "chat",
        "messages": [{"role": "user", "content": REVIEWS[k % 4]}],
        "temperature": 0,
        "max_tokens": 32,
    }


# --- soak ---------------------------------------------------------------------------------------------
async def _oversize_chunks():
    for _ in range(40):  # 2.6 MB without Content-Length: the server must cut it at its 1 MB limit
        yield b" " * 65536


def soak_request(i: int, k: int) -> tuple[str, str, dict]:
    """(kind, path, httpx keyword arguments) of client ``i``'s ``k``-th request: 80% valid, 20% hostile."""
    text = REVIEWS[(i + k) % len(REVIEWS)]
    chat = {"model": "chat", "messages": [{"role": "user", "content": text}], "max_tokens": 16, "temperature": 0}
    slot = (7 * i + k) % 20
    if slot < 6:
        return "classify", "/v1/classify", {"json": {"model": "classify", "input": [text]}}
    if slot < 11:
        return "ner", "/v1/ner", {"json": {"model": "ner", "input": ["国务院总理李鹏今天在北京会见了日本客人。"]}}
    if slot < 13:
        return "chat", "/v1/chat/completions", {"json": chat}
    if slot < 16:
        return "chat-stream", "/v1/chat/completions", {"json": {**chat, "stream": True}}
    headers = {"content-type": "application/json"}
    hostile = [
        ("bad-json", "/v1/classify", {"content": b'{"model": "classify", "input": [', "headers": headers}),
        ("lone-surrogate", "/v1/ner", {"content": b'{"model": "ner", "input": ["\\ud800x"]}', "headers": headers}),
        ("too-long", "/v1/classify", {"json": {"model": "classify", "input": ["长" * 5000]}}),
        ("too-many", "/v1/classify", {"json": {"model": "classify", "input": ["好"] * 500}}),
        ("unknown-model", "/v1/ner", {"json": {"model": "nope", "input": ["x"]}}),
        ("oversize", "/v1/classify", {"content": b" " * 1_100_000, "headers": headers}),
        ("chunked-oversize", "/v1/classify", {"content": _oversize_chunks(), "headers": headers}),
    ]
    return hostile[(i + k) % len(hostile)]


async def run_soak(url: str, *, clients: int, seconds: float, pid: int) -> dict:
    by_kind: dict[str, dict] = {}
    memory: list[tuple[float, float]] = []
    started = time.monotonic()
    stop_at = started + seconds

    async def one(http: httpx.AsyncClient, kind: str, path: str, kwargs: dict) -> str:
        if kind == "chat-stream":
            async with http.stream("POST", url + path, **kwargs) as r:
                lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
                if r.status_code == 200 and lines[-1:] != ["data: [DONE]"]:
                    return "200-stream-unfinished"
                return str(r.status_code)
        r = await http.post(url + path, **kwargs)
        return str(r.status_code)

    async def client(i: int, http: httpx.AsyncClient) -> None:
        k = 0
        while time.monotonic() < stop_at:
            kind, path, kwargs = soak_request(i, k)
            k += 1
            t0 = time.perf_counter()
            try:
                key = await one(http, kind, path, kwargs)
            except httpx.TransportError as e:
                key = f"transport-error:{type(e).__name__}"
            record = by_kind.setdefault(kind, {"statuses": {}, "latencies": []})
            record["statuses"][key] = record["statuses"].get(key, 0) + 1
            record["latencies"].append(time.perf_counter() - t0)
            if key == "503":
                await asyncio.sleep(0.05)

    async def sample_memory() -> None:
        while time.monotonic() < stop_at:
            memory.append((time.monotonic() - started, rss_mb(pid)))
            await asyncio.sleep(5.0)

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        await asyncio.gather(sample_memory(), *(client(i, http) for i in range(clients)))
    kinds = {}
    for kind, r in sorted(by_kind.items()):
        ms = sorted(1000 * x for x in r["latencies"])
        kinds[kind] = {
            "requests": len(ms),
            "statuses": r["statuses"],
            "p50_ms": round(statistics.median(ms), 1),
            "p99_ms": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 1),
        }
    totals: dict[str, int] = {}
    for r in kinds.values():
        for key, n in r["statuses"].items():
            totals[key] = totals.get(key, 0) + n
    warm = next((m for t, m in memory if t >= 60), memory[0][1])
    growth = (memory[-1][1] - warm) / warm
    return {
        "clients": clients,
        "seconds": round(time.monotonic() - started, 1),
        "kinds": kinds,
        "statuses": totals,
        "server_errors": sum(n for key, n in totals.items() if key.startswith("5") and key not in ("503", "504")),
        "transport_errors": sum(n for key, n in totals.items() if key.startswith("transport")),
        "rss_mb": {
            "after_warmup": round(warm, 1),
            "max": round(max(m for _, m in memory), 1),
            "last": round(memory[-1][1], 1),
            "growth_after_warmup": round(growth, 4),
            "samples": [(round(t), round(m, 1)) for t, m in memory],
        },
    }


def soak(args) -> None:
    if not args.ner:
        raise SystemExit("--soak needs --ner RUN_DIR as well")
    models = {"classify": args.classify, "ner": args.ner, "chat": args.chat}
    proc, url = start_server(models, queue_size=64, max_batch=32)
    try:
        result = asyncio.run(run_soak(url, clients=args.clients, seconds=60 * args.soak, pid=proc.pid))
        result["alive_after"] = httpx.get(f"{url}/healthz").status_code == 200
    finally:
        stop(proc)
    result["threads"], result["settings"] = os.cpu_count(), vars(args)
    out = Path(args.out if args.out != DEFAULT_OUT else Path(DEFAULT_OUT).with_name("serve_soak.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    for kind, r in result["kinds"].items():
        print(
            f"{kind:17s} {r['requests']:7d} requests  p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms  "
            f"{r['statuses']}"
        )
    rss = result["rss_mb"]
    print(
        f"5xx other than 503/504: {result['server_errors']}; transport errors: {result['transport_errors']}; RSS "
        f"{rss['after_warmup']} MiB after warm-up -> {rss['last']} MiB ({100 * rss['growth_after_warmup']:+.1f}%), "
        f"max {rss['max']} MiB"
    )
    print(f"wrote {out}")


def chunked_upload(url: str, megabytes: float, pid: int) -> dict:
    """Offer ``megabytes`` of chunked body to /v1/classify; what the server took before it answered."""
    host, port = url.removeprefix("http://").split(":")
    chunk = b"10000\r\n" + b" " * 65536 + b"\r\n"
    sent, reply, before = 0, b"", rss_mb(pid)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        sock.settimeout(0.0)
        deadline = time.monotonic() + 120
        while sent < megabytes * 1e6 and b"\r\n\r\n" not in reply and time.monotonic() < deadline:
            try:
                sent += sock.send(chunk)
            except BlockingIOError:  # the server stopped reading: wait for its answer
                time.sleep(0.01)
            except (BrokenPipeError, ConnectionResetError):
                break
            with contextlib.suppress(BlockingIOError):
                reply += sock.recv(65536)
    status = reply.split(b"\r\n", 1)[0].decode(errors="replace")
    return {
        "offered_bytes": int(megabytes * 1e6),
        "sent_before_answer": sent,
        "status_line": status,
        "rss_mb": {"before": round(before, 1), "after": round(rss_mb(pid), 1)},
    }


def upload(args) -> None:
    proc, url = start_server({"classify": args.classify}, queue_size=64, max_batch=32)
    try:
        result = chunked_upload(url, args.upload_mb, proc.pid)
    finally:
        stop(proc)
    out = Path(args.out if args.out != DEFAULT_OUT else Path(DEFAULT_OUT).with_name("serve_upload.json"))
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(
        f"{result['status_line']} after {result['sent_before_answer']:,} of {result['offered_bytes']:,} bytes; "
        f"RSS {result['rss_mb']['before']} -> {result['rss_mb']['after']} MiB; wrote {out}"
    )


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def gain(args: argparse.Namespace) -> None:
    """classify and chat phases on a server of the fp32 models, then on one of the compressed ones (same clients,
    same seconds, one server at a time); requests/s and latency of each and the ratio, into
    bench/results/serve_gain.json."""
    setups = {
        "fp32": ({"classify": args.classify, "chat": args.chat}, "fp32"),
        "compressed": ({"classify": args.gain, "chat": args.chat}, args.precision),
    }
    results: dict = {"threads": os.cpu_count(), "settings": vars(args)}
    for name, (models, precision) in setups.items():
        proc, url = start_server(models, queue_size=64, max_batch=32, precision=precision)
        try:
            asyncio.run(run_phase(url, classify_request, clients=4, seconds=2, pid=proc.pid))  # warm-up
            asyncio.run(run_phase(url, chat_request, clients=1, seconds=2, pid=proc.pid))
            results[name] = {
                "classify": asyncio.run(
                    run_phase(url, classify_request, clients=args.clients, seconds=args.seconds, pid=proc.pid)
                ),
                "chat": asyncio.run(
                    run_phase(url, chat_request, clients=args.chat_clients, seconds=args.seconds, pid=proc.pid)
                ),
            }
        finally:
            stop(proc)
    results["cases"] = {
        phase: {
            "lmforge": results["compressed"][phase]["ok_per_s"],
            "hf": None,
            "baseline": results["fp32"][phase]["ok_per_s"],
            "unit": "requests/s",
            "ratio": results["compressed"][phase]["ok_per_s"] / max(results["fp32"][phase]["ok_per_s"], 1e-9),
        }
        for phase in ("classify", "chat")
    }
    out = Path(args.out if args.out != DEFAULT_OUT else Path(DEFAULT_OUT).with_name("serve_gain.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    for phase in ("classify", "chat"):
        a, b = results["fp32"][phase], results["compressed"][phase]
        print(
            f"{phase:9s} fp32 {a['ok_per_s']:7.1f} ok/s p50 {a['p50_ms']:7.1f} ms | compressed {b['ok_per_s']:7.1f} "
            f"ok/s p50 {b['p50_ms']:7.1f} ms | {results['cases'][phase]['ratio']:.2f}x"
        )
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classify", required=True, help="a classification run directory (lmforge finetune classify)")
    parser.add_argument("--chat", required=True, help="a chat run directory or GPT model directory")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--chat-clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--overload-clients", type=int, default=64)
    parser.add_argument("--overload-queue", type=int, default=2)
    parser.add_argument("--ner", help="an NER run directory (lmforge finetune ner); needed by --soak")
    parser.add_argument("--soak", type=float, default=0.0, help="minutes of mixed traffic on one server")
    parser.add_argument("--upload-mb", type=float, default=0.0, help="one chunked upload of this many MB")
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument(
        "--gain",
        metavar="COMPRESSED_CLASSIFY_RUN",
        help="compare instead: classify and chat served as given (fp32) and compressed (this `lmforge quantize` or "
        "`lmforge export --to onnx` copy of --classify; chat at --precision)",
    )
    parser.add_argument("--precision", default="int8", help="with --gain: the chat model's decoding precision")
    args = parser.parse_args()
    if args.gain:
        gain(args)
        return
    if args.upload_mb:
        upload(args)
        return
    if args.soak:
        soak(args)
        return
    models = {"classify": args.classify, "chat": args.chat}
    results: dict = {"threads": os.cpu_count(), "settings": vars(args)}
    proc, url = start_server(models, queue_size=64, max_batch=32)
    try:
        asyncio.run(run_phase(url, classify_request, clients=4, seconds=2, pid=proc.pid))  # warm-up
        results["classify"] = asyncio.run(
            run_phase(url, classify_request, clients=args.clients, seconds=args.seconds, pid=proc.pid)
        )
        results["chat"] = asyncio.run(
            run_phase(url, chat_request, clients=args.chat_clients, seconds=args.seconds, pid=proc.pid)
        )
        wanted = ("lmforge_batch_size_count", "lmforge_batch_size_sum")
        exposed = httpx.get(f"{url}/metrics").text.splitlines()
        results["metrics_excerpt"] = [line for line in exposed if line.startswith(wanted)]
    finally:
        stop(proc)
    proc, url = start_server(models, queue_size=args.overload_queue, max_batch=4)
    try:
        results["overload"] = asyncio.run(
            run_phase(url, classify_request, clients=args.overload_clients, seconds=args.seconds, pid=proc.pid)
        )
        results["overload"]["alive_after"] = httpx.get(f"{url}/healthz").status_code == 200
    finally:
        stop(proc)
    bad = {k: v for k, v in results["overload"]["statuses"].items() if k not in ("200", "503")}
    results["overload"]["only_200_and_503"] = not bad
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    for phase in ("classify", "chat", "overload"):
        r = results[phase]
        print(
            f"{phase:9s} {r['clients']:3d} clients: {r['ok_per_s']:7.1f} ok/s  p50 {r['p50_ms']:7.1f} ms  "
            f"p99 {r['p99_ms']:7.1f} ms  {r['statuses']}  RSS {r['rss_mb']}"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
