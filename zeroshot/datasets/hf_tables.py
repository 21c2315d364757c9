"""A Hugging Face `datasets` split read from its own files with pyarrow: no `datasets`, no hub.

A split sits on disk in one of two ways (paths relative to the benchmark root, tried in this order):
    <split>/*.parquet, default/<split>/*.parquet, data/<split>-*.parquet
        the hub's parquet files: its parquet conversion, or what `push_to_hub` writes
    <split>/data-*.arrow beside <split>/dataset_info.json, or data-*.arrow beside dataset_info.json
        a `save_to_disk` folder: a DatasetDict's split folder, or one Dataset saved alone (its state.json names
        the split)
Parquet files are read a row group at a time and .arrow files (Arrow IPC streams) are memory-mapped, so a split's
images are never all in memory. The `Image` feature is stored as struct<bytes: binary, path: string>: the encoded
file (JPEG, PNG, ...), or, where the bytes are null, the path of one (absolute, or relative to the data file).
pyarrow comes with the `datacomp` extra (pip install 'vlpretrain[datacomp]').
"""

from __future__ import annotations

import bisect
import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image
from torch.utils.data import Dataset

from vlpretrain.errors import ConfigError, DataError
from vlpretrain.formats import to_rgb

if TYPE_CHECKING:
    import pyarrow as pa

PARQUET = ("{split}/*.parquet", "default/{split}/*.parquet", "data/{split}-*.parquet")
ARROW_INFO = "dataset_info.json"


def expected(split: str) -> str:
    """One line naming the files of a split in either form."""
    return (f"{' or '.join(p.format(split=split) for p in PARQUET)} (the hub's parquet files) or "
            f"{split}/data-*.arrow with {split}/{ARROW_INFO} (save_to_disk)")


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.compute  # noqa: F401
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ConfigError("reading Hugging Face parquet or .arrow files needs pyarrow: "
                          "pip install 'vlpretrain[datacomp]'") from None
    return pyarrow


def _saved_split(folder: Path) -> str | None:
    """The split a `Dataset.save_to_disk` folder holds, from its state.json (None when it does not say)."""
    try:
        return json.loads((folder / "state.json").read_text(encoding="utf-8")).get("_split")
    except (OSError, ValueError, AttributeError):
        return None


def split_files(root: Path, split: str) -> list[Path]:
    """The parquet files, else the save_to_disk .arrow files, of `split` under `root`, in order ([] when none)."""
    for pattern in PARQUET:
        found = sorted(root.glob(pattern.format(split=split)))
        if found:
            return found
    for folder in (root / split, root):
        found = sorted(folder.glob("data-*.arrow"))
        if found and (folder / ARROW_INFO).is_file():
            if folder == root and _saved_split(root) not in (None, split):
                continue  # a save_to_disk folder of another split
            return found
    return []


