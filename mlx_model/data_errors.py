"""Data errors: one exception type and the shared wording of its messages.

Every message is one line, `problem: fix`; the CLIs print it as `error: ...` and exit 2.
"""

from __future__ import annotations

from collections.abc import Iterable

DATA_FIX = (
    "pass --data with .txt/.md files, a directory of them, .jsonl(.gz/.zst) or .parquet with a "
    "text field, a save_to_disk directory, or hf:NAME[:CONFIG][:SPLIT]"
)
HF_FIX = 'install the [data] extra: pip install -e ".[data]"'


class DataError(ValueError):
    """Bad data or tokenizer input; the message is one line naming the problem and the fix."""


def check_text(where: str, value: object, field: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: {field!r} is not a string: store the text as a string")
    return value


def missing_field(where: str, field: str, keys: Iterable[object]) -> DataError:
    keys = ", ".join(map(str, list(keys)[:8])) or "none"
    return DataError(f"{where}: no {field!r} field (keys: {keys}): use --text-field")
