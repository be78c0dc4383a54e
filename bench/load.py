"""A class at once: simulated students against the app through its public API, on loopback.

    python bench/load.py                      # 1, 5, 10, 20, 30, 60 students on a gpt2-small-shaped checkpoint
    python bench/load.py --clients 1 30 --peer 25db805   # and the app at an earlier commit, level by level in turn
    python bench/load.py --clients 1 30 --peer-env GPT2VIZ_ENGINE_PROCESS=off   # and this app in another setting

Each student (a gradio_client in a thread, its own browser session; or, with `--harness sse`, all of them
in one event loop speaking Gradio's queue protocol, for a fraction of the CPU) presses Generate for 30
tokens (as fast as the server goes), then Step 5 times; all start together, on one example text or
(`--prompts distinct`) each on its own. Reported per level: time to
the first token (p50 / p95 / max), each student's tokens per second while generating (from its
first token to its last), all students' tokens per second together, the Steps' latency, the
server's resident memory before and after, and the ratios against one student alone measured in
the same run (a level of one student is run `--alone-runs` times, 5 by default, and its median run kept: one
30-token text moves by ±10% from run to run). Not a test: figures go to bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULTS = dict(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0, seed=0)
PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time"
STRIP = 2  # the strip's place in each endpoint's outputs


def make_checkpoint(folder: Path) -> Path:
    from gpt2viz import GPT2, GPT2Config, save_checkpoint
    from gpt2viz.model import init_weights

    if not (folder / "config.json").exists():
        save_checkpoint(init_weights(GPT2(GPT2Config(n_layer=12, n_head=12, n_embd=768, n_positions=1024))), folder)
    return folder


def process_tree(pid: int) -> list[int]:
    """The server and the processes under it (the engine's own process, gpt2viz/worker.py)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # it ended since the listing
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo.extend(children.get(tree[-1], []))
    return tree


def server_rss(pid: int) -> int:
    """Resident bytes of the server and its engine process together."""
    total = 0
    for each in process_tree(pid):
        try:
            lines = Path(f"/proc/{each}/status").read_text().splitlines()
        except OSError:
            continue
        total += sum(int(line.split()[1]) * 1024 for line in lines if line.startswith("VmRSS:"))
    return total


class Server:
    """`python app.py --model FOLDER` from a source tree (this one, or a worktree of an earlier commit)."""

    def __init__(self, tree: Path, checkpoint: Path, port: int, log: Path, env: dict[str, str] | None = None) -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1", **(env or {})}
        self.log = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, "app.py", "--model", str(checkpoint), "--port", str(port)],
                                     cwd=tree, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{port}/"
        deadline = time.time() + 300
        while True:
            try:
                urllib.request.urlopen(self.url, timeout=2)
                return
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"the app did not start; see {log}")
                time.sleep(0.5)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def student(url: str, model: str, n_tokens: int, n_steps: int, seed: int, start: threading.Event, out: dict,
            distinct: bool = False) -> None:
    from gradio_client import Client

    client = Client(url, verbose=False)
    args = dict(model=model, prompt=prompt_of(seed, distinct), **{**DEFAULTS, "seed": seed}, max_new_tokens=n_tokens)
    start.wait()
    t0 = time.perf_counter()
    times, last = [], None
    job = client.submit(**args, tokens_per_second=0, api_name="/generate")
    for output in job:
        strip = output[STRIP]
        if not isinstance(strip, dict) or not strip.get("tokens"):
            continue
        n = len(strip["tokens"])
        if last is None or n > last:
            times.append((time.perf_counter() - t0, n))
            last = n
    steps = []
    for _ in range(n_steps):
        s0 = time.perf_counter()
        client.predict(**args, api_name="/step")
        steps.append(time.perf_counter() - s0)
    out.update(times=times, steps=steps, status=str(job.outputs()[-1][1] if job.outputs() else ""))


