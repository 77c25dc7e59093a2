"""``python -m langchain_budgetguard.config --schema``: print the config file's JSON Schema.

    python -m langchain_budgetguard.config --schema > config/budgetguard.schema.json
"""

from __future__ import annotations

import argparse
import sys

from .schema import json_schema_text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m langchain_budgetguard.config",
                                     description="Tools for budgetguard config files.")
    parser.add_argument("--schema", action="store_true", help="print the JSON Schema of a config file")
    args = parser.parse_args(argv)
    if not args.schema:
        parser.print_help(sys.stderr)
        return 2
    sys.stdout.write(json_schema_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
