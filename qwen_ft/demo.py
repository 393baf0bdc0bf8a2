"""A chat page to try a model on your own images and videos, beside the model it was fine-tuned from.

    python -m qwen_ft.demo --model output                        # a finetune.py output or one of its checkpoints
    python -m qwen_ft.demo --model Qwen/Qwen2-VL-2B-Instruct --adapter output --compare Qwen/Qwen2-VL-2B-Instruct

The page is served on this machine only (http://127.0.0.1:7860; --host 0.0.0.0 opens it to the network,
--share asks Gradio for a public link). Answers stream as they are written, and come from the code of
`python -m qwen_ft.generate` (the same loading, inputs and decoding), so a greedy answer on the page is the
one the command line gives to the same question. Needs Gradio: pip install "qwen-ft[demo]".
"""

import argparse
import mimetypes
import sys
import threading

from qwen_ft.data.media import MediaError
from qwen_ft.generate import Answerer, add_model_options, load_answerer, user_message
from qwen_ft.model import ModelUnavailable


def stream(answerer: Answerer, conversation: list[dict], max_new_tokens: int, temperature: float):
    """The answer's text so far as tokens come, then the whole answer as qwen_ft.generate returns it."""
    from transformers import TextIteratorStreamer

    tokenizer = answerer.collator.processor.tokenizer
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    answers, errors = [], []

    def generate():  # in a thread, while this one reads the streamer
        try:
            answers.extend(answerer.answer([conversation], max_new_tokens, temperature, streamer))
        except Exception as error:  # raised below, once the streamer is told to end
            errors.append(error)
            streamer.end()

    thread = threading.Thread(target=generate, daemon=True)
    thread.start()
    text = ""
    for piece in streamer:
        text += piece
        yield text
    thread.join()
    if errors:
        raise errors[0]
    yield answers[0]  # the streamer's pieces decode alone; the answer decodes all tokens together and strips


def chat(models: dict[str, Answerer], text: str, files: list[str], conversations: dict, max_new_tokens, temperature):
    """Ask each model the question in its own conversation (its own earlier answers), one model after the other.
    Yields the conversations as the answers stream."""
    videos = [path for path in files if (mimetypes.guess_type(path)[0] or "").startswith("video/")]
    question = user_message(text, [path for path in files if path not in videos], videos)
    for name, answerer in models.items():
        asked = [*conversations[name], question]
        for answer in stream(answerer, asked, max_new_tokens, temperature):
            reply = {"role": "assistant", "content": [{"type": "text", "text": answer}]}
            conversations = {**conversations, name: [*asked, reply]}
            yield conversations


def shown(conversation: list[dict]) -> list[dict]:
    """A conversation as gr.Chatbot shows it: each image or video, then the text."""
    return [
        {"role": message["role"], "content": part["text"] if part["type"] == "text" else {"path": part[part["type"]]}}
        for message in conversation
        for part in message["content"]
    ]


def page(models: dict[str, Answerer], titles: dict[str, str]):
    """The Gradio page: a chat column per model, one question box, the decoding settings and a reset."""
    import gradio as gr

    def ask(message, before, max_new_tokens, temperature):
        text, files = message.get("text", ""), message.get("files", [])
        if not text.strip() and not files:
            raise gr.Error("Type a question (and attach images or a video if you like).")
        try:
            for after in chat(models, text, files, before, int(max_new_tokens), temperature):
                yield *(shown(after[name]) for name in models), after, None  # None empties the question box
        except MediaError as error:  # a file that is no image or video the model can read
            raise gr.Error(str(error)) from None

    with gr.Blocks(title="qwen-ft", analytics_enabled=False) as demo:  # nothing is sent to Gradio's servers
        gr.Markdown("### " + " · ".join(f"{name}: `{title}`" for name, title in titles.items()))
        empty = {name: [] for name in models}
        conversations = gr.State(empty)
        with gr.Row():
            chats = [gr.Chatbot(label=name, elem_id=f"chat-{name}", height=520, buttons=["copy"]) for name in models]
        question = gr.MultimodalTextbox(
            file_types=["image", "video"], file_count="multiple", elem_id="question", show_label=False,
            placeholder="Ask about an image or a video: attach them with the clip, type, press Enter",
        )  # fmt: skip
        with gr.Row():
            max_new_tokens = gr.Slider(1, 2048, value=128, step=1, label="max new tokens")
            temperature = gr.Slider(0, 2, value=0, step=0.05, label="temperature (0: greedy)")
            clear = gr.Button("New chat", scale=0)
        inputs = [question, conversations, max_new_tokens, temperature]
        question.submit(ask, inputs, [*chats, conversations, question])
        clear.click(lambda: [[] for _ in models] + [empty], None, [*chats, conversations])
    return demo


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_model_options(parser)
    parser.add_argument("--compare", help="another model (e.g. the base of --model or --adapter) to answer beside it")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860, help="port to serve on")
    parser.add_argument("--share", action="store_true", help="also ask Gradio for a public *.gradio.live link")
    args = parser.parse_args(argv)
    try:
        import gradio  # noqa: F401
    except ImportError:
        sys.exit('error: the chat page needs Gradio: pip install "qwen-ft[demo]"')

    tuned = args.model + (f" + {args.adapter}" if args.adapter else "")
    titles = {"fine-tuned": tuned, "base": args.compare} if args.compare else {"model": tuned}
    try:
        models = {next(iter(titles)): load_answerer(args, args.model, args.adapter)}
        if args.compare:
            models["base"] = load_answerer(args, args.compare, None)
    except ModelUnavailable as error:
        sys.exit(f"error: {error}")
    page(models, titles).launch(server_name=args.host, server_port=args.port, share=args.share)


if __name__ == "__main__":
    main()
