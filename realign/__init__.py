"""Shared mechanisms of the ReAlign scripts: record I/O, the constant.py check, logging, retries.

Policy lives in the top-level scripts; task data lives in ``constant.py``.
"""

from realign.checks import ConfigError, check_constants
from realign.cli import FatalError, exits_cleanly, non_negative_int, positive_float, positive_int, setup_logging
from realign.lengths import LengthCounter, count_words
from realign.records import (
    InputError,
    OutputLock,
    ProgressWriter,
    atomic_files,
    batch_file_path,
    chunk_bounds,
    count_records,
    find_batch_files,
    iter_json_values,
    iter_progress,
    iter_records,
    iter_records_range,
    load_records,
    fingerprint,
    read_json_or_jsonl,
    read_progress_lines,
    refuse_overwriting_input,
    validate_records,
    write_atomic,
    write_json_atomic,
    write_json_list_atomic,
    write_json_lists_atomic,
)
from realign.retry import is_transient_status, parse_retry_after, retry_delay

__all__ = [
    "ConfigError",
    "FatalError",
    "InputError",
    "LengthCounter",
    "OutputLock",
    "ProgressWriter",
    "atomic_files",
    "batch_file_path",
    "check_constants",
    "chunk_bounds",
    "count_records",
    "count_words",
    "exits_cleanly",
    "find_batch_files",
    "is_transient_status",
    "iter_json_values",
    "iter_progress",
    "iter_records",
    "iter_records_range",
    "load_records",
    "non_negative_int",
    "parse_retry_after",
    "positive_float",
    "positive_int",
    "fingerprint",
    "read_json_or_jsonl",
    "read_progress_lines",
    "refuse_overwriting_input",
    "retry_delay",
    "setup_logging",
    "validate_records",
    "write_atomic",
    "write_json_atomic",
    "write_json_list_atomic",
    "write_json_lists_atomic",
]