def payloads(url: str, model: str, n_tokens: int) -> dict[str, tuple[int, list, int]]:
    """{api name: (fn_index, the request's data list, where the seed goes in it)} for /generate and /step,
    built once by gradio_client exactly as it would send them."""
    from gradio_client import Client, utils

    client = Client(url, verbose=False)
    out = {}
    for name, extra in (("/generate", {"tokens_per_second": 0}), ("/step", {})):
        fn = client._infer_fn_index(name, None)
        ep = client.endpoints[fn]
        a, b, c = (list(ep.insert_empty_state(*utils.construct_args(ep.parameters_info, (), {
            "model": model, "prompt": prompt, **DEFAULTS, "seed": seed, "max_new_tokens": n_tokens, **extra})))
            for seed, prompt in ((0, PROMPT), (1, PROMPT), (0, PROMPT + "!")))
        out[name] = (fn, a, next(i for i, (x, y) in enumerate(zip(a, b)) if x != y),
                     next(i for i, (x, y) in enumerate(zip(a, c)) if x != y))
    client.close()
    return out


def prompt_of(student: int, distinct: bool) -> str:
    """Everyone's text is the same example (a class told to pick one), or each student's own."""
    return f"{PROMPT} (student {student})" if distinct else PROMPT


async def sse_student(http, url: str, calls: dict, n_steps: int, seed: int, start, out: dict, distinct: bool = False) -> None:
    """A student speaking Gradio's queue protocol itself (join, then read the session's event stream): the
    same requests as gradio_client's, for a fraction of its CPU time. Each streamed message is one token."""
    from gradio_client.utils import apply_diff

    session = uuid.uuid4().hex

    async def event(name: str, on_message=None) -> None:
        fn, data, seed_at, prompt_at = calls[name]
        data = list(data)
        data[seed_at], data[prompt_at] = seed, prompt_of(seed, distinct)
        join = await http.post(url + "gradio_api/queue/join", json={"data": data, "fn_index": fn, "session_hash": session,
                                                                     "event_data": None, "trigger_id": None})
        event_id, outputs = join.json()["event_id"], None
        async with http.stream("GET", url + "gradio_api/queue/data", params={"session_hash": session}) as stream:
            async for line in stream.aiter_lines():
                if not line.startswith("data:"):
                    continue
                msg = json.loads(line[5:])
                if msg.get("event_id") != event_id:
                    continue
                if msg["msg"] == "process_generating" and on_message:
                    data = msg.get("output", {}).get("data", [])
                    outputs = data if outputs is None else [apply_diff(old, new) for old, new in zip(outputs, data)]
                    on_message(next((len(o["tokens"]) for o in outputs if isinstance(o, dict) and "tokens" in o), 0))
                if msg["msg"] == "process_completed":
                    if not msg.get("success", True):
                        raise RuntimeError(str(msg.get("output"))[:200])
                    return

    await start.wait()
    t0 = time.perf_counter()
    times: list = []

    def arrived(n: int) -> None:  # the strip's length: a message may bring several tokens
        if n and (not times or n > times[-1][1]):
            times.append((time.perf_counter() - t0, n))

    await event("/generate", arrived)
    steps = []
    for _ in range(n_steps):
        s0 = time.perf_counter()
        await event("/step")
        steps.append(time.perf_counter() - s0)
    out.update(times=times, steps=steps)


def sse_level(url: str, calls: dict, n_clients: int, n_steps: int, results: list, distinct: bool) -> None:
    import asyncio

    import httpx

    async def main() -> None:
        start = asyncio.Event()
        limits = httpx.Limits(max_connections=4 * n_clients + 10, max_keepalive_connections=2 * n_clients + 10)
        async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as http:
            tasks = [asyncio.create_task(sse_student(http, url, calls, n_steps, i, start, results[i], distinct)) for i in range(n_clients)]
            await asyncio.sleep(0.2)
            start.set()
            for task in tasks:
                try:
                    await task
                except Exception as e:  # noqa: BLE001 - a student that failed is counted as not finished
                    print(f"a student failed: {type(e).__name__}: {e}", flush=True)

    asyncio.run(main())


def cpu_seconds(pid: int) -> float:
    """CPU time of the server and its engine process together."""
    total = 0
    for each in process_tree(pid):
        try:
            fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / os.sysconf("SC_CLK_TCK")


