"""Convert a dataset between ReAlign records and Alpaca, ShareGPT or OpenAI-style messages.

Usage:
    python convert.py --input_data_path alpaca_data.json --output_path outputs/alpaca_realign.json --to realign
    python convert.py --input_data_path outputs/examples/final.json --output_path outputs/final_messages.jsonl \
        --to messages --keep_original --original_path outputs/alpaca_realign.json

Reads --input_data_path (.json list, .jsonl, or .parquet with pyarrow) in the format --from names
(default auto: detected from the first 100 records, and logged) and writes --output_path
(file type by its extension: .json, .jsonl, .parquet) in the format --to names, streaming
and atomically. Into realign, every record gets an id (its own id/idx/uuid, else its 0-based
position) and keeps whatever ReAlign's turns cannot hold in its top-level "source_fields",
so converting the pipeline's final file back gives the source records again, with the
rewritten responses. realign/formats.py and datasets/README.md state every rule.

--keep_original adds "original_response" (the response before rewriting); the final file
holds it only for records tagged "original", so give --original_path (the pipeline's input,
any format, paired by id) when records are tagged "rewrite".

Exit status: 0 converted; 2 bad input (a record that does not fit its format, duplicated
ids, mixed formats, Parquet without pyarrow), nothing written. No environment variables.
"""

import argparse
import logging
import sys

from realign import exits_cleanly, setup_logging
from realign.cli import ArgumentParser
from realign.formats import FORMATS, convert_file, summary_line

logger = logging.getLogger("convert")


def parse_args(argv=None):
    parser = ArgumentParser(
        description="Convert a dataset between ReAlign records and Alpaca, ShareGPT or messages.")
    parser.add_argument("--input_data_path", "--input_path", dest="input_path", required=True,
                        help="dataset to read: .json (list), .jsonl or .parquet (--input_path: the older name)")
    parser.add_argument("--output_path", required=True,
                        help="file to write (atomically); its extension picks the file type: .json, .jsonl, .parquet")
    parser.add_argument("--from", dest="from_format", choices=("auto", *FORMATS), default="auto",
                        help="format of the input (default auto: detected from the first records, and logged)")
    parser.add_argument("--to", dest="to_format", choices=FORMATS, required=True,
                        help="format to write: realign (the pipeline's input) or a trainer's alpaca, sharegpt, messages")
    parser.add_argument("--keep_original", action=argparse.BooleanOptionalAction, default=False,
                        help="out of realign: add 'original_response', the response before rewriting "
                             "(needs --original_path for records tagged rewrite; default: off)")
    parser.add_argument("--original_path", default=None,
                        help="with --keep_original: the pipeline's input (any format), paired with the records by id "
                             "(default: none)")
    parser.add_argument("--verbose", action=argparse.BooleanOptionalAction, default=False, help="log debug messages (default: off)")
    args = parser.parse_args(argv)
    if args.original_path and not args.keep_original:
        parser.error("--original_path is only read with --keep_original")
    return args


@exits_cleanly
def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    stats = convert_file(args.input_path, args.output_path, args.from_format, args.to_format,
                         keep_original=args.keep_original, original_path=args.original_path)
    logger.info("%s", summary_line(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
