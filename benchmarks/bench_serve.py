"""Streaming throughput and latency of `chatforge serve` under 1, 4 and 16 concurrent clients, on loopback.

    python benchmarks/bench_serve.py                        # 1, 4 and 16 clients, 5 rounds, 64 tokens
    python benchmarks/bench_serve.py --size tiny            # a 3.7M model instead of GPT-2 small's body
    python benchmarks/bench_serve.py --clients 1 16 --rounds 3
    python benchmarks/bench_serve.py --threads 2            # the engine's torch threads (default 1)
    python benchmarks/bench_serve.py --no-fused             # serve --no-fused (torch's products only)

A full run takes about 4 minutes on 2 cores (`--size tiny`: under a minute). The engine runs on 1
torch thread by default: the HTTP loop and the clients need the other core, and on a machine where
other processes run, 2 threads make every op wait for whichever thread was descheduled (the engine
alone, at 2 threads beside another job, fell from about 190 to 6 tokens/s at 1 row).

The model. `--size small` (the default) is GPT-2 small's shape: 12 layers, width 768, 12 heads,
context 1024, with the corpus tokenizer's vocabulary instead of GPT-2's 50257 tokens (87M
parameters, 350 MB of fp32 weights). One row's decode step then waits on memory, reading every
weight once per token, as serving any real model does; batching shares that read between the rows,
which is what continuous batching is for. `--size tiny` (4 layers, width 256, context 256: 3.7M
parameters, 15 MB) fits in the CPU's cache: its one-row step is mostly Python and its 16-row step
mostly per-row work (attention over each row's cache, sampling, the HTTP chunks), so it stresses
the server's per-token overhead rather than measuring batching.

What is measured. The script makes everything in a temporary directory, downloading nothing: the
built-in world's corpus (half a megabyte), a byte-level BPE tokenizer trained on it, and a GPT of
the chosen size with random weights (speed does not depend on what the weights are), saved as a
checkpoint. The server is the real one: a child process builds it from the
checkpoint with `chatforge.serve.server.build_app` (`--max-batch-size 16`, no web page) and runs it
with uvicorn in `ServerThread` on a free loopback port. The clients run in this process: one
asyncio loop, one `httpx.AsyncClient`, one coroutine per client, each sending streaming
`/v1/chat/completions` requests (`--endpoint completions` for `/v1/completions`) back to back.

Every request asks for exactly `--max-tokens` tokens: `ignore_eos: true` (no end-of-turn stop),
no stop strings, default sampling (temperature 1), and a `logit_bias` of -100 on the tokens that
are single bytes of a multi-byte UTF-8 character (128 here). Those are the only tokens whose text
cannot be sent on its own (the server holds such bytes back until the character completes), so
without the ban two tokens would now and then arrive in one chunk; with it every streamed chunk
carries exactly one token. Prompts are different sentences of the corpus (10 to 40 tokens), so
rows sit at different positions, as real traffic does.

A request fails if it does not answer 200, sends an error event, does not end with `[DONE]`, or
its usage (`stream_options.include_usage`) reports another count than `--max-tokens`.

Figures, per concurrency level:

- aggregate tokens/s: completion tokens of a round / the round's wall time, where a round is
  every client sending `--requests` requests one after the other (all clients start together);
  the median over rounds. "x 1 client" is the median over rounds of that round's ratio to the
  single-client round of the same round (levels run interleaved, their order reversed every
  other round, so slow spells of the machine hit every level alike).
- TTFT: request sent -> first chunk carrying generated text, as the client sees it (chat's first
  chunk, the role, comes before any token and is not counted); p50/p95 over all requests.
- inter-token latency: the gaps between consecutive text chunks of a request, pooled over
  all requests; p50/p95.
- engine steps/s and tokens per step (from the runner's step counter): how full the batch was.
- CPU: where the cores went during the level's rounds, in cores (from /proc): the server's engine
  thread (with torch's worker threads, if --threads > 1), its HTTP thread (uvicorn's event loop),
  the clients (this process) and other processes; and the engine thread's wall time split into on
  a CPU, runnable but waiting for a CPU (the cores are busy: with our other threads or other
  processes), and blocked (waiting for the GIL, or for work), from /proc/.../schedstat.
  Other processes' share is of the machine's whole capacity, as in bench_ppo.py; above 5% the
  script prints a warning: the timings are then not the server's alone.

The engine alone. After each round of the levels (the server idle meanwhile), this process runs
the same engine on the same checkpoint, prompts and sampling parameters without HTTP
(`Engine.generate`, prefill included, as in the server) at 1 row and at the most clients' rows.
Its ratio is what the engine itself gains from batching: the server's ratio can only pass it if
HTTP costs the single client more than it costs the batch. "The server keeps" is the server's
tokens/s over the engine's alone at the same number of rows.

Goal (the serving issue): 16 clients >= 6x the single-client aggregate with no failed request.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_model, cpu_ticks, load_average  # benchmarks/machine.py

QUIET = 0.05  # other processes' share of the CPU under which timings are trusted
GOAL_CLIENTS, GOAL_RATIO = 16, 6.0
MODEL_NAME = "bench"
# model shapes (random weights): GPT-2 small's body, whose 350 MB of weights make one row's decode
# step wait on memory, as serving a real model does; and a 3.7M model whose weights sit in the cache
SIZES = {"small": {"layers": 12, "width": 768, "heads": 12, "context": 1024},
         "tiny": {"layers": 4, "width": 256, "heads": 4, "context": 256}}


# ---- the inputs: corpus, tokenizer, checkpoint ----------------------------------------------------------


def make_inputs(root: Path, args) -> dict:
    """Tokenizer and a random-weight checkpoint under root; prompts and the banned byte tokens."""
    import torch

    from chatforge.checkpoint import save_checkpoint
    from chatforge.data.readers import iter_documents
    from chatforge.data.world import write_corpus
    from chatforge.model import GPT, GPTConfig
    from chatforge.tokenizer import Tokenizer

    corpus = write_corpus(root / "corpus.jsonl", num_bytes=500_000)
    tokenizer = Tokenizer.train(iter_documents([corpus]), vocab_size=args.vocab)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, context_length=args.context, n_layer=args.layers,
                       n_head=args.heads, n_embd=args.width)
    torch.manual_seed(0)
    model = GPT(config)
    save_checkpoint(root / "model" / "checkpoint", model, tokenizer=tokenizer)

    prompts: list[str] = []
    seen = set()
    for doc in iter_documents([corpus]):
        for sentence in doc.replace("\n", " ").split(". "):
            sentence = sentence.strip()
            if sentence and sentence not in seen and 10 <= len(tokenizer.encode(sentence)) <= 40:
                seen.add(sentence)
                prompts.append(sentence + ".")
        if len(prompts) >= 256:
            break
    partial = []  # tokens whose bytes are not valid UTF-8 on their own (a piece of a character)
    for i in range(tokenizer.vocab_size):
        try:
            tokenizer.token_bytes(i).decode("utf-8")
        except UnicodeDecodeError:
            partial.append(i)
    return {"checkpoint": str(root / "model" / "checkpoint"), "prompts": prompts, "ban": partial,
            "vocab": tokenizer.vocab_size, "params_m": model.num_params() / 1e6}


# ---- the server, in a child process ---------------------------------------------------------------------


def serve_worker(args) -> None:
    """Run the server; print its URL as a JSON line; answer "stats" lines with the runner's step count;
    stop (graceful shutdown) when stdin closes."""
    import torch

    from chatforge.serve.app import ServeConfig
    from chatforge.serve.server import ServerThread, build_app

    torch.set_num_threads(args.threads)
    config = ServeConfig(checkpoint=args.serve_worker, model_name=MODEL_NAME, max_batch_size=args.max_batch_size,
                         web=False, device="cpu", log_level="warning", fused=not args.no_fused,
                         compile=args.compile)
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON lines the parent reads
        app = build_app(config)
    runner = app.state.chatforge.runner
    server = ServerThread(app).start()

    def info() -> dict:
        engine = runner._thread  # started by the app's lifespan; restarted only if it died
        return {"url": server.url, "slots": app.state.chatforge.engine.max_batch_size, "steps": runner.steps,
                "http_tid": server.thread.native_id, "engine_tid": engine.native_id if engine else None}

    print(json.dumps(info()), flush=True)
    for line in sys.stdin:
        if line.strip() == "stats":
            print(json.dumps(info()), flush=True)
    server.stop()


def server_flags(args) -> list[str]:
    return (["--no-fused"] if args.no_fused else []) + (["--compile"] if args.compile else [])


class Server:
    """The child process running the server: start, ask for the step count, read its threads' CPU time."""

    def __init__(self, args, checkpoint: str) -> None:
        command = [sys.executable, __file__, "--serve-worker", checkpoint, f"--threads={args.threads}",
                   f"--max-batch-size={args.max_batch_size}"] + server_flags(args)
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        line = self.proc.stdout.readline()
        if not line:
            sys.exit(f"the server did not start (exit code {self.proc.wait()})")
        self.info = json.loads(line)
        self.url, self.slots = self.info["url"], self.info["slots"]

    def steps(self) -> int:
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        self.info = json.loads(self.proc.stdout.readline())
        return self.info["steps"]

    def thread_ticks(self) -> dict[str, int]:
        """CPU ticks of the server's threads, by role: engine (the engine thread and torch's intra-op
        workers), http (uvicorn's event loop thread), other (the main thread, idle while serving)."""
        roles = {str(self.info["http_tid"]): "http", str(self.info["engine_tid"]): "engine",
                 str(self.proc.pid): "other"}
        out = {"engine": 0, "http": 0, "other": 0}
        task = Path(f"/proc/{self.proc.pid}/task")
        try:
            tids = list(task.iterdir())
        except OSError:
            return out
        for t in tids:
            try:
                stat = (t / "stat").read_text()
            except OSError:
                continue
            utime, stime = map(int, stat.rsplit(")", 1)[1].split()[11:13])
            out[roles.get(t.name, "engine")] += utime + stime  # any other thread: torch's workers
        return out

    def sched(self) -> dict[str, tuple[int, int]]:
        """(ns on a CPU, ns runnable but waiting for a CPU) of the engine and HTTP threads (schedstat)."""
        out = {}
        for role in ("engine", "http"):
            path = Path(f"/proc/{self.proc.pid}/task/{self.info[role + '_tid']}/schedstat")
            try:
                run, wait = path.read_text().split()[:2]
                out[role] = (int(run), int(wait))
            except (OSError, ValueError):
                out[role] = (0, 0)
        return out

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ---- the clients ----------------------------------------------------------------------------------------