class SplitTable:
    """One parquet or .arrow file of a split, opened on first use in each process (DataLoader workers each open
    their own): whole columns at once, or one cell at a time, reading only the row group that holds it."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._handle: tuple[int, Any] | None = None  # (pid, ParquetFile or memory-mapped Table)
        self._group: tuple[str, int, Any] | None = None  # the parquet row group read last: (column, group, Table)
        self._starts: list[int] = []  # parquet: the first row of each row group, then the row count

    def __getstate__(self) -> dict:
        return {"path": self.path, "_handle": None, "_group": None, "_starts": []}

    def _open(self):
        if self._handle is None or self._handle[0] != os.getpid():
            pa = _pyarrow()
            try:
                if self.path.suffix == ".parquet":
                    handle = pa.parquet.ParquetFile(self.path)
                else:  # save_to_disk writes Arrow IPC streams; the IPC file format is read as well
                    source = pa.memory_map(str(self.path))
                    try:
                        handle = pa.ipc.open_stream(source).read_all()
                    except pa.ArrowInvalid:
                        handle = pa.ipc.open_file(source).read_all()
            except (pa.ArrowException, OSError) as e:
                raise DataError(f"{self.path}: not a readable {self.path.suffix[1:]} file ({e})") from None
            self._handle, self._group = (os.getpid(), handle), None
            if self.path.suffix == ".parquet":
                self._starts = [0]
                for g in range(handle.metadata.num_row_groups):
                    self._starts.append(self._starts[-1] + handle.metadata.row_group(g).num_rows)
        return self._handle[1]

    @property
    def schema(self) -> pa.Schema:
        handle = self._open()
        return handle.schema_arrow if self.path.suffix == ".parquet" else handle.schema

    @property
    def num_rows(self) -> int:
        handle = self._open()
        return handle.metadata.num_rows if self.path.suffix == ".parquet" else handle.num_rows

    def require(self, columns: tuple[str, ...], what: str) -> None:
        """One DataError naming the file, the first missing column and the columns it has, when any is missing."""
        names = self.schema.names
        missing = [c for c in columns if c not in names]
        if missing:
            raise DataError(f"{self.path}: no column {missing[0]!r} ({what} needs {', '.join(columns)}; the file "
                            f"has {', '.join(names) or 'none'})")

    def column(self, name: str) -> list:
        """A whole column as Python values (for the small text columns)."""
        handle = self._open()
        table = handle.read(columns=[name]) if self.path.suffix == ".parquet" else handle
        return table.column(name).to_pylist()

    def image_counts(self, name: str) -> list[int | None]:
        """The number of images in each row of column `name`, a list of `Image` values (None for a null list),
        read without a parquet file's image bytes (only the images' `path` leaf is read)."""
        pa = _pyarrow()
        kind = self.schema.field(name).type
        listed = pa.types.is_list(kind) or pa.types.is_large_list(kind)
        if not (listed and pa.types.is_struct(kind.value_type) and kind.value_type.get_field_index("bytes") >= 0):
            raise DataError(f"{self.path}: column {name!r} is {kind}, expected a list of images "
                            "(struct<bytes: binary, path: string>)")
        handle = self._open()
        if self.path.suffix == ".parquet":
            leaves = [handle.schema.column(i).path for i in range(len(handle.schema))]
            paths = [p for p in leaves if p.startswith(f"{name}.") and p.endswith(".path")]
            column = handle.read(columns=paths[:1] or [name]).column(name)
        else:
            column = handle.column(name)
        return pa.compute.list_value_length(column).to_pylist()

    def cell(self, name: str, row: int) -> Any:
        """Column `name` at `row` as a pyarrow scalar."""
        handle = self._open()
        if self.path.suffix != ".parquet":
            return handle.column(name)[row]
        group = bisect.bisect_right(self._starts, row) - 1
        if self._group is None or self._group[:2] != (name, group):
            self._group = (name, group, handle.read_row_group(group, columns=[name]))
        return self._group[2].column(name)[row - self._starts[group]]


def decode_image(value: Any, folder: Path, where: str) -> Image.Image:
    """The RGB image of one `Image` feature value (a struct scalar of bytes and path); DataError naming `where`
    when it has neither readable bytes nor a readable file."""
    if not value.is_valid:
        raise DataError(f"{where}: no image (null)")
    fields = {k: v.as_py() for k, v in value.items()}
    data, path = fields.get("bytes"), fields.get("path")
    if data is None:
        file = folder / path if path else None  # an absolute path stays itself
        if file is None or not file.is_file():
            raise DataError(f"{where}: the image has no bytes" + (f" and its file {file} does not exist" if file else ""))
        data = file.read_bytes()
    try:
        return to_rgb(Image.open(io.BytesIO(data)))
    except OSError as e:
        raise DataError(f"{where}: cannot decode the image ({e})") from None


class TableImages(Dataset):
    """Images of a list-of-images column, decoded one at a time: item (file, row, position in the row's list,
    label) yields (image, label), as webdataset shards' ShardSamples does."""

    def __init__(self, tables: list[SplitTable], column: str, samples: list[tuple[int, int, int, int]],
                 transform: Callable | None = None):
        self.tables, self.column, self.samples, self.transform = tables, column, samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        f, row, position, label = self.samples[i]
        table = self.tables[f]
        images = table.cell(self.column, row)
        image = decode_image(images.values[position], table.path.parent,
                             f"{table.path}: row {row}: {self.column}[{position}]")
        return (self.transform(image) if self.transform else image), label
