"""What every script does around its work: logging set-up and turning errors into exit codes."""

import argparse
import difflib
import functools
import logging
import os
import re
import sys

from realign.checks import ConfigError
from realign.records import InputError


class FatalError(Exception):
    """An error that will not heal (bad key, unknown model): stop the run, exit status 1."""


class TqdmHandler(logging.StreamHandler):
    """Log through ``tqdm.write`` so log lines do not tear a progress bar."""

    def emit(self, record):
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def setup_logging(verbose=False):
    """Configure the root logger once, inside ``main`` (never at import)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, TqdmHandler):
            root.removeHandler(handler)
    handler = TqdmHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    # The HTTP client libraries log every request at INFO; they add noise, never secrets we want.
    for noisy in ("httpx", "httpx2", "httpcore", "httpcore2", "openai", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def exits_cleanly(main):
    """Wrap a script's ``main``: bad input or config -> one stderr line and exit 2,
    unhealable remote errors -> one line and exit 1, Ctrl-C -> 130. No traceback."""

    @functools.wraps(main)
    def wrapper(argv=None):
        prog = main.__module__
        if prog == "__main__":
            prog = os.path.basename(sys.argv[0])
        try:
            return main(argv)
        except (InputError, ConfigError) as e:
            sys.stderr.write(f"{prog}: error: {e}\n")
            return 2
        except FatalError as e:
            sys.stderr.write(f"{prog}: error: {e}\n")
            return 1
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError,
                PermissionError) as e:  # a path that cannot be what the command needs
            sys.stderr.write(f"{prog}: error: {e.filename or ''}: {e.strerror or e}\n")
            return 2
        except OSError as e:  # the disk, not the input (full, read-only, I/O error)
            where = f"{e.filename}: " if e.filename else ""
            sys.stderr.write(f"{prog}: error: {where}{e.strerror or e}\n")
            return 1
        except KeyboardInterrupt:
            sys.stderr.write(f"{prog}: interrupted; progress so far is saved, rerun to continue\n")
            return 130

    return wrapper


LOG_REFRESH_SECONDS = 30.0  # a progress bar written to a log file is redrawn at most this often


def progress_bar(**kwargs):
    """A tqdm bar on stderr. When stderr is not a terminal (a Slurm .out file, nohup), it is
    redrawn at most every 30 s instead of at every record, so logs stay readable."""
    from tqdm import tqdm

    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", LOG_REFRESH_SECONDS)
        kwargs.setdefault("maxinterval", LOG_REFRESH_SECONDS * 4)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(file=sys.stderr, **kwargs)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, whose usage error is one line: the error, the closest flag when one
    was mistyped, and a pointer to ``--help`` (not the whole usage text)."""

    def error(self, message):
        hint = ""
        match = re.match(r"unrecognized arguments: (\S+)", message)
        if match and match.group(1).startswith("-"):
            flags = [flag for action in self._actions for flag in action.option_strings if flag.startswith("--")]
            given = match.group(1).split("=")[0]
            close = difflib.get_close_matches(given.replace("-", "_"), [f.replace("-", "_") for f in flags], n=1,
                                              cutoff=0.6)
            if close:
                hint = f"; did you mean {flags[[f.replace('-', '_') for f in flags].index(close[0])]}?"
        self.exit(2, f"{self.prog}: error: {message}{hint} (see {self.prog} --help)\n")


# argparse types: a bad value is a usage error naming the flag, not a crash later.


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def positive_float(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def non_negative_float(text):
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value