class Result:
    __slots__ = ("ok", "error", "tokens", "chunks", "ttft", "gaps")

    def __init__(self) -> None:
        self.ok, self.error, self.tokens, self.chunks, self.ttft, self.gaps = False, "", 0, 0, None, []


def request_body(args, prompt: str, ban: dict[str, int]) -> dict:
    body = {"model": MODEL_NAME, "max_tokens": args.max_tokens, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True, "logit_bias": ban}
    if args.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


async def one_request(client, url: str, body: dict, max_tokens: int) -> Result:
    res = Result()
    done, usage_tokens, last = False, None, None
    t0 = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                res.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return res
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                now = time.perf_counter()
                obj = json.loads(data)
                if "error" in obj:
                    res.error = f"error event: {obj['error']}"
                    return res
                if obj.get("usage"):
                    usage_tokens = obj["usage"]["completion_tokens"]
                for choice in obj["choices"]:
                    text = choice["delta"].get("content") if "delta" in choice else choice.get("text")
                    if text:
                        if last is None:
                            res.ttft = now - t0
                        else:
                            res.gaps.append(now - last)
                        last = now
                        res.chunks += 1
    except Exception as e:  # a broken connection, a timeout: a failed request
        res.error = f"{type(e).__name__}: {e}"
        return res
    if not done:
        res.error = "the stream ended without [DONE]"
    elif usage_tokens != max_tokens:
        res.error = f"usage reports {usage_tokens} completion tokens, expected {max_tokens}"
    else:
        res.ok = True
        res.tokens = usage_tokens
    return res


