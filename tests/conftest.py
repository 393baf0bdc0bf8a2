import os
import tempfile

import pytest

from qwen_ft import tiny

# datasets converts each parquet it reads into its cache, as arrow: the tests' conversions go to a temporary
# folder rather than the user's cache. Set before anything imports datasets, which reads it once.
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="qwen-ft-tests-datasets-"))
# The trackers (--report-to) and the chat page run offline and write into a temporary folder, never the home
# folder, whatever the caller's environment says; nothing is sent anywhere (no telemetry, no error reports).
# Set before anything imports them: trackio reads TRACKIO_DIR once.
_offline = tempfile.mkdtemp(prefix="qwen-ft-tests-trackers-")
os.environ.update(
    WANDB_MODE="offline",
    WANDB_SILENT="true",
    WANDB_ERROR_REPORTING="false",
    WANDB_CONFIG_DIR=f"{_offline}/wandb-config",
    WANDB_CACHE_DIR=f"{_offline}/wandb-cache",
    WANDB_DATA_DIR=f"{_offline}/wandb-data",
    SWANLAB_MODE="offline",
    SWANLAB_ROOT=f"{_offline}/swanlab",
    TRACKIO_DIR=f"{_offline}/trackio",
    GRADIO_ANALYTICS_ENABLED="False",
)
for _name in ("WANDB_API_KEY", "SWANLAB_API_KEY", "TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL"):  # no way online
    os.environ.pop(_name, None)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A tiny random Qwen2-VL checkpoint, built once per test session."""
    return str(tiny.build(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="session")
def processor(tiny_model):
    from qwen_ft.model import load_processor

    return load_processor(tiny_model)


@pytest.fixture(scope="session")
def family_model(tiny_model, tmp_path_factory):
    """family_model(family): the folder of a tiny random checkpoint of that family (tiny.FAMILIES),
    built the first time a test asks for it and shared by the rest of the session."""
    built = {"qwen2-vl": tiny_model}

    def model(family: str) -> str:
        if family not in built:
            built[family] = str(tiny.build(tmp_path_factory.mktemp(f"tiny-{family}"), family=family))
        return built[family]

    return model


@pytest.fixture(scope="session")
def family_processor(family_model):
    """family_processor(family): the processor of family_model(family), loaded once per session."""
    from qwen_ft.model import load_processor

    loaded = {}

    def processor(family: str):
        if family not in loaded:
            loaded[family] = load_processor(family_model(family))
        return loaded[family]

    return processor
