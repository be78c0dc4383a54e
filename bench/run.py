"""gpt2viz against Hugging Face transformers, measured side by side in one run on random weights.

    python bench/run.py              # gpt2 and gpt2-medium shapes, 5 repeats (about 15 minutes on 2 cores)
    python bench/run.py --quick      # a smoke run on a tiny shape, one repeat (what CI runs)

Prints a table of medians and ratios; `--json FILE` also writes the raw figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gpt2viz import GenerationSession, GPT2, GPT2Config, SamplingConfig, load_tokenizer, save_checkpoint, trace  # noqa: E402
from gpt2viz.loading import to_hub_state_dict  # noqa: E402
from gpt2viz.model import init_weights  # noqa: E402

SHAPES = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, n_positions=1024),
}
QUICK_SHAPES = {"tiny": dict(n_layer=2, n_head=4, n_embd=64, n_positions=1024)}
PROMPT = "The quick brown fox jumps over the lazy"
# "app capture": what the app keeps at every step (residual stream of every layer and the embeddings
# for every position, each token's log-probability, the top-N candidates at every sampling stage);
# attention rows and the logit lens are recomputed exactly from it when a view shows them.
# "eager attention + logit lens": GenerationSession without recording, whose every step also carries
# its attention row (every layer and head) and the logit lens of every layer, computed at once.
DECODE_CONTENDERS = ("gpt2viz, no capture", "gpt2viz, app capture", "gpt2viz, eager attention + logit lens every step",
                     "transformers generate", "transformers + attentions + hidden states")
PREFILL_CONTENDERS = ("gpt2viz, no capture", "gpt2viz, app capture", "gpt2viz trace (with logit lens at every position)",
                      "transformers eager + attentions")


class PeakRSS:
    """Peak resident memory above the starting point, sampled from /proc while a block runs."""

    def __enter__(self):
        self.base = self.peak = rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())

    @property
    def mib(self) -> float:
        return (self.peak - self.base) / 2**20


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def timed(fn, repeats: int) -> float:
    """Median seconds over `repeats` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build(shape: dict):
    import transformers

    cfg = GPT2Config(**shape)
    ours = init_weights(GPT2(cfg), seed=0).eval()
    hf_cfg = transformers.GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.n_positions, n_embd=cfg.n_embd,
                                     n_layer=cfg.n_layer, n_head=cfg.n_head)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    missing, unexpected = hf.load_state_dict(to_hub_state_dict(ours), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    hf.tie_weights()
    hf.set_attn_implementation("sdpa")
    return ours, hf


def decode_contenders(ours, hf, tok, n_new: int) -> dict:
    """name -> a function that decodes `n_new` tokens greedily after PROMPT."""
    prompt = tok.encode(PROMPT)
    x = torch.tensor([prompt])
    mask = torch.ones_like(x)

    @torch.no_grad()
    def ours_plain():
        kv = ours.new_kv_cache()
        logits = ours(x, kv_cache=kv, last_only=True)
        for _ in range(n_new - 1):
            logits = ours(logits[:, -1].argmax(-1, keepdim=True), kv_cache=kv, last_only=True)

    def ours_capture(record: bool):
        cfg = SamplingConfig(temperature=0, max_new_tokens=n_new, stop_at_eos=False)
        session = GenerationSession(ours, tok, prompt, cfg, record=record)
        steps = list(session.run())
        assert len(steps) == n_new and (steps[-1].lens_ids is None) == record

    @torch.no_grad()
    def hf_plain():
        hf.set_attn_implementation("sdpa")
        out = hf.generate(x, attention_mask=mask, do_sample=False, max_new_tokens=n_new, min_new_tokens=n_new, pad_token_id=50256)
        assert out.shape[1] == len(prompt) + n_new

    @torch.no_grad()
    def hf_capture():
        hf.set_attn_implementation("eager")
        hf.generate(x, attention_mask=mask, do_sample=False, max_new_tokens=n_new, min_new_tokens=n_new, pad_token_id=50256,
                    output_attentions=True, output_hidden_states=True, return_dict_in_generate=True)
        hf.set_attn_implementation("sdpa")

    return dict(zip(DECODE_CONTENDERS, (ours_plain, lambda: ours_capture(True), lambda: ours_capture(False), hf_plain, hf_capture)))


def prefill_contenders(ours, hf, tok, T: int) -> dict:
    """name -> a function that reads T random tokens."""
    ids = torch.randint(0, 50257, (1, T), generator=torch.Generator().manual_seed(T))
    id_list = ids[0].tolist()

    @torch.no_grad()
    def ours_plain():
        ours(ids)

    def ours_capture():
        session = GenerationSession(ours, tok, id_list[:-1] if T == ours.cfg.n_positions else id_list, SamplingConfig(), record=True)
        session.peek()

    def ours_trace():
        trace(ours, tok, id_list)

    @torch.no_grad()
    def hf_eager_attn():
        hf.set_attn_implementation("eager")
        hf(ids, output_attentions=True)
        hf.set_attn_implementation("sdpa")

    return dict(zip(PREFILL_CONTENDERS, (ours_plain, ours_capture, ours_trace, hf_eager_attn)))


def decode_benchmarks(ours, hf, tok, n_new: int, repeats: int) -> dict:
    return {name: {"tokens_per_s": n_new / timed(fn, repeats)}
            for name, fn in decode_contenders(ours, hf, tok, n_new).items()}


def prefill_benchmarks(shape_name: str, quick: bool, lengths: list[int], repeats: int) -> dict:
    """Median seconds of every prefill contender at every length, each contender in its own fresh
    process: in one long-lived process a pass that allocates hundreds of MB (transformers' attention
    tensors) takes a time that depends on what ran before it (1.3 to 1.9 s over five runs)."""
    by_name = {name: in_fresh_process({"shape": shape_name, "quick": quick, "measure": "prefill seconds",
                                       "lengths": lengths, "repeats": repeats, "name": name})
               for name in PREFILL_CONTENDERS}
    return {T: {name: {"seconds": by_name[name][str(T)]} for name in PREFILL_CONTENDERS} for T in lengths}


def view_recompute(ours, tok, T: int, repeats: int, window: int = 64, lens_window: int = 16) -> dict:
    """After an app-capture prefill of T tokens: seconds to recompute what the views show for the last
    position: its attention row in every layer and one layer's window of rows (from the cached keys),
    and the logit lens of every layer for it alone and for a window of positions (from the residual stream)."""
    ids = torch.randint(0, 50257, (T,), generator=torch.Generator().manual_seed(T)).tolist()[: min(T, ours.cfg.n_positions - 1)]
    session = GenerationSession(ours, tok, ids, SamplingConfig(), record=True)
    session.peek()
    n = len(session.records)

    def fresh_lens(start, end):  # as read the first time (the session keeps each position's lens once read)
        session.records.lens.clear()
        return session.logit_lens(start, end)

    return {"row_all_layers_s": timed(lambda: session.attention_row(n - 1), repeats),
            f"window_{window}_one_layer_s": timed(lambda: session.attention_pattern(0, max(0, n - window), n), repeats),
            "lens_one_position_s": timed(lambda: fresh_lens(n - 1, n), repeats),
            f"lens_window_{lens_window}_s": timed(lambda: fresh_lens(max(0, n - lens_window), n), repeats)}


def in_fresh_process(spec: dict):
    """Run `probe(spec)` in a new Python process and return what it prints (JSON)."""
    out = subprocess.run([sys.executable, __file__, "--probe", json.dumps(spec)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def probe(spec: str) -> None:
    """Child side of `in_fresh_process`: build the models, then either run one contender once and print
    the peak resident memory it adds (MiB), or time one prefill contender at each length (seconds)."""
    import gc

    s = json.loads(spec)
    ours, hf = build((QUICK_SHAPES if s["quick"] else SHAPES)[s["shape"]])
    tok = load_tokenizer()
    if s["measure"] == "prefill seconds":
        print(json.dumps({T: timed(prefill_contenders(ours, hf, tok, T)[s["name"]], s["repeats"]) for T in s["lengths"]}))
        return
    contenders = (decode_contenders if s["kind"] == "decode" else prefill_contenders)(ours, hf, tok, s["arg"])
    gc.collect()
    try:  # hand freed heap back to the OS, so that reused free lists do not hide what the contender allocates
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with PeakRSS() as mem:
        contenders[s["name"]]()
    print(json.dumps(round(mem.mib, 1)))


def memory_benchmarks(shape_name: str, quick: bool, n_new: int, T: int) -> dict:
    """Peak extra MiB of every decode contender and every prefill contender at T tokens, each in its own
    process so that no earlier run's allocations hide it."""
    def peak(kind: str, arg: int, name: str) -> float:
        return in_fresh_process({"shape": shape_name, "quick": quick, "measure": "peak MiB", "kind": kind, "arg": arg, "name": name})

    return {"decode": {n: peak("decode", n_new, n) for n in DECODE_CONTENDERS},
            f"prefill {T}": {n: peak("prefill", T, n) for n in PREFILL_CONTENDERS}}


def trace_size(ours, tok, T: int) -> float:
    ids = torch.randint(0, 50257, (T,), generator=torch.Generator().manual_seed(1)).tolist()
    return trace(ours, tok, ids).nbytes / 2**20


def app_path(shape: dict, n_prompt_tokens: int, n_steps: int, root: Path = ROOT, legacy: bool = False) -> dict:
    """Launch the app (in `root`) on a random checkpoint of this shape; time to first token, bytes per streamed
    step, and the page's latencies in chromium. `legacy`: the page before the Controller (the peer)."""
    import httpx

    from tests.conftest import free_port

    tok = load_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        model = init_weights(GPT2(GPT2Config(**shape)), seed=0)
        save_checkpoint(model, tmp)
        del model
        port = free_port()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
        proc = subprocess.Popen([sys.executable, str(root / "app.py"), "--model", tmp, "--port", str(port)], env=env,
                                cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 180
            while True:
                try:
                    config = httpx.get(f"{base}/config", timeout=2).json()
                    break
                except (httpx.HTTPError, ValueError):
                    if time.time() > deadline or proc.poll() is not None:
                        raise RuntimeError("app did not start")
                    time.sleep(0.5)
            fn_index = next(i for i, d in enumerate(config["dependencies"]) if d.get("api_name") == "generate")
            model_name = next(c for c in config["components"] if c.get("props", {}).get("elem_id") == "model")["props"]["value"]
            words = ("the cat sat on a mat and " * 200).split()
            prompt = tok.decode(tok.encode(" ".join(words))[:n_prompt_tokens])
            # state, model, prompt, tokens/s (0: as fast as it goes), the six settings, then the view:
            # position, layer, head, tab, per-head scale, compact, lens mode, strip colour (the page at 0b7dc77 and
            # before: no lens mode; before 6cbf4c4: no strip colour)
            data = [None, model_name, prompt, 0, 1.0, 0, 1.0, 1.0, n_steps, 0, 0, 0, 0, "chosen", False, False]
            for elem_id, value in (("lens_mode", "top"), ("strip_colour", "prob")):
                if any(c.get("props", {}).get("elem_id") == elem_id for c in config["components"]):
                    data.append(value)
            if legacy:  # state, model, prompt, then the six settings
                data = [None, model_name, prompt, 1.0, 0, 1.0, 1.0, n_steps, 0]
            session = "bench" + str(port)
            with httpx.Client(timeout=120) as client:
                start = time.perf_counter()
                client.post(f"{base}/gradio_api/queue/join", json={"data": data, "fn_index": fn_index, "session_hash": session,
                                                                  "event_data": None, "trigger_id": None}).raise_for_status()
                sizes, first = [], None
                with client.stream("GET", f"{base}/gradio_api/queue/data", params={"session_hash": session}) as stream:
                    for line in stream.iter_lines():
                        if not line.startswith("data:"):
                            continue
                        msg = json.loads(line[5:])
                        if msg.get("msg") == "process_generating":
                            if first is None:
                                first = time.perf_counter() - start
                            sizes.append(len(line.encode()))
                        if msg.get("msg") == "process_completed":
                            break
            result = {"first_token_s": first, "bytes_per_step_median": statistics.median(sizes), "bytes_per_step_max": max(sizes),
                      "steps": len(sizes), "prompt_tokens": n_prompt_tokens}
            result.update((legacy_view_latency if legacy else browser_view_latency)(base + "/", prompt))
            return result
        finally:
            proc.terminate()
            proc.wait(timeout=20)


TITLE_JS = "((document.querySelector('#{} .gtitle') || {{}}).textContent || '')"  # a figure's title, by element id


@contextlib.contextmanager
def chromium_page(url: str, prompt: str):
    """Debian's chromium at 1440x900 on the page at `url`, with `prompt` typed in."""
    from playwright.sync_api import sync_playwright

    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=args)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 900})
            page.goto(url)
            page.wait_for_selector("#generate")
            page.locator("#prompt textarea").fill(prompt)
            yield page
        finally:
            browser.close()


def browser_view_latency(url: str, prompt: str, repeats: int = 3) -> dict:
    """In Debian's chromium, medians over `repeats`: from pressing Step until every visible view shows
    the new token (its strip box selected, "How token N was chosen", "Upcoming: token N + 1"); from a
    click on a token until its view is drawn; from moving the temperature until the upcoming
    distribution is redrawn for it."""
    steps, clicks, temps = [], [], []
    title = TITLE_JS
    subtitle = "((document.querySelector('#upcoming_plot .gtitle-subtitle') || {}).textContent || '')"
    with chromium_page(url, prompt) as page:
        for i in range(repeats + 1):
            n = page.locator("#strip .tok").count()
            start = time.perf_counter()
            page.click("#step")
            new = n + 1 if n else len(load_tokenizer().encode(prompt)) + 1
            page.wait_for_function(
                f"() => document.querySelectorAll('#strip .tok').length === {new} && "
                f"{title.format('chosen_plot')}.startsWith('How token {new - 1} ') && "
                f"{title.format('upcoming_plot')}.startsWith('Upcoming: token {new}')", timeout=120_000)
            steps.append(time.perf_counter() - start)
        for i in range(repeats + 1):
            k = 3 + i
            start = time.perf_counter()
            page.locator("#strip .tok").nth(k).click()
            page.wait_for_function(f"() => {title.format('chosen_plot')}.includes('token {k} ')", timeout=120_000)
            clicks.append(time.perf_counter() - start)
        for i in range(repeats + 1):
            t = ("0.5", "1.5", "0.7", "1.3", "0.9")[i % 5]
            box = page.locator("#temperature input[type=number]")
            box.fill(t)
            start = time.perf_counter()
            box.press("Enter")
            page.wait_for_function(f"() => {subtitle}.includes('temperature {t},')", timeout=120_000)
            temps.append(time.perf_counter() - start)
        page.get_by_role("tab", name="Attention", exact=True).click()
        attention = []
        for i in range(repeats + 1):
            n = page.locator("#strip .tok").count()
            start = time.perf_counter()
            page.click("#step")
            page.wait_for_function(
                f"() => document.querySelectorAll('#strip .tok').length === {n + 1} && "
                f"{title.format('row_plot')}.startsWith('What token {n} ') && "
                f"{title.format('upcoming_plot')}.startsWith('Upcoming: token {n + 1}')", timeout=120_000)
            attention.append(time.perf_counter() - start)
    return {"step_to_views_s": statistics.median(steps[1:]), "click_to_views_s": statistics.median(clicks[1:]),
            "temperature_to_upcoming_s": statistics.median(temps[1:]), "step_to_attention_views_s": statistics.median(attention[1:])}


def legacy_view_latency(url: str, prompt: str, repeats: int = 3) -> dict:
    """The same measurements on the page before the Controller (its DOM and its second round trip):
    Step until the new token's chart shows it and the second event (the picker, the sliders and the views)
    has set the selected position to it, on its default tab; with the Attention tab open, until its attention
    row shows the new token; a click on a token until its attention row is drawn."""
    title = TITLE_JS
    out = {}
    with chromium_page(url, prompt) as page:
        for key in ("step_to_views_s", "step_to_attention_views_s"):
            if key == "step_to_attention_views_s":
                page.get_by_role("tab", name="Attention").click()
            times = []
            for i in range(repeats + 1):
                n = page.locator("#strip span.token").count()
                new = n + 1 if n else len(load_tokenizer().encode(prompt)) + 1
                start = time.perf_counter()
                page.click("#step")
                settled = (f"{title.format('row_plot')}.startsWith('What token {new - 1} ')" if key == "step_to_attention_views_s"
                           else f"(document.querySelector('#position input[type=number]') || {{}}).value === '{new - 1}'")
                page.wait_for_function(
                    f"() => document.querySelectorAll('#strip span.token').length === {new} && "
                    f"{title.format('next_plot')}.startsWith('How token {new - 1} ') && {settled}", timeout=120_000)
                times.append(time.perf_counter() - start)
            out[key] = statistics.median(times[1:])
        clicks = []
        for i in range(repeats + 1):
            k = 3 + i
            start = time.perf_counter()
            page.locator("#strip span.token").nth(k).click()
            page.wait_for_function(f"() => {title.format('row_plot')}.startsWith('What token {k} ')", timeout=120_000)
            clicks.append(time.perf_counter() - start)
        out["click_to_views_s"] = statistics.median(clicks[1:])
    return out


def page_benchmark(peer: str, json_path: Path | None) -> None:
    """The page now and at git revision `peer` (a worktree), one after the other in one run."""
    results = {"date": time.strftime("%Y-%m-%d"), "peer": peer}
    results["page"] = app_path(SHAPES["gpt2"], 128, 20)
    with tempfile.TemporaryDirectory() as tmp:
        worktree = Path(tmp) / "peer"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(worktree), peer], check=True,
                       capture_output=True)
        try:
            results["peer_page"] = app_path(SHAPES["gpt2"], 128, 20, root=worktree, legacy=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)], capture_output=True)
    for name in ("page", "peer_page"):
        print(name, json.dumps(results[name]))
    new, old = results["page"], results["peer_page"]
    for key in ("step_to_views_s", "step_to_attention_views_s", "click_to_views_s", "bytes_per_step_median"):
        print(f"{key}: {new[key]:.3f} now, {old[key]:.3f} at {peer}, ratio {new[key] / old[key]:.2f}")
    if json_path:
        json_path.write_text(json.dumps(results, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shape, one repeat: a smoke run")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--skip-app", action="store_true")
    ap.add_argument("--page", action="store_true", help="only the page: the app on a gpt2-shaped checkpoint, 128-token text, "
                                                         "beside the page at --peer")
    ap.add_argument("--peer", default="6671db6", help="git revision of the page to compare with (before the Controller)")
    ap.add_argument("--probe", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.probe:
        return probe(args.probe)
    if args.page:
        return page_benchmark(args.peer, args.json)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    repeats = 1 if args.quick else args.repeats
    n_new = 8 if args.quick else args.new_tokens
    lengths = [32, 128] if args.quick else [128, 512, 1024]
    tok = load_tokenizer()
    torch.manual_seed(0)
    import transformers

    results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
               "torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
               "date": time.strftime("%Y-%m-%d"), "repeats": repeats, "shapes": {}}
    for name, shape in shapes.items():
        ours, hf = build(shape)
        r = results["shapes"][name] = {}
        r["decode"] = decode_benchmarks(ours, hf, tok, n_new, repeats)
        r["prefill"] = prefill_benchmarks(name, args.quick, lengths, repeats)
        r["trace_mib"] = {T: trace_size(ours, tok, T) for T in lengths[-1:]}
        r["view_recompute"] = view_recompute(ours, tok, lengths[-1], repeats)
        del ours, hf
        r["memory_mib"] = memory_benchmarks(name, args.quick, n_new, lengths[-1])
        if not args.skip_app:
            r["app"] = app_path(shape, 120 if not args.quick else 20, 10 if not args.quick else 3)
        print_shape(name, r)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"\n{results['machine']}; torch {results['torch']}, transformers {results['transformers']}, "
          f"{results['threads']} threads, {results['date']}, median of {repeats}")


