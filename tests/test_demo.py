"""The chat page (python -m qwen_ft.demo): its answers are those of python -m qwen_ft.generate, as they stream and
turn after turn, beside a second model's; and the page itself, driven in headless Chromium (slow tier)."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from helpers import picture

import finetune
from qwen_ft import demo, generate
from qwen_ft.config import parse_config
from qwen_ft.dist import single_device

REPO = Path(__file__).resolve().parents[1]
QUESTION = "What colour is the shape?"


def command_line_answer(capsys, *flags) -> str:
    """What `python -m qwen_ft.generate ... --prompt` prints, run in this process."""
    capsys.readouterr()
    generate.main(list(flags))
    return capsys.readouterr().out.removesuffix("\n")


def reply(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def test_the_page_answers_as_the_command_line_beside_a_second_model_and_keeps_each_chat(tmp_path, family_model, capsys):
    image = str(tmp_path / picture(tmp_path, "a.png"))
    paths = {"fine-tuned": family_model("qwen2-vl"), "base": family_model("qwen3-vl")}
    models = {name: generate.Answerer(path, torch.device("cpu")) for name, path in paths.items()}
    first = list(demo.chat(models, QUESTION, [image], {name: [] for name in models}, 12, 0.0))[-1]
    for name, path in paths.items():
        flags = ["--model", path, "--image", image, "--prompt", QUESTION, "--max-new-tokens", "12"]
        assert first[name] == [generate.user_message(QUESTION, [image]), reply(command_line_answer(capsys, *flags))]

    # The answer streams: the streamer sends a piece per new token (empty while a word is unfinished).
    pieces = list(demo.stream(models["base"], first["base"][:1], 12, 0.0))
    assert len(pieces) > 3 and pieces[-1] == first["base"][1]["content"][0]["text"]

    # The next question goes to each model after its own first turn, and is answered as the whole chat would be.
    second = list(demo.chat(models, "And its shape?", [], first, 12, 0.0))[-1]
    for name, answerer in models.items():
        chat = [*first[name], generate.user_message("And its shape?")]
        answer = generate.generate_answers(answerer.model, answerer.collator, [chat], max_new_tokens=12)[0]
        assert second[name] == [*chat, reply(answer)]


def test_without_gradio_the_page_says_how_to_install_it(tiny_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio now fails, installed or not
    with pytest.raises(SystemExit) as stop:
        demo.main(["--model", tiny_model])
    assert stop.value.code == 'error: the chat page needs Gradio: pip install "qwen-ft[demo]"'


CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.skip("no Chromium to try the page in (Debian: apt-get install chromium; .ci/run installs it)")
    return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve(args: list[str], log: Path, timeout_s: float = 300) -> tuple[subprocess.Popen, str]:
    """python -m qwen_ft.demo ARGS on a free port, once its page answers: (the process, the page's address)."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_TEMP_DIR": str(log.parent / "gradio")}
    command = [sys.executable, "-m", "qwen_ft.demo", *args, "--port", str(port)]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url, began = f"http://127.0.0.1:{port}/", time.monotonic()
    while time.monotonic() - began < timeout_s:
        assert process.poll() is None, f"the page stopped before serving:\n{log.read_text()[-3000:]}"
        try:
            urllib.request.urlopen(url, timeout=5)
            return process, url
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise AssertionError(f"the page did not come up in {timeout_s} s:\n{log.read_text()[-3000:]}")


@pytest.mark.slow
def test_in_a_browser_a_lora_output_and_its_base_answer_as_the_command_line(tmp_path, tiny_model, capsys):
    browser_path = chromium()
    pytest.importorskip("gradio", reason='the page needs Gradio: pip install "qwen-ft[demo]"')
    sync_api = pytest.importorskip("playwright.sync_api", reason='pip install "qwen-ft[demo,test]" installs Playwright')
    image = str(REPO / "test_data" / "images" / "0000.png")
    data = str(REPO / "test_data" / "data.json")
    lora = tmp_path / "lora"
    flags = ["--model", tiny_model, "--data", data, "--output-dir", str(lora), "--num-workers", "0", "--lora"]
    finetune.train(parse_config([*flags, "--max-steps", "3", "--lr", "1e-2", "--save-every", "0"]), single_device())
    question = ["--image", image, "--prompt", QUESTION]  # and the page's defaults: 128 new tokens at most, greedy
    expected = {
        "fine-tuned": command_line_answer(capsys, "--model", tiny_model, "--adapter", str(lora), *question),
        "base": command_line_answer(capsys, "--model", tiny_model, *question),
    }
    assert expected["fine-tuned"] != expected["base"]  # the page must tell them apart

    process, url = serve(["--model", tiny_model, "--adapter", str(lora), "--compare", tiny_model], tmp_path / "log")
    try:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=browser_path, args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1100, "height": 760})
            outside = []
            page.on("request", lambda request: outside.append(request.url) if not request.url.startswith(url) else 0)
            page.goto(url)
            page.locator("#question input[type=file]").set_input_files(image)
            page.locator("#question textarea").fill(QUESTION)
            page.locator("#question textarea").press("Enter")
            for name, answer in expected.items():
                # Wait until the streamed text is the whole answer, then read it as shown.
                shown = page.locator(f"#chat-{name} [data-testid=bot]").last
                try:
                    sync_api.expect(shown).to_have_text(answer, timeout=240_000)
                finally:
                    page.screenshot(path=tmp_path / "page.png")
                assert shown.inner_text() == answer
            assert page.locator("#chat-fine-tuned [data-testid=user] img").count() == 1  # the picture, in the chat
            browser.close()
        assert outside == []  # the page asks nothing of any other server
    finally:
        process.terminate()
        process.wait(timeout=60)
