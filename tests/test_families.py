"""The family table and the tiny builder agree: every family the builder makes is one the library trains."""

from qwen_ft import families, tiny
from qwen_ft.families import family_of


def test_every_tiny_family_is_a_supported_family_of_the_same_name():
    assert list(tiny.FAMILIES) == [family.name for family in families.FAMILIES]
    for name, recipe in tiny.FAMILIES.items():
        config = recipe.config()  # the family's own defaults, as a published config.json would give
        assert family_of(config).name == name
