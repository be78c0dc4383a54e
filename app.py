"""gpt2viz: watch GPT-2 write, one token at a time. Layout and wiring only; the work is in gpt2viz.controller.

    python app.py                          # gpt2 from the Hub, or the bundled model offline
    python app.py --model tiny-shakespeare # or GPT2VIZ_MODEL=distilgpt2, or a local folder
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import gradio as gr

from gpt2viz import controller as c
from gpt2viz.model import ContextLengthError

log = logging.getLogger("gpt2viz")

INTRO = """# gpt2viz — watch GPT-2 write, one token at a time
Type a prompt, then press **Step** to add one token or **Generate** to stream many. Every token is chosen
from a probability distribution that you can see and change. Click any token to look inside the model
at that point: where it looks (**attention**), what it is thinking layer by layer (**logit lens**), and
how the token's vector moves through the network (**embeddings**). Every number comes from the real model."""

TEXT_NEXT = """**What you see:** the model's top guesses for the next token. Grey bars are the model's own
probabilities; blue bars are what is left after your settings (temperature, top-k, top-p, repetition
penalty). The token drawn is marked ▶. *Temperature* below 1 makes likely tokens likelier; above 1
flattens the choice. *Top-k* keeps only the k likeliest tokens, *top-p* the likeliest ones until their
total reaches p. Pick a candidate or type your own token to steer the text."""

TEXT_ATTENTION = """**What you see:** *attention* is how each token gathers information from the tokens before it.
Each row is a token reading; each column a token being read; darker means more attention. A model
has several layers, each with several *heads* that look for different things: some look at the
previous token, some at the first token, some at an earlier copy of the current word (*induction heads*).
A token can never look at tokens after it, so the top-right half is empty."""

TEXT_LENS = """**What you see:** the *logit lens* asks every layer "if you had to guess the next token now, what
would it be?". Each column is a position in the text; each row a layer, from the embeddings (bottom of
the network) to the last block (the real prediction). Watch the guess sharpen, and find the layer
where the right answer first appears."""

TEXT_EMBED = """**What you see:** each token enters the model as a list of numbers (a vector): its *token
embedding* plus a *position embedding* that says where it sits. Every block then adds to this vector,
the *residual stream*. The line shows how long the vector is after each block, and the map squashes the
vector's path through the layers onto two dimensions (PCA), labelled with the token it is closest to."""

# Static slider ranges that fit every GPT-2 size; the page narrows them to the current text and model,
# and the handlers check values sent straight to the API against the real ranges.
MAX_POSITIONS, MAX_LAYERS, MAX_HEADS = 1023, 47, 24

CSS = """
#strip .token { border: 1px solid #8a949e; border-radius: 4px; margin: 1px; cursor: pointer; }
.explain { font-size: 0.95rem; }
"""


