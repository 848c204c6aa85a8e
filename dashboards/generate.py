"""Write the Grafana dashboards to dashboards/grafana/*.json: `python -m dashboards.generate [--check]`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dashboards.boards import all_dashboards

GRAFANA_DIR = Path(__file__).resolve().parent / "grafana"


def render_all() -> dict[str, str]:
    """File name -> JSON text exactly as committed."""
    return {f"{stem}.json": json.dumps(board, indent=2) + "\n" for stem, board in all_dashboards().items()}


def stale_files(out_dir: Path = GRAFANA_DIR) -> list[str]:
    """Names of dashboard files that are missing or differ from what the generator makes now."""
    return [
        name
        for name, text in render_all().items()
        if not (out_dir / name).is_file() or (out_dir / name).read_text() != text
    ]


def write_all(out_dir: Path = GRAFANA_DIR) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in render_all().items():
        path = out_dir / name
        path.write_text(text)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=GRAFANA_DIR, help="output folder (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed files are out of date")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files(args.out)
        for name in stale:
            print(f"out of date: {args.out / name} (run `python -m dashboards.generate`)", file=sys.stderr)
        return 1 if stale else 0
    for path in write_all(args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
