"""An hour of a class's mixed traffic against the app, recording the server's memory and live sessions.

    python bench/soak.py                       # 3600 s, 40 users, gpt2-small-shaped checkpoint
    python bench/soak.py --seconds 600 --users 20 --csv /tmp/soak.csv

Each user (a gradio_client, its own browser session) loops over a random mix of what a student
does: a new prompt, Step, a short Generate, a click on a token and each tab, a sampling control,
Rewind, Reset, with think times between actions; every few minutes some users leave and new ones
come (new sessions). Every 10 s the server's resident memory and the session store's size (from
its log) are written to the CSV; at the end a summary (start, peak, end, growth per minute over
the second half). Not a test (it takes an hour): figures go to bench/README.md.
"""

from __future__ import annotations

import argparse
import csv
import random
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from load import DEFAULTS, Server, make_checkpoint, server_rss  # noqa: E402

PROMPTS = ["The quick brown fox", "Once upon a time there was", "In 1492, Columbus", "The capital of France is",
           "def fibonacci(n):", "Roses are red, violets are", "To be or not to be,", "The mitochondria is the"]
TABS = ["chosen", "attention", "overview", "lens", "embed"]


def user(url: str, model: str, seed: int, stop: threading.Event, counts: dict) -> None:
    from gradio_client import Client

    rnd = random.Random(seed)
    while not stop.is_set():
        client = Client(url, verbose=False)  # a new browser session
        prompt = rnd.choice(PROMPTS)
        settings = dict(DEFAULTS, seed=rnd.randrange(1000))
        for _ in range(rnd.randrange(20, 60)):
            if stop.is_set():
                return
            action = rnd.choices(["step", "generate", "inspect", "upcoming", "rewind", "reset", "prompt"],
                                 [30, 10, 35, 10, 5, 3, 7])[0]
            base = dict(model=model, prompt=prompt, **settings, max_new_tokens=rnd.randrange(5, 40))
            view = dict(position=rnd.randrange(5), layer=rnd.randrange(12), head=rnd.randrange(12), tab=rnd.choice(TABS))  # within any text
            try:
                if action == "step":
                    client.predict(**base, **view, api_name="/step")
                elif action == "generate":
                    list(client.submit(**base, **view, tokens_per_second=0, api_name="/generate"))
                elif action == "inspect":
                    client.predict(**settings, max_new_tokens=30, **view, api_name="/inspect")
                elif action == "upcoming":
                    client.predict(**{**settings, "temperature": rnd.choice([0.3, 0.7, 1.0, 1.5])}, max_new_tokens=30,
                                   api_name="/upcoming")
                elif action == "rewind":
                    client.predict(**base, keep=rnd.randrange(2), **view, api_name="/rewind")
                elif action == "reset":
                    client.predict(**base, **view, api_name="/reset")
                else:
                    prompt = rnd.choice(PROMPTS) + " " + str(rnd.randrange(100))
                counts["ok"] += 1
            except Exception:  # noqa: BLE001 - a refused request is counted, the soak goes on
                counts["refused"] += 1
            time.sleep(rnd.uniform(0.5, 4.0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=3600)
    parser.add_argument("--users", type=int, default=40)
    parser.add_argument("--csv", type=Path, default=Path(tempfile.gettempdir()) / "gpt2viz-soak.csv")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gpt2viz-soak-"))
    checkpoint = make_checkpoint(work / "gpt2-small-random")
    log = work / "server.log"
    server = Server(ROOT, checkpoint, 7911, log)
    stop, counts = threading.Event(), {"ok": 0, "refused": 0}
    threads = [threading.Thread(target=user, args=(server.url, f"local: {checkpoint.name}", i, stop, counts), daemon=True)
               for i in range(args.users)]
    rows = []
    started = time.monotonic()
    try:
        for t in threads:
            t.start()
            time.sleep(0.2)
        with open(args.csv, "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["seconds", "rss_mb", "sessions", "session_mb", "requests_ok", "refused"])
            while time.monotonic() - started < args.seconds:
                time.sleep(10)
                found = re.findall(r"sessions: (\d+) live, (\d+) MB", log.read_text())
                sessions, session_mb = found[-1] if found else ("", "")
                rows.append((time.monotonic() - started, server_rss(server.proc.pid) / 2**20, sessions, session_mb,
                             counts["ok"], counts["refused"]))
                out.writerow([f"{rows[-1][0]:.0f}", f"{rows[-1][1]:.0f}", *rows[-1][2:]])
                f.flush()
        stop.set()
        time.sleep(30)  # idle: what memory comes back
        idle_rss = server_rss(server.proc.pid) / 2**20
    finally:
        stop.set()
        server.close()
    half = [r for r in rows if r[0] >= rows[-1][0] / 2]
    slope = (half[-1][1] - half[0][1]) / max((half[-1][0] - half[0][0]) / 60, 1e-9) if len(half) > 1 else float("nan")
    print(f"{counts['ok']} requests ({counts['refused']} refused) in {rows[-1][0]:.0f} s by {args.users} users; "
          f"resident memory {rows[0][1]:.0f} MB at 10 s, peak {max(r[1] for r in rows):.0f} MB, {rows[-1][1]:.0f} MB at the end, "
          f"{idle_rss:.0f} MB after 30 s idle; {slope:+.1f} MB/min over the second half; sessions at the end: {rows[-1][2]}. "
          f"CSV: {args.csv}")


if __name__ == "__main__":
    main()