def build(models: c.Models, sessions: c.Sessions) -> gr.Blocks:
    with gr.Blocks(title="gpt2viz") as demo:
        state = gr.State(c.new_state(models.default), time_to_live=6 * 3600,
                         delete_callback=lambda s: sessions.drop((s or {}).get("key")))
        gr.Markdown(INTRO)
        gr.Markdown(models.notice, visible=bool(models.notice), elem_id="notice")
        with gr.Row():
            with gr.Column(scale=1, min_width=320):
                model_name = gr.Dropdown(models.names(), value=models.default, label="Model", elem_id="model")
                example = gr.Dropdown(list(c.EXAMPLES), value=None, label="Example prompts", elem_id="example")
                example_text = gr.Markdown(elem_classes="explain")
                prompt = gr.Textbox(label="Prompt", lines=3, max_lines=12, elem_id="prompt",
                                    value=c.EXAMPLES["Factual recall"][0] if models.default != c.OFFLINE_MODEL
                                    else c.EXAMPLES["Shakespeare"][0])
                with gr.Row():
                    generate_btn = gr.Button("Generate", variant="primary", elem_id="generate")
                    step_btn = gr.Button("Step", elem_id="step")
                    stop_btn = gr.Button("Stop", variant="stop", elem_id="stop")
                    reset_btn = gr.Button("Reset", elem_id="reset")
                status = gr.Markdown(elem_id="status")
                with gr.Accordion("Sampling controls", open=True):
                    temperature = gr.Slider(0, 2, value=1.0, step=0.05, label="Temperature (0 = always the likeliest)", elem_id="temperature")
                    top_k = gr.Slider(0, 200, value=0, step=1, label="Top-k (0 = off)", elem_id="top_k")
                    top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.01, label="Top-p (1 = off)", elem_id="top_p")
                    penalty = gr.Slider(1.0, 2.0, value=1.0, step=0.05, label="Repetition penalty (1 = off)", elem_id="penalty")
                    max_new = gr.Slider(1, 200, value=30, step=1, label="Max new tokens", elem_id="max_new")
                    seed = gr.Number(value=0, precision=0, minimum=0, label="Seed (same seed, same text)", elem_id="seed")
                with gr.Accordion("Choose the next token yourself", open=True):
                    pick = gr.Dropdown(choices=[], label="The model's candidates for the next token", elem_id="pick",
                                       allow_custom_value=True)
                    pick_btn = gr.Button("Use this token", elem_id="pick_btn")
                    typed = gr.Textbox(label="...or type a token (e.g. ' Paris' with its space, or #464 for an id)", elem_id="typed")
                    typed_btn = gr.Button("Use typed token", elem_id="typed_btn")
                with gr.Accordion("Rewind", open=False):
                    rewind_to = gr.Slider(0, MAX_POSITIONS, value=0, step=1, label="Keep this many generated tokens", elem_id="rewind_to")
                    rewind_btn = gr.Button("Rewind", elem_id="rewind_btn")
            with gr.Column(scale=2):
                strip = gr.HighlightedText(label="Tokens, coloured by how likely the model found each one given the text before it (click a token to inspect it)",
                                           color_map=c.STRIP_COLORS, show_legend=True, show_inline_category=False,
                                           elem_id="strip", interactive=False)
                position = gr.Slider(0, MAX_POSITIONS, value=0, step=1, label="Selected token", elem_id="position")
                with gr.Tabs():
                    with gr.Tab("Next token", elem_id="tab-next"):
                        gr.Markdown(TEXT_NEXT, elem_classes="explain")
                        next_plot = gr.Plot(elem_id="next_plot", show_label=False)
                    with gr.Tab("Attention", elem_id="tab-attention"):
                        gr.Markdown(TEXT_ATTENTION, elem_classes="explain")
                        with gr.Row():
                            layer = gr.Slider(0, MAX_LAYERS, value=0, step=1, label="Layer", elem_id="layer")
                            head = gr.Slider(0, MAX_HEADS, value=0, step=1, label="Head", elem_id="head")
                        attn_plot = gr.Plot(elem_id="attn_plot", show_label=False)
                        row_plot = gr.Plot(elem_id="row_plot", show_label=False)
                        grid_plot = gr.Plot(elem_id="grid_plot", show_label=False)
                    with gr.Tab("Logit lens", elem_id="tab-lens"):
                        gr.Markdown(TEXT_LENS, elem_classes="explain")
                        lens_plot = gr.Plot(elem_id="lens_plot", show_label=False)
                    with gr.Tab("Embeddings", elem_id="tab-embed"):
                        gr.Markdown(TEXT_EMBED, elem_classes="explain")
                        emb_plot = gr.Plot(elem_id="emb_plot", show_label=False)
                        norm_plot = gr.Plot(elem_id="norm_plot", show_label=False)
                        traj_plot = gr.Plot(elem_id="traj_plot", show_label=False)

        controls = [temperature, top_k, top_p, penalty, max_new, seed]
        views = [attn_plot, row_plot, grid_plot, lens_plot, emb_plot, norm_plot, traj_plot]
        live = [state, strip, next_plot, status]
        settle = live + [pick, position, rewind_to, layer, head] + views

        # --- handlers: thin wrappers that turn every failure into a message ---------------------

        def refuse(message: str) -> str:
            gr.Warning(message)
            return f"⚠️ {message}"

        def entry_for(st, name, text, ctrl):
            """The user's session: continue it, or start anew from the prompt if the prompt or model changed."""
            config = c.sampling_config(*ctrl)
            ids = c.check_prompt(models, name, text)
            st = dict(st or c.new_state(name))
            if st.get("ids") and st.get("model") == name and st["ids"][: st["prompt_len"]] == ids:
                entry = sessions.get(st, config)
                return st, entry
            sessions.drop(st.get("key"))
            key, entry = sessions.create(name, ids, config)
            return c.sync_state(st, entry, key), entry

        def live_outputs(st, entry, message=""):
            s = entry.session
            last = s.steps[-1] if s.steps else None
            summary = message or c.step_summary(last, models.tokenizer)
            return st, c.token_strip(s), c.next_token_view(last), summary

        def on_generate(st, name, text, *ctrl):
            try:
                st, entry = entry_for(st, name, text, ctrl)
            except (c.UserError, ContextLengthError, ValueError) as e:
                yield st, gr.skip(), gr.skip(), refuse(str(e))
                return
            except Exception as e:  # noqa: BLE001 - never a traceback in the page
                log.exception("generate failed")
                yield st, gr.skip(), gr.skip(), refuse(f"Something went wrong ({type(e).__name__}); please try again.")
                return
            if entry.generating:
                yield st, gr.skip(), gr.skip(), refuse("Already generating: press Stop first.")
                return
            run = entry.generating = object()
            s = entry.session
            try:
                budget = s.config.max_new_tokens
                if s.room_left <= 0:
                    yield st, gr.skip(), gr.skip(), refuse("The text fills the model's context: rewind or reset to continue.")
                    return
                for n in range(budget):
                    if entry.generating is not run or not entry.lock.acquire(timeout=10):
                        return  # stopped
                    try:
                        step = s.step()
                    finally:
                        entry.lock.release()
                    done = step.finish_reason is not None or n == budget - 1
                    message = f"Stopped: {step.message}." if step.message else ""
                    yield live_outputs(c.sync_state(st, entry), entry, message)
                    if done:
                        return
            except Exception as e:  # noqa: BLE001
                log.exception("generation failed")
                yield c.sync_state(st, entry), gr.skip(), gr.skip(), refuse(f"Generation stopped: {e}")
            finally:
                if entry.generating is run:
                    entry.generating = None

        def with_entry(action):
            """Run `action(st, entry) -> message` under the session lock, then return the live outputs."""
            def handler(st, name, text, *ctrl):
                try:
                    st, entry = entry_for(st, name, text, ctrl)
                    if entry.generating or not entry.lock.acquire(timeout=5):
                        return st, gr.skip(), gr.skip(), refuse("Busy generating: press Stop first.")
                    try:
                        message = action(st, entry)
                    finally:
                        entry.lock.release()
                    return live_outputs(c.sync_state(st, entry), entry, message or "")
                except (c.UserError, ContextLengthError, ValueError) as e:
                    return st, gr.skip(), gr.skip(), refuse(str(e))
                except Exception as e:  # noqa: BLE001
                    log.exception("action failed")
                    return st, gr.skip(), gr.skip(), refuse(f"Something went wrong ({type(e).__name__}); please try again.")
            return handler

        def do_step(st, entry):
            entry.session.step()

        def do_reset(st, entry):
            entry.session.rewind(0)
            return "Back to the prompt."

        def force_handler(get_token):
            def action(st, entry):
                entry.session.step(force=get_token(entry))
            return action

        def on_settle(st, lay, hd, *ctrl):
            """After a change: the candidate picker, the sliders and every view, for the newest token."""
            try:
                entry = sessions.get(st, c.sampling_config(*ctrl)) if (st or {}).get("ids") else None
            except (c.UserError, ValueError) as e:
                return [st, gr.skip(), gr.skip(), refuse(str(e))] + [gr.skip()] * (len(settle) - 4)
            if entry is None:
                return [st, gr.skip(), gr.skip(), gr.skip()] + [gr.skip()] * (len(settle) - 4)
            if not entry.lock.acquire(timeout=10):
                return [st, gr.skip(), gr.skip(), refuse("Busy: try again in a moment.")] + [gr.skip()] * (len(settle) - 4)
            try:
                s = entry.session
                choices = c.candidate_choices(s) if s.room_left > 0 else []
                n = len(s.records)
                cfg = s.model.cfg
                p = n - 1  # after a change, show the newest token
                lay, hd = min(int(lay or 0), cfg.n_layer - 1), min(int(hd or 0), cfg.n_head - 1)
                figs = view_figures(entry, p, lay, hd)
            except Exception as e:  # noqa: BLE001
                log.exception("settle failed")
                return [st, gr.skip(), gr.skip(), refuse(f"Could not update the views ({type(e).__name__}).")] + [gr.skip()] * (len(settle) - 4)
            finally:
                entry.lock.release()
            return [c.sync_state(st, entry), c.token_strip(s), c.next_token_view(s.steps[-1] if s.steps else None), gr.skip(),
                    gr.update(choices=choices, value=choices[0][1] if choices else None),
                    gr.update(maximum=max(n - 1, 1), value=p, interactive=n > 1),
                    gr.update(maximum=max(len(s.steps), 1), value=len(s.steps), interactive=bool(s.steps)),
                    gr.update(maximum=cfg.n_layer - 1, value=lay), gr.update(maximum=cfg.n_head - 1, value=hd)] + list(figs)

        def view_figures(entry, p, lay, hd):
            s = entry.session
            attn, grid, row = c.attention_views(s, p, lay, hd)
            emb, norm, traj = c.embedding_views(s, p)
            return attn, row, grid, c.logit_lens_view(s, p), emb, norm, traj

        def on_view(st, pos, lay, hd, *ctrl):
            try:
                entry = sessions.get(st, c.sampling_config(*ctrl))
                if not entry.lock.acquire(timeout=10):
                    raise c.UserError("Busy: try again in a moment.")
                try:
                    n = len(entry.session.records)
                    p = max(0, min(int(pos or 0), n - 1))
                    cfg = entry.session.model.cfg
                    return list(view_figures(entry, p, min(int(lay or 0), cfg.n_layer - 1), min(int(hd or 0), cfg.n_head - 1)))
                finally:
                    entry.lock.release()
            except Exception as e:  # noqa: BLE001
                if not isinstance(e, (c.UserError, ValueError)):
                    log.exception("view failed")
                gr.Warning(str(e) if isinstance(e, (c.UserError, ValueError)) else "Could not draw this view.")
                return [gr.skip()] * len(views)

        def on_select(evt: gr.SelectData):
            return evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index

        def on_example(name):
            if name not in c.EXAMPLES:
                return gr.skip(), ""
            text, why = c.EXAMPLES[name]
            return text, why

        def on_model(name):
            try:
                models.get(name)
                return c.new_state(name), [], c.next_token_view(None), f"Switched to **{name}**. Press Step or Generate."
            except Exception as e:  # noqa: BLE001
                log.exception("model switch failed")
                return c.new_state(models.default), [], gr.skip(), refuse(f"Could not load {name}: {e}")

        # --- wiring -------------------------------------------------------------------------------
        inputs = [state, model_name, prompt] + controls
        settle_inputs = [state, layer, head] + controls
        after = dict(fn=on_settle, inputs=settle_inputs, outputs=settle, api_visibility="private")
        gen_event = generate_btn.click(on_generate, inputs, live, api_name="generate", concurrency_limit=2)
        gen_event.then(**after)
        prompt.submit(on_generate, inputs, live, api_visibility="private", concurrency_limit=2).then(**after)
        step_btn.click(with_entry(do_step), inputs, live, api_name="step").then(**after)
        reset_btn.click(with_entry(do_reset), inputs, live, api_name="reset").then(**after)
        pick_event_inputs = [state, model_name, prompt, pick] + controls

        def on_stop(st):
            sessions.stop((st or {}).get("key"))
            return "Stopped."

        stop_btn.click(on_stop, state, status, cancels=[gen_event], api_name="stop").then(**after)

        def on_pick(st, name, text, token_id, *ctrl):
            if isinstance(token_id, str) and token_id.strip().isdigit():
                token_id = int(token_id)
            if not isinstance(token_id, int) or isinstance(token_id, bool):
                return st, gr.skip(), gr.skip(), refuse("Pick one of the candidates first.")
            return with_entry(force_handler(lambda e: token_id))(st, name, text, *ctrl)

        def on_typed(st, name, text, typed_text, *ctrl):
            return with_entry(force_handler(lambda e: c.parse_forced_token(models.tokenizer, typed_text)))(st, name, text, *ctrl)

        def on_rewind(st, name, text, keep, *ctrl):
            def action(st, entry):
                n = int(keep) if isinstance(keep, (int, float)) and not isinstance(keep, bool) else -1
                if not 0 <= n <= len(entry.session.steps):
                    raise c.UserError(f"Can rewind to between 0 and {len(entry.session.steps)} generated tokens, not {keep!r}.")
                entry.session.rewind(n)
                return f"Rewound to {n} generated token{'s' if n != 1 else ''}."
            return with_entry(action)(st, name, text, *ctrl)

        pick_btn.click(on_pick, pick_event_inputs, live, api_name="force_candidate").then(**after)
        typed_btn.click(on_typed, [state, model_name, prompt, typed] + controls, live, api_name="force_text").then(**after)
        typed.submit(on_typed, [state, model_name, prompt, typed] + controls, live, api_visibility="private").then(**after)
        rewind_btn.click(on_rewind, [state, model_name, prompt, rewind_to] + controls, live, api_name="rewind").then(**after)

        view_inputs = [state, position, layer, head] + controls
        position.release(on_view, view_inputs, views, api_name="inspect")
        layer.release(on_view, view_inputs, views, api_visibility="private")
        head.release(on_view, view_inputs, views, api_visibility="private")
        strip.select(on_select, None, position, api_visibility="private").then(on_view, view_inputs, views, api_visibility="private")
        example.change(on_example, example, [prompt, example_text], api_visibility="private")
        model_name.change(on_model, model_name, [state, strip, next_plot, status], api_name="set_model")
    return demo


def main() -> None:
    parser = argparse.ArgumentParser(description="gpt2viz web app")
    parser.add_argument("--model", default=os.environ.get("GPT2VIZ_MODEL"), help="model name or checkpoint folder")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    started = time.time()
    models = c.Models(default=args.model)
    log.info("model %s ready in %.1fs", models.default, time.time() - started)
    demo = build(models, c.Sessions(models))
    demo.queue(max_size=64, default_concurrency_limit=2)
    demo.launch(server_name=args.host, server_port=args.port, css=CSS, theme=gr.themes.Soft(),
                max_file_size="1mb", enable_monitoring=False, show_error=False, footer_links=["api"])


if __name__ == "__main__":
    main()
