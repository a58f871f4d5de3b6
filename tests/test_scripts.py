"""Every top-level script: `python SCRIPT --help` exits 0 at once, prints its usage and
flags, and loads none of the heavy libraries (they are imported inside the functions
that need them, STYLE.md)."""

import importlib
import os
import subprocess
import sys

import pytest

from realign import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HEAVY = {"openai", "transformers", "torch", "vllm", "matplotlib", "pyarrow"}

# script, flags its --help must show, libraries it must not load besides HEAVY
SCRIPTS = [
    ("classify.py", ["--backend", "--tensor_parallel_size", "--constrained", "--output_path"], set()),
    # the HTTP stack loads only once there is something to search.
    ("retrieval.py", ["--input_data_path", "--output_path", "--batch_size", "--gl", "--hl", "--search_url"],
     {"httpx2", "httpx", "requests"}),
    ("reformat.py", ["--dataset_batch_id", "--dataset_batch_num", "--is_retrieval", "--batch_api", "--max_cost"],
     set()),
    ("parallel_data_merge.py", ["--allow_partial", "--final_output_path", "--output_directory"], set()),
    ("rewrite_data_selection.py", ["--rules", "--keep_reasons", "--length_threshold", "--tokenizer_path"], set()),
    ("run_pipeline.py", ["--num_processes", "--demo", "--classifier_backend", "--dry_run"], set()),
    ("evaluate.py", ["--judge_sample", "--plot_path", "--report_path"], set()),
    ("convert.py", ["{auto,realign,alpaca,sharegpt,messages}", "--keep_original", "--to"], set()),
]


def imported_modules(importtime_log):
    """Top-level names of the modules `python -X importtime` reports loading."""
    names = set()
    for line in importtime_log.splitlines():
        fields = line.removeprefix("import time:").split("|")
        if line.startswith("import time:") and len(fields) == 3 and fields[0].strip().isdigit():
            names.add(fields[2].strip().split(".")[0])
    return names


def test_imported_modules_reads_the_importtime_log():
    log = ("import time: self [us] | cumulative | imported package\n"
           "import time:       120 |        120 |   json.decoder\n"
           "import time:        80 |        200 | json\n"
           "usage: x.py [-h]\n")
    assert imported_modules(log) == {"json"}


@pytest.mark.parametrize("script, flags, also_not_loaded", SCRIPTS, ids=[s[0] for s in SCRIPTS])
def test_help_exits_0_shows_the_flags_and_loads_no_heavy_library(script, flags, also_not_loaded):
    result = subprocess.run([sys.executable, "-X", "importtime", script, "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith(f"usage: {script} [-h]")
    for flag in flags:
        assert flag in result.stdout, flag
    loaded = imported_modules(result.stderr)
    assert "argparse" in loaded  # the log was read: the script's own imports are in it
    assert loaded & (HEAVY | also_not_loaded) == set()


def test_every_top_level_script_is_probed():
    scripts = {name for name in os.listdir(ROOT) if name.endswith(".py") and name != "constant.py"}
    assert scripts == {script for script, _, _ in SCRIPTS}


class Built(Exception):
    """Carries the parser a script built out of its parse_args."""


@pytest.mark.parametrize("script", [s[0] for s in SCRIPTS])
def test_every_flag_says_its_default_in_help(script, monkeypatch):
    def capture(parser, argv=None, namespace=None):
        raise Built(parser)

    monkeypatch.setattr(cli.ArgumentParser, "parse_args", capture)
    with pytest.raises(Built) as built:
        importlib.import_module(script[:-3]).parse_args([])
    parser = built.value.args[0]
    silent = [action.option_strings[0] for action in parser._actions
              if action.option_strings and action.help not in (None, "==SUPPRESS==")
              and action.option_strings[0] != "-h" and "default" not in action.help and not action.required]
    assert silent == []


def test_a_mistyped_flag_gets_one_line_with_the_closest_flag():
    result = subprocess.run([sys.executable, "reformat.py", "--input_data_path", "x", "--output_directory", "y",
                             "--top-k", "3"], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert result.stderr == ("reformat.py: error: unrecognized arguments: --top-k 3; did you mean --top_k? "
                             "(see reformat.py --help)\n")
