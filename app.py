"""gpt2viz web app (placeholder page until the classroom app lands)."""

import gradio as gr

from gpt2viz import available_models

with gr.Blocks(title="gpt2viz") as demo:
    gr.Markdown("# gpt2viz\nWatch GPT-2 write, one token at a time. Models: " + ", ".join(available_models()))

if __name__ == "__main__":
    demo.launch()