def level(url: str, model: str, n_clients: int, n_tokens: int, n_steps: int, harness: str = "gradio_client",
          server_pid: int | None = None, distinct: bool = False) -> dict:
    results = [dict() for _ in range(n_clients)]
    if harness == "sse":
        calls = payloads(url, model, n_tokens)
        cpu0, t0 = time.process_time(), time.perf_counter()
        server0 = cpu_seconds(server_pid) if server_pid else 0.0
        sse_level(url, calls, n_clients, n_steps, results, distinct)
    else:
        start = threading.Event()
        threads = [threading.Thread(target=student, args=(url, model, n_tokens, n_steps, i, start, results[i], distinct))
                   for i in range(n_clients)]
        for t in threads:
            t.start()
        time.sleep(1.0 + 0.05 * n_clients)  # every client has fetched the app's config
        cpu0, t0 = time.process_time(), time.perf_counter()
        server0 = cpu_seconds(server_pid) if server_pid else 0.0
        start.set()
        for t in threads:
            t.join(timeout=1800)
    wall = time.perf_counter() - t0
    harness_cpu = (time.process_time() - cpu0) / wall  # cores the simulated class itself used
    server_cpu = (cpu_seconds(server_pid) - server0) / wall if server_pid else float("nan")
    ok = [r for r in results if r.get("times")]
    first = [r["times"][0][0] for r in ok]
    rates, generated = [], 0
    for r in ok:
        (t_first, n_first), (t_last, n_last) = r["times"][0], r["times"][-1]
        generated += n_last - n_first + 1
        if n_last > n_first:
            rates.append((n_last - n_first) / (t_last - t_first))
    gen_end = max(r["times"][-1][0] for r in ok) if ok else float("nan")
    steps = [s for r in ok for s in r["steps"]]
    return dict(clients=n_clients, finished=len(ok), wall_s=wall, harness=harness, distinct_prompts=distinct, harness_cores=harness_cpu,
                server_cores=server_cpu,
                ttft=pct(first), student_tps=pct(rates), min_student_tps=min(rates) if rates else float("nan"),
                aggregate_tps=generated / gen_end if ok else float("nan"), step_s=pct(steps))


def pct(xs: list[float]) -> dict:
    if not xs:
        return {}
    xs = sorted(xs)
    return dict(p50=statistics.median(xs), p95=xs[min(len(xs) - 1, round(0.95 * (len(xs) - 1)))], max=xs[-1])


