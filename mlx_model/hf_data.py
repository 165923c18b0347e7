"""Hugging Face `datasets` as text sources (the optional `[data]` extra).

`hf:NAME[:CONFIG][:SPLIT]` loads a hub dataset with streaming (rows are read as they are
needed; `datasets` keeps its own cache, and with HF_DATASETS_OFFLINE=1 streams from it);
SPLIT defaults to train. A `Dataset.save_to_disk` directory is opened memory-mapped; of a
`DatasetDict` the train split (or its only split) is read. Each row's text field is a document.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .data_errors import HF_FIX, DataError, check_text, missing_field
from .speedups import reapply

_ROWS = 1024  # rows per batch read from a dataset


def _datasets(what: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{what} needs the datasets package: {HF_FIX}") from None
    datasets.logging.set_verbosity_error()  # no "using the cached version" chatter on stderr
    datasets.disable_progress_bars()
    try:
        from huggingface_hub.utils import logging as hub_logging

        hub_logging.set_verbosity_error()  # no per-retry warnings while the network is down
    except ImportError:
        pass
    return datasets


def parse_hf(spec: str) -> tuple[str, str | None, str]:
    """'hf:NAME[:CONFIG][:SPLIT]' -> (name, config or None, split, default train)."""
    parts = spec[3:].split(":")
    if not parts[0] or len(parts) > 3:
        raise DataError(f"bad dataset name {spec!r}: write hf:NAME[:CONFIG][:SPLIT]")
    parts += [""] * (3 - len(parts))
    return parts[0], parts[1] or None, parts[2] or "train"


def load_hub(spec: str, memo: dict[str, Any]) -> Any:
    """The streaming split named by `spec`; one-line DataErrors for every way it can fail.
    `memo` (the Corpus's own) keeps it, so the cache key and the reading load it once."""
    if spec in memo:
        return memo[spec]
    datasets = _datasets(spec)
    name, config, split = parse_hf(spec)
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
    except ConnectionError as e:
        raise DataError(
            f"cannot load {spec}: no network access to the Hugging Face Hub and no copy in the "
            f"local datasets cache ({e}): connect to the network once, or pass local files"
        ) from None
    except (FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"no dataset {name!r} ({msg}): check the name on huggingface.co") from None
    except Exception as e:  # unknown config or split, bad dataset script, ...
        msg = " ".join(str(e).split())[:300]
        raise DataError(f"cannot load {spec} ({type(e).__name__}: {msg}): {_HF_SPEC}") from None
    finally:
        reapply()  # datasets restores os.environ wholesale around downloads
    memo[spec] = ds
    return ds


_HF_SPEC = "check hf:NAME[:CONFIG][:SPLIT]"


def hub_signature(spec: str, memo: dict[str, Any]) -> object:
    """What a hub split's rows depend on, as far as its metadata says (for the cache key)."""
    info = load_hub(spec, memo).info
    return [spec, info.config_name, str(info.version), info.dataset_size, info.download_size]


def _rows(ds: Any, spec: str, field: str, corpus: Any) -> Iterator[tuple[str]]:
    """Documents of a Dataset or IterableDataset, read in batches of rows."""
    names = ds.column_names
    if names is not None and field not in names:
        raise missing_field(spec, field, names)
    try:
        for batch in ds.iter(batch_size=_ROWS):
            reapply()  # a streamed read can download, and datasets resets the C environment then
            if field not in batch:
                raise missing_field(spec, field, batch)
            for text in batch[field]:
                if text is not None:
                    corpus.pos += len(check_text(spec, text, field).encode())
                    yield (text,)
    except DataError:
        raise
    except Exception as e:  # the network dropped, a shard is corrupt, ...
        msg = " ".join(str(e).split())[:300]
        raise DataError(f"reading {spec} failed ({type(e).__name__}: {msg}): try again") from None


def hub_documents(spec: str, field: str, corpus: Any) -> Iterator[tuple[str]]:
    """Documents of hf:NAME[:CONFIG][:SPLIT], streamed."""
    yield from _rows(load_hub(spec, corpus.hub), spec, field, corpus)


def open_disk(path: Path) -> Any:
    """The Dataset saved in `path` (of a DatasetDict, its train split or its only split)."""
    datasets = _datasets(str(path))
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        msg = " ".join(str(e).split())[:300]
        raise DataError(
            f"cannot open dataset {path} ({msg}): pass a save_to_disk directory"
        ) from None
    finally:
        reapply()
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        if "train" not in splits and len(splits) != 1:
            raise DataError(
                f"{path} holds splits {', '.join(splits) or 'none'} and no train split: pass "
                "the split's own directory (e.g. DIR/validation)"
            )
        ds = ds["train"] if "train" in splits else ds[splits[0]]
    return ds


def disk_documents(path: Path, field: str, corpus: Any) -> Iterator[tuple[str]]:
    """Documents of a save_to_disk directory, read memory-mapped."""
    yield from _rows(open_disk(path), str(path), field, corpus)


def disk_text_bytes(path: Path, field: str) -> int:
    """UTF-8 bytes of the text column of a save_to_disk directory (for the progress bar)."""
    import pyarrow.compute as pc

    ds = open_disk(path)
    if field not in ds.column_names:
        raise missing_field(str(path), field, ds.column_names)
    return int(pc.sum(pc.binary_length(ds.data.column(field))).as_py() or 0)