async def run_round(client, url: str, args, clients: int, prompts: list[str], ban: dict[str, int],
                    offset: int) -> tuple[float, list[Result]]:
    """Every client sends `args.requests` requests back to back; (wall seconds, results)."""

    async def one_client(c: int) -> list[Result]:
        out = []
        for k in range(args.requests):
            prompt = prompts[(offset + c * args.requests + k) % len(prompts)]
            out.append(await one_request(client, url, request_body(args, prompt, ban), args.max_tokens))
        return out

    t0 = time.perf_counter()
    per_client = await asyncio.gather(*(one_client(c) for c in range(clients)))
    return time.perf_counter() - t0, [r for rs in per_client for r in rs]


# ---- the engine alone: the same work without HTTP -----------------------------------------------------


class EngineAlone:
    """The server's engine in this process, no HTTP: `Engine.generate` on the same chat prompts with the
    same sampling parameters, one prompt and `most` prompts at once (prefill included, as in the server)."""

    def __init__(self, args, inputs: dict, most: int) -> None:
        import torch

        from chatforge.chat import ChatTemplate, Conversation, Message
        from chatforge.checkpoint import load_checkpoint
        from chatforge.generate.engine import Engine
        from chatforge.generate.params import SamplingParams

        torch.set_num_threads(args.threads)
        ckpt = load_checkpoint(inputs["checkpoint"], device="cpu")
        self.engine = Engine(ckpt.model, ckpt.tokenizer, max_batch_size=args.max_batch_size, fused=not args.no_fused,
                             compile=args.compile)
        self.engine.warm_up()
        template = ChatTemplate(ckpt.tokenizer)
        self.prompts = [template.generation_prompt(Conversation([Message("user", text)]))
                        if args.endpoint == "chat" else ckpt.tokenizer.encode(text) for text in inputs["prompts"]]
        self.params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True,
                                     logit_bias={i: -100.0 for i in inputs["ban"]})
        self.most = most
        self.tps: dict[int, list[float]] = {n: [] for n in sorted({1, most})}

    def run(self, rows: int, offset: int) -> float:
        prompts = [self.prompts[(offset + i) % len(self.prompts)] for i in range(rows)]
        t0 = time.perf_counter()
        done = self.engine.generate(prompts, self.params)
        tokens = sum(len(o.token_ids) for c in done for o in c.outputs)
        return tokens / (time.perf_counter() - t0)

    def round(self, offset: int) -> None:
        for rows in self.tps:
            self.tps[rows].append(self.run(rows, offset))


