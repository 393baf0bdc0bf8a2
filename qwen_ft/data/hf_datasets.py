"""Hugging Face datasets on disk as training data: parquet files, folders of parquet or arrow shards, and
`save_to_disk` folders, read through the `datasets` library (memory-mapped, never loaded whole).

Each row becomes a record like a JSON sample, its columns its keys. A column of images stored inline
(the `Image` feature's {"bytes", "path"}, or raw bytes) does not bring its bytes into the record: each
image becomes a reference to its cell, `dataset:PATH?row=R&column=C&item=I`, which cell_bytes reads
when the image is checked or loaded. A path in such a cell, or a column of path strings (images,
videos, frames), is an ordinary media reference.
"""

import urllib.parse
from functools import lru_cache
from pathlib import Path

from qwen_ft.data.media import DATASET_PREFIX as PREFIX
from qwen_ft.data.media import MediaError

ROWS_PER_READ = 1000
SHARD_SUFFIXES = (".parquet", ".arrow")


class DatasetError(Exception):
    """A dataset folder or file that can't be read as one; str() names it and says why."""


def is_dataset(path: Path) -> bool:
    """A parquet or arrow file, or a folder (datasets are folders; a JSON data file is a file)."""
    return path.suffix in SHARD_SUFFIXES or path.is_dir()


@lru_cache(maxsize=8)
def open_dataset(path: str):
    """The dataset at path, memory-mapped. A parquet file or folder of shards is converted to arrow once,
    into the datasets cache, as datasets does for every parquet it loads; a save_to_disk folder is used as is."""
    import datasets  # only for runs that read a dataset: it takes a second to import

    folder = Path(path)
    if (folder / "dataset_dict.json").is_file():
        splits = ", ".join(sorted(p.name for p in folder.iterdir() if (p / "state.json").is_file()))
        raise DatasetError(f"{path}: a dataset with several splits ({splits}): pass the split's folder, {path}/SPLIT")
    if (folder / "state.json").is_file():
        return datasets.load_from_disk(path)
    if folder.is_file():
        shards = [folder]
    else:
        shards = sorted(p for p in folder.rglob("*") if p.suffix in SHARD_SUFFIXES)
    if not shards:
        raise DatasetError(f"{path}: not a dataset: no parquet or arrow files, and not a save_to_disk folder")
    kinds = {p.suffix for p in shards}
    if len(kinds) > 1:
        raise DatasetError(f"{path}: holds both parquet and arrow files: point --data at one kind")
    builder = "parquet" if kinds == {".parquet"} else "arrow"
    try:
        return datasets.load_dataset(builder, data_files=[str(p) for p in shards], split="train")
    except Exception as e:  # pyarrow and datasets raise many types for a file that is not what it says
        raise DatasetError(f"{path}: cannot be read as a {builder} dataset: {e}") from None


@lru_cache(maxsize=8)
def arrow_rows(location: str):
    """The dataset at location, its rows read as pyarrow tables: no Python objects, images as bytes."""
    return open_dataset(location).with_format("arrow")


def records(path: Path):
    """(row, record) for each row of the dataset; inline images as dataset: references."""
    import pyarrow.compute as pc

    location = str(path.resolve())
    table = arrow_rows(location)
    for start in range(0, len(table), ROWS_PER_READ):
        batch = table[start : start + ROWS_PER_READ]
        columns = {}
        for name, column in zip(batch.column_names, batch.columns):
            inline = image_cells(column.type)
            if inline is None:
                columns[name] = column.to_pylist()
                continue
            # Only the cells' paths and whether they hold bytes are read here, not the bytes.
            column = column.combine_chunks()
            sizes = pc.list_value_length(column).fill_null(0).to_pylist() if inline == "list" else None
            cells = column.flatten() if inline == "list" else column
            columns[name] = cell_references(cells, location, name, start, sizes)
        for offset in range(batch.num_rows):
            yield start + offset, {name: values[offset] for name, values in columns.items()}


def image_cells(kind) -> str | None:
    """'one' for a column of images stored inline (an Image feature's struct, or bytes), 'list' for a column of
    lists of them, None for any other column."""
    import pyarrow as pa

    def is_image(t) -> bool:
        return (
            pa.types.is_binary(t)
            or pa.types.is_large_binary(t)
            or (pa.types.is_struct(t) and t.get_field_index("bytes") >= 0)
        )

    if is_image(kind):
        return "one"
    if (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and is_image(kind.value_type):
        return "list"
    return None


def cell_references(cells, location: str, column: str, start: int, sizes: list | None) -> list:
    """A reference per image cell (None for an empty one); with sizes, grouped into each row's list."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_struct(cells.type):
        has_bytes = pc.is_valid(pc.struct_field(cells, "bytes")).to_pylist()
        paths = pc.struct_field(cells, "path").to_pylist() if cells.type.get_field_index("path") >= 0 else None
    else:
        has_bytes, paths = pc.is_valid(cells).to_pylist(), None
    rows = [start + i for i, n in enumerate(sizes) for _ in range(n)] if sizes is not None else None
    items = [i for n in sizes for i in range(n)] if sizes is not None else None
    references = []
    for i, inline in enumerate(has_bytes):
        row, item = (rows[i], items[i]) if rows is not None else (start + i, None)
        if inline:
            query = {"row": row, "column": column} | ({"item": item} if item is not None else {})
            references.append(f"{PREFIX}{location}?{urllib.parse.urlencode(query)}")
        else:
            references.append(paths[i] if paths else None)  # a path to resolve, or no image
    if sizes is None:
        return references
    grouped, at = [], 0
    for n in sizes:
        grouped.append(references[at : at + n])
        at += n
    return grouped


def cell_bytes(reference: str) -> bytes:
    """The bytes of the image a dataset: reference points at, read from the memory-mapped table."""
    location, _, query = reference[len(PREFIX) :].rpartition("?")
    where = dict(urllib.parse.parse_qsl(query))
    try:
        cell = arrow_rows(location)[int(where["row"]) : int(where["row"]) + 1].column(where["column"])[0]
        if "item" in where:
            cell = cell.values[int(where["item"])]
        value = cell["bytes"] if hasattr(cell, "keys") else cell
        return value.as_py()
    except (DatasetError, KeyError, IndexError, ValueError, OSError) as e:
        raise MediaError(f"'{reference}' cannot be read from its dataset: {e}") from None
