"""The `lorafleet` command. Each package registers its own subcommands; this file only wires them."""

from __future__ import annotations

import argparse
import importlib
import sys

from lorafleet.core.errors import UserError

# (subcommand, module with `register(subparsers)`, help). Modules are imported lazily so that
# `lorafleet models list` does not pay for importing torch, vLLM or FastAPI.
COMMANDS = [
    ("models", "lorafleet.cli.models", "import and list the pretrained base models"),
    ("train", "lorafleet.cli.train", "make data, fine-tune LoRA adapters, validate and evaluate them"),
    ("serve", "lorafleet.cli.serve", "run vLLM engines and the multi-tenant gateway"),
    ("worker", "lorafleet.worker", "run the tenants' fine-tuning jobs (the OpenAI fine-tuning API)"),
    ("bench", "lorafleet.cli.bench", "load-test, price and score targets"),
    ("demo", "lorafleet.demo.run", "the end-to-end proof: train three tenants, serve, score, price, report"),
    ("prove", "lorafleet.demo.prove", "the same proof for a tenant's own task file: lorafleet prove TENANT.yaml"),
]


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorafleet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = argv[0] if argv else None
    for name, module, help_ in COMMANDS:
        p = sub.add_parser(name, help=help_)
        # Only import the module of the chosen command; others just show up in --help.
        if name == wanted:
            try:
                mod = importlib.import_module(module)
            except ModuleNotFoundError as e:
                if e.name != module:
                    raise
                continue
            mod.register(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    if not hasattr(args, "func"):
        print(f"lorafleet {args.command}: not available in this build", file=sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