# ---- figures --------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default); nan for no values."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


class Level:
    """What one concurrency level accumulated over the rounds."""

    def __init__(self, clients: int) -> None:
        self.clients = clients
        self.tps: list[float] = []
        self.results: list[Result] = []
        self.seconds = 0.0
        self.steps = 0
        self.tokens = 0
        self.cpu = {"engine": 0, "http": 0, "other": 0, "clients": 0, "others": 0}
        self.sched = {"engine": [0, 0], "http": [0, 0]}  # ns on a CPU, ns waiting for one

    def add(self, seconds: float, results: list[Result], steps: int, ticks: dict[str, int],
            sched: dict[str, tuple[int, int]]) -> None:
        for role, (run, wait) in sched.items():
            self.sched[role][0] += run
            self.sched[role][1] += wait
        tokens = sum(r.tokens for r in results if r.ok)
        self.tps.append(tokens / seconds)
        self.results += results
        self.seconds += seconds
        self.steps += steps
        self.tokens += sum(r.tokens for r in results)
        for k, v in ticks.items():
            self.cpu[k] += v


def print_table(levels: dict[int, Level], args) -> None:
    base = levels.get(1)
    header = (f"| {'clients':>7} | {'requests':>8} | {'failed':>6} | {'tokens/s':>8} | {'x 1 client':>10} | "
              f"{'TTFT p50 ms':>11} | {'TTFT p95 ms':>11} | {'ITL p50 ms':>10} | {'ITL p95 ms':>10} |")
    print(header)
    print("|" + "|".join("-" * (len(cell) - 1) + ":" for cell in header.split("|")[1:-1]) + "|")
    for n, lv in levels.items():
        ttft = [r.ttft * 1e3 for r in lv.results if r.ok and r.ttft is not None]
        gaps = [g * 1e3 for r in lv.results if r.ok for g in r.gaps]
        failed = sum(not r.ok for r in lv.results)
        ratio = (f"{statistics.median(x / y for x, y in zip(lv.tps, base.tps)):.2f}x" if base is not None else "-")
        print(f"| {n:>7} | {len(lv.results):>8} | {failed:>6} | {statistics.median(lv.tps):8.1f} | {ratio:>10} | "
              f"{percentile(ttft, 0.5):11.1f} | {percentile(ttft, 0.95):11.1f} | {percentile(gaps, 0.5):10.1f} | "
              f"{percentile(gaps, 0.95):10.1f} |")


