import pytest

from qwen_ft import tiny


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A tiny random Qwen2-VL checkpoint, built once per test session."""
    return str(tiny.build(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="session")
def processor(tiny_model):
    from qwen_ft.model import load_processor

    return load_processor(tiny_model)
