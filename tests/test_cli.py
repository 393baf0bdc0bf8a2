import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import clip, picture, qa, video_qa, write_json
from transformers import AutoProcessor, Qwen2Config

import finetune
from qwen_ft import generate, inspect_data, merge
from qwen_ft.collate import Collator
from qwen_ft.config import Config, build_parser, parse_config
from qwen_ft.data.media_check import check_media
from qwen_ft.data.read import read_samples
from qwen_ft.model import load_processor
from qwen_ft.tiny import FAMILIES

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


def finetune_sh(tiny_model, *args) -> subprocess.CompletedProcess:
    """./finetune.sh with MODEL=tiny, its model kept in the session's tiny model folder."""
    env = {**os.environ, "MODEL": "tiny", "TINY_DIR": tiny_model, "PYTHON": sys.executable}
    return subprocess.run(
        ["./finetune.sh", "--num-workers", "0", *args], cwd=REPO, env=env, capture_output=True, text=True
    )


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # three runs of finetune.sh, each importing everything anew
def test_a_tiny_run_resumes_with_a_longer_schedule_that_keeps_training(tmp_path, tiny_model):
    built = (Path(tiny_model) / "model.safetensors").stat().st_mtime_ns
    out, reference = tmp_path / "out", tmp_path / "reference"
    schedule = ["--warmup-steps", "1", "--lr", "1e-3", "--save-every", "2", "--grad-accum", "1"]  # at step 4 of 4: lr 0
    first = finetune_sh(tiny_model, "--max-steps", "4", "--output-dir", str(out), *schedule)
    assert first.returncode == 0, first.stderr[-2000:]
    assert metrics(out)[-1]["step"] == 4
    resumed = finetune_sh(tiny_model, "--max-steps", "8", "--output-dir", str(out), *schedule, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout and "step-00000004" in resumed.stdout
    # The tiny model was reused, not built again, and the config names a model that still exists.
    assert (Path(tiny_model) / "model.safetensors").stat().st_mtime_ns == built
    assert json.loads((out / "train_config.json").read_text())["model"] == tiny_model
    assert (out / "model.safetensors").exists()
    # The resumed steps take the lr of the 8-step schedule, as a run of 8 steps from the start does.
    uninterrupted = finetune_sh(tiny_model, "--max-steps", "8", "--output-dir", str(reference), *schedule)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-2000:]
    logged = metrics(out)
    assert [r["step"] for r in logged] == list(range(1, 9))
    assert [r["lr"] for r in logged[4:]] == [r["lr"] for r in metrics(reference)[4:]]
    assert logged[4]["lr"] > 0


def offline_env(tmp_path, **variables) -> dict:
    """The environment of a run with an empty Hugging Face cache and no hub, whatever the caller's is."""
    env = {**os.environ, "PYTHON": sys.executable, "HF_HOME": str(tmp_path / "hf")}
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT"):
        env.pop(name, None)
    return {**env, **variables}


@pytest.mark.parametrize(
    "variables, says",
    [
        ({"HF_ENDPOINT": "http://127.0.0.1:9"}, "cannot be reached"),  # nothing listens on the discard port
        ({"HF_HUB_OFFLINE": "1"}, "offline mode is on"),
        pytest.param({"TRANSFORMERS_OFFLINE": "1"}, "offline mode is on", marks=pytest.mark.slow),
    ],
)
def test_a_hub_model_that_cant_be_had_fails_fast_and_says_what_to_do(tmp_path, variables, says):
    start = time.perf_counter()
    result = subprocess.run(
        ["./finetune.sh", "--output-dir", str(tmp_path / "out")],
        cwd=REPO,
        env=offline_env(tmp_path, **variables),
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert time.perf_counter() - start < 60
    assert "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: ") and says in message
    assert "Qwen/Qwen2-VL-2B-Instruct" in message and "MODEL=tiny" in message and "--model PATH" in message
    assert '"lora_r"' not in result.stdout  # the config is printed once the model is found, not before


ENTRY_POINTS = {
    "finetune": lambda model: finetune.main(["--model", model]),
    "generate": lambda model: generate.main(["--model", model, "--prompt", "Hi"]),
    "merge": lambda model: merge.main(["--base", model, "--adapter", model, "--out", model + "-merged"]),
    "inspect_data": lambda model: inspect_data.main(["--model", model]),
}