def print_details(levels: dict[int, Level], tck: int) -> float:
    """Engine steps and the CPU split per level; returns the largest share other processes used."""
    print("\nper level: engine steps/s, tokens per step (batch fill), ms per step; CPU in cores "
          "(engine thread + torch workers / HTTP loop / clients / other processes):")
    busiest = 0.0
    for n, lv in levels.items():
        cores = {k: v / tck / lv.seconds for k, v in lv.cpu.items()}
        others = lv.cpu["others"] / (lv.seconds * tck * (os.cpu_count() or 1))  # share of the machine's capacity
        busiest = max(busiest, others)
        per_step = lv.tokens / max(lv.steps, 1)
        print(f"  {n:>2} clients: {lv.steps / lv.seconds:6.1f} steps/s, {per_step:5.2f} tokens/step, "
              f"{1e3 * lv.seconds / max(lv.steps, 1):5.2f} ms/step; CPU engine {cores['engine']:.2f}, "
              f"HTTP {cores['http']:.2f}, clients {cores['clients']:.2f}, others {cores['others']:.2f} "
              f"({others:.0%} of the machine)")
        run, wait = (x / 1e9 / lv.seconds for x in lv.sched["engine"])
        print(f"              engine thread's wall time: on a CPU {run:.0%}, waiting for a CPU {wait:.0%}, "
              f"blocked {max(0.0, 1 - run - wait):.0%} (on the GIL, or no work)")
    merged = sum(r.chunks != r.tokens for lv in levels.values() for r in lv.results if r.ok)
    if merged:
        print(f"\nnote: {merged} request(s) streamed a different number of text chunks than tokens: their "
              "inter-token gaps are per chunk")
    errors = [r.error for lv in levels.values() for r in lv.results if not r.ok]
    if errors:
        print(f"\nfailed requests: {len(errors)}; first errors: {errors[:3]}")
    return busiest


# ---- main -----------------------------------------------------------------------------------------------


