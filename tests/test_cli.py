import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qwen_ft.config import Config, build_parser, parse_config

REPO = Path(__file__).resolve().parent.parent


def test_every_field_is_a_hyphenated_flag_with_help_and_its_default():
    help_text = build_parser().format_help()
    for name, value in vars(Config()).items():
        flag = "--" + name.replace("_", "-")
        assert flag in help_text
        if isinstance(value, bool):
            assert f"--no-{name.replace('_', '-')}" in help_text
    assert "(default: Qwen/Qwen2-VL-2B-Instruct)" in help_text
    assert "(default: bf16-mixed)" in help_text


def test_flags_parse_into_the_config():
    cfg = parse_config(
        ["--no-freeze-vision", "--freeze-llm", "--max-steps", "5", "--lr", "3e-4", "--precision", "bf16"]
    )
    assert (cfg.freeze_vision, cfg.freeze_llm, cfg.max_steps, cfg.lr, cfg.precision) == (False, True, 5, 3e-4, "bf16")
    assert parse_config([]) == Config()
    for bad in (["--precision", "fp16"], ["--batch-size", "0"], ["--min-pixels", "5000", "--max-pixels", "4000"]):
        with pytest.raises(SystemExit):
            parse_config(bad)


def test_finetune_sh_with_the_tiny_model_runs_offline(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        ["./finetune.sh", "--max-steps", "3", "--num-workers", "0", "--output-dir", str(out)],
        cwd=REPO,
        env={**os.environ, "MODEL": "tiny", "PYTHON": sys.executable},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    assert (out / "model.safetensors").exists()


def test_a_hub_model_without_network_fails_fast_and_says_what_to_do(tmp_path):
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "HF_HOME": str(tmp_path / "hf"),
        "HF_ENDPOINT": "http://127.0.0.1:9",
    }  # nothing listens on the discard port
    env.pop("HF_HUB_OFFLINE", None)
    start = time.perf_counter()
    result = subprocess.run(
        ["./finetune.sh", "--output-dir", str(tmp_path / "out")], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert result.returncode != 0
    assert time.perf_counter() - start < 60
    message = result.stderr.strip().splitlines()[-1]
    assert "Qwen/Qwen2-VL-2B-Instruct" in message and "MODEL=tiny" in message and "--model PATH" in message


def test_the_readme_documents_every_flag():
    readme = (REPO / "README.md").read_text()
    missing = [name for name in vars(Config()) if f"`--{name.replace('_', '-')}" not in readme]
    assert missing == []
