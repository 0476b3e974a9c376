#!/usr/bin/env python3
"""Load test and side-by-side benchmark of `slm serve` and llama.cpp's `llama-server`.

Each client loops: one streaming /v1/completions request (64 tokens, `ignore_eos`), then the
next, until its count or the time is up. Reported per server and client count: aggregate
completion tokens/s over the wall time, time to first token (p50/p99), request latency
(p50/p99), failures and 429s, and the server's RSS at start, peak and end (memory must stay
flat under load). Standard library only; the servers are started and stopped by this script,
on the same model file, threads and slot count, one after the other.

  python3 tools/bench_serve.py --slm target/release/slm \
      --llama-server /path/to/llama-server --model SmolLM2-135M-Instruct.Q4_1.gguf \
      --clients 1,4,8 --requests 6 --threads 2 --parallel 4

  # the load test: 8 and 32 clients for two minutes each, slm only
  python3 tools/bench_serve.py --slm target/release/slm --model M.gguf \
      --clients 8,32 --duration 120
"""
import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import threading
import time

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain why the sky is blue.",
    "List some uses of copper.",
    "Describe a walk through a forest in autumn.",
    "What makes a good cup of coffee?",
    "Tell me about the history of bicycles.",
    "How do bees make honey?",
    "Describe the city of Lisbon.",
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return 0.0
    return 0.0


def wait_ready(port, proc, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/health")
            r = c.getresponse()
            r.read()
            if r.status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit("server did not become ready")


def one_request(port, i, tokens):
    """Returns (ttft, latency, completion_tokens, status)."""
    body = json.dumps({
        "model": "m",
        "prompt": PROMPTS[i % len(PROMPTS)],
        "max_tokens": tokens,
        "temperature": 0.8,
        "seed": i,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    })
    t0 = time.perf_counter()
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    c.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        r.read()
        return None, time.perf_counter() - t0, 0, r.status
    ttft = None
    n = 0
    usage = None
    buf = b""
    while True:
        chunk = r.read1(65536) if hasattr(r, "read1") else r.read(1)
        if not chunk:
            break
        buf += chunk
        while b"\n\n" in buf:
            frame, buf = buf.split(b"\n\n", 1)
            if not frame.startswith(b"data: "):
                continue
            payload = frame[6:]
            if payload == b"[DONE]":
                continue
            ev = json.loads(payload)
            if ev.get("usage"):
                usage = ev["usage"]
            for ch in ev.get("choices", []):
                if ch.get("text"):
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    n += 1
    c.close()
    if usage:
        n = usage["completion_tokens"]
    return ttft, time.perf_counter() - t0, n, 200


def pct(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))
    return xs[k]


def load(port, pid, clients, requests, duration, tokens):
    results = []
    lock = threading.Lock()
    stop_at = time.time() + duration if duration else None
    peak = [rss_mib(pid)]

    def client(c):
        k = 0
        while True:
            if stop_at is not None and time.time() >= stop_at:
                return
            if stop_at is None and k >= requests:
                return
            try:
                res = one_request(port, c * 1000 + k, tokens)
            except OSError as e:
                res = (None, 0.0, 0, f"error {e}")
            with lock:
                results.append(res)
            k += 1

    def watch():
        while any(t.is_alive() for t in threads):
            peak[0] = max(peak[0], rss_mib(pid))
            time.sleep(0.25)

    start_rss = rss_mib(pid)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    w = threading.Thread(target=watch)
    w.start()
    for t in threads:
        t.join()
    w.join()
    wall = time.perf_counter() - t0
    ok = [r for r in results if r[3] == 200]
    return {
        "clients": clients,
        "requests": len(results),
        "ok": len(ok),
        "429": sum(1 for r in results if r[3] == 429),
        "failed": sum(1 for r in results if r[3] not in (200, 429)),
        "tokens": sum(r[2] for r in ok),
        "tok_s": sum(r[2] for r in ok) / wall,
        "ttft_p50": pct([r[0] for r in ok if r[0] is not None], 50),
        "ttft_p99": pct([r[0] for r in ok if r[0] is not None], 99),
        "lat_p50": pct([r[1] for r in ok], 50),
        "lat_p99": pct([r[1] for r in ok], 99),
        "rss_start": start_rss,
        "rss_peak": peak[0],
        "rss_end": rss_mib(pid),
        "wall": wall,
    }


def start_server(kind, a, port):
    if kind == "slm":
        cmd = [a.slm, "serve", "-m", a.model, "--port", str(port), "--parallel", str(a.parallel),
               "--threads", str(a.threads), "--queue", str(a.queue), "--ctx-size", str(a.ctx)]
    else:
        # llama-server splits -c over its slots.
        cmd = [a.llama_server, "-m", a.model, "--port", str(port), "--parallel", str(a.parallel),
               "-t", str(a.threads), "-c", str(a.ctx * a.parallel), "--log-disable"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_ready(port, proc)
    return proc


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slm", required=True)
    ap.add_argument("--llama-server")
    ap.add_argument("--model", required=True)
    ap.add_argument("--clients", default="1,4,8")
    ap.add_argument("--requests", type=int, default=4, help="requests per client (without --duration)")
    ap.add_argument("--duration", type=float, default=0, help="seconds per client count (load test)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--queue", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=2048, help="positions per slot")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args()
    servers = ["slm"] + (["llama-server"] if a.llama_server else [])
    out = []
    for clients in [int(c) for c in a.clients.split(",")]:
        for kind in servers:
            port = free_port()
            proc = start_server(kind, a, port)
            try:
                # One warm-up request, not counted.
                one_request(port, 999, 8)
                r = load(port, proc.pid, clients, a.requests, a.duration, a.tokens)
            finally:
                proc.terminate()
                proc.wait(timeout=60)
            r["server"] = kind
            out.append(r)
            print(f"{kind:12} clients {clients:2}: {r['ok']}/{r['requests']} ok, {r['429']} x 429, "
                  f"{r['failed']} failed; {r['tok_s']:.1f} tok/s; TTFT p50 {r['ttft_p50']:.3f} s "
                  f"p99 {r['ttft_p99']:.3f} s; latency p50 {r['lat_p50']:.2f} s p99 {r['lat_p99']:.2f} s; "
                  f"RSS {r['rss_start']:.0f} -> peak {r['rss_peak']:.0f} -> {r['rss_end']:.0f} MiB",
                  flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