def run_trees(runs: dict[str, tuple[Path, dict[str, str]]], checkpoint: Path, clients: list[int], n_tokens: int, n_steps: int,
              work: Path, harness: str = "gradio_client", distinct: bool = False, alone_runs: int = 5, quiet: float = 0.0) -> dict:
    """{name: (source tree, extra environment)}: every server started before the first level, then each level run on
    each of them in turn, the order alternating from level to level, so that the machine's drift during a run (it moved by 10-20%
    within minutes, bench/README.md) falls on all of them alike."""
    servers: dict[str, Server] = {}
    model = f"local: {checkpoint.name}"
    try:
        for i, (name, (tree, env)) in enumerate(runs.items()):
            servers[name] = Server(tree, checkpoint, 7901 + i, work / f"{name}.log", env)
        report = {}
        for name, server in servers.items():
            level(server.url, model, 1, 3, 0)  # warm up
            report[name] = dict(levels=[], rss_before=server_rss(server.proc.pid), env=runs[name][1])
        def on(name: str, n: int) -> dict:
            return level(servers[name].url, model, n, n_tokens, n_steps, harness, servers[name].proc.pid, distinct)

        for k, n in enumerate(clients):
            order = list(servers) if k % 2 == 0 else list(servers)[::-1]
            if n == 1:  # one 30-token text takes ~1.2 s and moves by ±10% from run to run: the median of several
                alone: dict[str, list] = {name: [] for name in servers}
                for _ in range(alone_runs):
                    for name in order:
                        alone[name].append(on(name, 1))
                for name in order:
                    report[name]["levels"].append({**sorted(alone[name], key=lambda lv: lv["aggregate_tps"])[len(alone[name]) // 2],
                                                   "alone_runs_tps": [lv["aggregate_tps"] for lv in alone[name]]})
            else:
                for name in order:
                    time.sleep(quiet)  # the server idle this long first (at least), as a class after a pause in the lesson
                    report[name]["levels"].append(on(name, n))
            for name in order:
                print(name, json.dumps(report[name]["levels"][-1]), flush=True)
        for name, server in servers.items():
            report[name]["rss_after"] = server_rss(server.proc.pid)
        return report
    finally:
        for server in servers.values():
            server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 5, 10, 20, 30, 60])
    parser.add_argument("--tokens", type=int, default=30)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--peer", help="also run the app at this git commit (a worktree), same checkpoint, same levels")
    parser.add_argument("--peer-env", nargs="+", default=[], metavar="NAME=VALUE",
                        help="the peer's server runs with these environment variables (without --peer: this tree again), "
                             "e.g. --peer-env GPT2VIZ_ENGINE_PROCESS=off for the engine in the web process against its own process")
    parser.add_argument("--json", type=Path, help="write the raw figures here")
    parser.add_argument("--harness", choices=["gradio_client", "sse"], default="gradio_client",
                        help="the students: gradio_client in a thread each, or one event loop speaking the queue protocol "
                             "(the same requests, a fraction of the CPU: on 2 cores the class otherwise takes a quarter of them)")
    parser.add_argument("--prompts", choices=["same", "distinct"], default="same",
                        help="every student on the same example text (as a class told to pick one), or each on its own")
    parser.add_argument("--alone-runs", type=int, default=5,
                        help="a level of one student is run this many times and its median run kept (the ratios' denominator)")
    parser.add_argument("--quiet", type=float, default=0.0,
                        help="seconds with no request before each level of more than one student: a class that starts after a "
                             "pause in the lesson (the server gives memory back after 10 s of quiet), not right after another")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gpt2viz-load-"))
    checkpoint = make_checkpoint(work / "gpt2-small-random")
    runs = {"this": (ROOT, {})}
    if args.peer:
        subprocess.run(["git", "worktree", "add", "--detach", str(work / "peer"), args.peer], cwd=ROOT, check=True, capture_output=True)
    if args.peer or args.peer_env:
        runs["peer"] = (work / "peer" if args.peer else ROOT, dict(item.split("=", 1) for item in args.peer_env))
    try:
        report = run_trees(runs, checkpoint, args.clients, args.tokens, args.steps, work, args.harness, args.prompts == "distinct",
                           args.alone_runs, args.quiet)
    finally:
        if args.peer:
            subprocess.run(["git", "worktree", "remove", "--force", str(work / "peer")], cwd=ROOT, capture_output=True)
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


def print_report(report: dict) -> None:
    for name, run in report.items():
        base = run["levels"][0] if run["levels"][0]["clients"] == 1 else None
        env = " ".join(f"{k}={v}" for k, v in run.get("env", {}).items())
        print(f"\n{name}{' (' + env + ')' if env else ''}: resident memory {run['rss_before'] / 2**30:.2f} GiB before, {run['rss_after'] / 2**30:.2f} GiB after")
        print("| students | finished | first token p50 / p95 / max (s) | tokens/s per student p50 (min) | all together tokens/s"
              + (" (× one alone)" if base else "") + " | Step p50 / p95 (s) | cores: server, students |")
        print("|---|---|---|---|---|---|---|")
        if base and len(base.get("alone_runs_tps", [])) > 1:
            print("one student alone, each run: " + ", ".join(f"{x:.1f}" for x in base["alone_runs_tps"]) + " tokens/s (the median is the row below)")
        for lv in run["levels"]:
            t, r, st = lv["ttft"], lv["student_tps"], lv["step_s"]
            ratio = f" (×{lv['aggregate_tps'] / base['aggregate_tps']:.1f})" if base else ""
            print(f"| {lv['clients']} | {lv['finished']} | {t.get('p50', 0):.2f} / {t.get('p95', 0):.2f} / {t.get('max', 0):.2f} "
                  f"| {r.get('p50', 0):.1f} ({lv['min_student_tps']:.1f}) | {lv['aggregate_tps']:.1f}{ratio} "
                  f"| {st.get('p50', 0):.2f} / {st.get('p95', 0):.2f} | {lv.get('server_cores', float('nan')):.2f}, "
                  f"{lv.get('harness_cores', float('nan')):.2f} |")


if __name__ == "__main__":
    main()