def print_shape(name: str, r: dict) -> None:
    d = r["decode"]
    ref = d["transformers generate"]["tokens_per_s"]
    print(f"\n## {name}: decode after a {len(PROMPT.split())}-word prompt")
    mem = r["memory_mib"]["decode"]
    print("| | tokens/s | × transformers generate | peak extra MiB (own process) |\n|---|---:|---:|---:|")
    for k, v in d.items():
        print(f"| {k} | {v['tokens_per_s']:.1f} | {v['tokens_per_s'] / ref:.2f} | {mem[k]:.0f} |")
    print(f"\n## {name}: prefill latency (s), each contender timed in its own process")
    cols = list(next(iter(r["prefill"].values())))
    print("| tokens | " + " | ".join(cols) + " | app capture ÷ transformers eager+attn |")
    print("|---:|" + "---:|" * (len(cols) + 1))
    for T, row in r["prefill"].items():
        ratio = row["gpt2viz, app capture"]["seconds"] / row["transformers eager + attentions"]["seconds"]
        print(f"| {T} | " + " | ".join(f"{row[c]['seconds']:.3f}" for c in cols) + f" | {ratio:.2f} |")
    for kind, row in r["memory_mib"].items():
        if kind != "decode":
            print(f"\npeak extra MiB, {kind} tokens, each in its own process: "
                  + ", ".join(f"{k} {v:.0f}" for k, v in row.items()))
    v = r["view_recompute"]
    print("\nrecomputing views (attention from the cache, lens from the residual stream) after the longest prefill: "
          + ", ".join(f"{k} {val * 1000:.1f} ms" for k, val in v.items()))
    for T, mib in r["trace_mib"].items():
        print(f"\nfull trace of {T} tokens: {mib:.1f} MiB")
    if "app" in r:
        a = r["app"]
        print(f"app: first streamed token after {a['first_token_s']:.2f} s; per step {a['bytes_per_step_median'] / 1024:.1f} KiB "
              f"median, {a['bytes_per_step_max'] / 1024:.1f} KiB max ({a['prompt_tokens']}-token prompt, {a['steps']} steps); "
              f"in chromium, Step to every view redrawn {a['step_to_views_s']:.2f} s, a click on a token {a['click_to_views_s']:.2f} s, "
              f"temperature to the upcoming token {a['temperature_to_upcoming_s']:.2f} s")


if __name__ == "__main__":
    main()