async def drive(args, server: Server, inputs: dict) -> tuple[dict[int, Level], EngineAlone]:
    import httpx

    ban = {str(i): -100 for i in inputs["ban"]}
    prompts = inputs["prompts"]
    path = "/v1/chat/completions" if args.endpoint == "chat" else "/v1/completions"
    url = server.url + path
    most = max(args.clients)
    limits = httpx.Limits(max_connections=most + 4, max_keepalive_connections=most + 4)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(120.0)) as client:
        t0 = time.perf_counter()
        for n in sorted(set(args.clients) | {most}):  # warm-up: connections, allocator, thread pools, every batch size
            await run_round(client, url, args, n, prompts, ban, offset=0)
        alone = EngineAlone(args, inputs, most)
        alone.round(0)
        alone.tps = {n: [] for n in alone.tps}  # the warm-up's figures are not kept
        print(f"warm-up: {time.perf_counter() - t0:.1f} s", flush=True)

        levels = {n: Level(n) for n in args.clients}
        offset = 1000
        for r in range(args.rounds):
            order = args.clients if r % 2 == 0 else list(reversed(args.clients))
            parts = []
            for n in order:
                steps0, threads0, sched0 = server.steps(), server.thread_ticks(), server.sched()
                busy0, mine0 = cpu_ticks()
                seconds, results = await run_round(client, url, args, n, prompts, ban, offset)
                busy1, mine1 = cpu_ticks()
                steps1, threads1, sched1 = server.steps(), server.thread_ticks(), server.sched()
                offset += n * args.requests
                ticks = {k: threads1[k] - threads0[k] for k in threads0}
                ticks["clients"] = mine1 - mine0
                ticks["others"] = max(0, (busy1 - busy0) - ticks["clients"] - sum(threads1.values())
                                      + sum(threads0.values()))
                sched = {k: (sched1[k][0] - sched0[k][0], sched1[k][1] - sched0[k][1]) for k in sched0}
                levels[n].add(seconds, results, steps1 - steps0, ticks, sched)
                failed = sum(not x.ok for x in results)
                parts.append(f"{n} clients {levels[n].tps[-1]:.0f} tok/s" + (f" ({failed} failed)" if failed else ""))
            alone.round(offset)  # the server is idle meanwhile
            parts.append(f"engine alone {alone.tps[1][-1]:.0f} / {alone.tps[most][-1]:.0f} tok/s at 1 / {most} rows")
            print(f"  round {r + 1}: " + ", ".join(parts), flush=True)
    return levels, alone


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                epilog="Run by hand (not in the tests); the module docstring explains the figures.")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="concurrency levels")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--requests", type=int, default=2, help="requests each client sends per round, back to back")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request (exactly)")
    p.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    p.add_argument("--size", choices=sorted(SIZES), default="small",
                   help="the model's shape: small = GPT-2 small's 12 layers of width 768 (default), tiny = 4 of 256")
    p.add_argument("--layers", type=int, help="override the size's layer count")
    p.add_argument("--width", type=int, help="override the size's width")
    p.add_argument("--heads", type=int, help="override the size's head count")
    p.add_argument("--context", type=int, help="override the size's context length")
    p.add_argument("--vocab", type=int, default=2048, help="tokenizer size asked for (the corpus may give fewer)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server's engine")
    p.add_argument("--max-batch-size", type=int, default=16, help="the server's engine slots (at least 16)")
    p.add_argument("--no-fused", action="store_true", help="serve --no-fused: torch's products, not chatforge's "
                   "fused decode step (which serve uses by default where its kernels build)")
    p.add_argument("--compile", action="store_true", help="serve --compile: torch.compile's graphs too (prepared "
                   "before the rounds)")
    p.add_argument("--serve-worker", help=argparse.SUPPRESS)  # internal: run the server on this checkpoint
    args = p.parse_args()
    if args.serve_worker:
        serve_worker(args)
        return
    if args.max_batch_size < max(16, max(args.clients)):
        p.error(f"--max-batch-size must be at least 16 and at least the most clients ({max(args.clients)})")
    args.clients = sorted(set(args.clients))
    for name, value in SIZES[args.size].items():
        if getattr(args, name) is None:
            setattr(args, name, value)

    import torch

    t_start = time.perf_counter()
    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"python {platform.python_version()}; server: {args.threads} torch thread(s), "
          f"{args.max_batch_size} slots {' '.join(server_flags(args))}")
    print(f"load average at start: {load_average()}")
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        inputs = make_inputs(Path(tmp), args)
        print(f"model: {inputs['params_m']:.2f}M parameters ({args.layers} layers, width {args.width}, "
              f"{args.heads} heads, context {args.context}, vocab {inputs['vocab']}; random weights, fp32); "
              f"{args.endpoint} endpoint, streaming, {args.max_tokens} tokens per request, "
              f"{args.requests} request(s) per client per round, {args.rounds} rounds")
        server = Server(args, inputs["checkpoint"])
        try:
            levels, alone = asyncio.run(drive(args, server, inputs))
        finally:
            server.close()
    print()
    print_table(levels, args)
    busiest = print_details(levels, os.sysconf("SC_CLK_TCK"))
    med = statistics.median
    most = alone.most
    if most > 1:
        print(f"\nthe engine alone (Engine.generate in one process, no HTTP, same prompts and parameters): "
              f"{med(alone.tps[1]):.1f} tokens/s at 1 row, {med(alone.tps[most]):.1f} at {most} rows "
              f"({med(x / y for x, y in zip(alone.tps[most], alone.tps[1])):.2f}x: the ceiling of the server's "
              f"ratio unless HTTP slows 1 client more than {most})")
    print("the server keeps " + ", ".join(f"{med(lv.tps) / med(alone.tps[n]):.0%} of the engine alone's tokens/s "
                                          f"at {n} client(s)" for n, lv in levels.items() if n in alone.tps))
    failed = sum(not r.ok for lv in levels.values() for r in lv.results)
    if GOAL_CLIENTS in levels and 1 in levels:
        ratio = statistics.median(x / y for x, y in zip(levels[GOAL_CLIENTS].tps, levels[1].tps))
        met = ratio >= GOAL_RATIO and failed == 0
        print(f"\ngoal: {GOAL_CLIENTS} clients >= {GOAL_RATIO:g}x the single-client aggregate with no failed "
              f"request: {ratio:.2f}x, {failed} failed -> {'MET' if met else 'NOT MET'}")
    if busiest > QUIET:
        print(f"\nWARNING: other processes used up to {busiest:.0%} of the machine's CPU time during a level; "
              "the timings are unreliable (the server, its engine and the clients share the cores); rerun on a "
              "quiet machine.")
    print(f"load average at end: {load_average()}; total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