@pytest.mark.parametrize("entry_point", list(ENTRY_POINTS))
@pytest.mark.parametrize(
    "make, says",
    [
        (lambda folder: folder.mkdir(), "is not a model folder: it has no config.json"),
        (lambda folder: folder.write_text("{}"), "is a file, not a model folder"),
        (lambda folder: None, "not found"),
    ],
)
def test_a_folder_that_is_not_a_model_is_a_one_line_error(tmp_path, entry_point, make, says):
    folder = tmp_path / "not-a-model"
    make(folder)
    with pytest.raises(SystemExit) as exit_info:
        ENTRY_POINTS[entry_point](str(folder))
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and len(message.splitlines()) == 1 and says in message


def test_a_model_without_its_processor_says_so(tmp_path, tiny_model):
    folder = tmp_path / "weights-only"
    folder.mkdir()
    shutil.copy(Path(tiny_model) / "config.json", folder)
    with pytest.raises(SystemExit) as exit_info:
        generate.main(["--model", str(folder), "--prompt", "Hi"])
    assert "has a model but no processor" in str(exit_info.value.code)


@pytest.mark.parametrize("entry_point", list(ENTRY_POINTS))
def test_a_model_of_another_architecture_is_a_one_line_error_naming_the_families(tmp_path, tiny_model, entry_point):
    """A text-only Qwen2 (a likely mistake) with the tiny model's files around it: weights, processor."""
    folder = tmp_path / "qwen2-text"
    shutil.copytree(tiny_model, folder)
    (folder / "config.json").write_text(Qwen2Config(architectures=["Qwen2ForCausalLM"]).to_json_string())
    with pytest.raises(SystemExit) as exit_info:
        ENTRY_POINTS[entry_point](str(folder))
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and len(message.splitlines()) == 1
    assert str(folder) in message and "Qwen2ForCausalLM" in message
    assert all(family in message for family in FAMILIES)


def test_lora_and_qlora_together_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--lora", "--qlora"])
    assert "--lora and --qlora" in capsys.readouterr().err
    assert parse_config(["--qlora"]).lora  # QLoRA is LoRA on a 4-bit base


def test_the_readme_documents_every_flag():
    readme = (REPO / "README.md").read_text()
    missing = [name for name in vars(Config()) if f"`--{name.replace('_', '-')}" not in readme]
    assert missing == []


def test_an_early_qwen2_5_vl_folder_loads(tmp_path, family_model):
    """The first Qwen2.5-VL releases' preprocessor_config.json names "Qwen2_5_VLImageProcessor", a class transformers
    never had: AutoProcessor fails on it with a 40-line traceback. qwen-ft loads it as the Qwen2-VL image processor it
    is, and the batches it gives are those of today's folder; saved, it is one that AutoProcessor loads."""
    today = Path(family_model("qwen2.5-vl"))
    early = tmp_path / "Qwen2.5-VL-early"
    early.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(today / name, early)
    image = json.loads((today / "processor_config.json").read_text())["image_processor"]
    release = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2}
    preprocessor = {**release, "image_mean": image["image_mean"], "image_std": image["image_std"]}
    preprocessor |= {"image_processor_type": "Qwen2_5_VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"}
    (early / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    with pytest.raises(ValueError, match="Unrecognized image processor"):
        AutoProcessor.from_pretrained(early)

    data = write_json(
        tmp_path / "data.json", [qa(picture(tmp_path, "a.png"), "Colour?", "red"), video_qa(clip(tmp_path))]
    )
    batches, processors = [], [load_processor(str(folder), 3136, 200704, 200704) for folder in (early, today)]
    for processor in processors:
        collator = Collator(processor, 4096)
        samples = read_samples(data)
        check_media(samples, factor=collator.video_factor)
        batches.append(collator(samples))
    assert set(batches[0]) == set(batches[1])
    for key, value in batches[1].items():
        if key != "bad_samples":
            torch.testing.assert_close(batches[0][key], value, rtol=0, atol=0, msg=key)
    processors[0].save_pretrained(tmp_path / "saved")
    assert type(AutoProcessor.from_pretrained(tmp_path / "saved").image_processor).__name__ == "Qwen2VLImageProcessor"
