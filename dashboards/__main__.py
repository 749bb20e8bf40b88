"""``python -m dashboards [--check]``: write (or check) ``dashboards/json/*.json`` and ``docs/dashboards.md``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dashboards.render import docs_page, render_all

REPO = Path(__file__).resolve().parent.parent
JSON_DIR = REPO / "dashboards" / "json"
DOCS_PAGE = REPO / "docs" / "dashboards.md"


def main(argv: list[str] | None = None) -> int:
    """Write the generated files, or with ``--check`` report those that differ from the code."""
    parser = argparse.ArgumentParser(prog="python -m dashboards", description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if a committed file differs from the code")
    args = parser.parse_args(argv)
    rendered = render_all()
    wanted = {JSON_DIR / name: text for name, text in rendered.items()}
    wanted[DOCS_PAGE] = docs_page(rendered)
    stale_json = sorted(path for path in JSON_DIR.glob("*.json") if path not in wanted)
    if args.check:
        differ = [path for path, text in wanted.items() if not path.exists() or path.read_text() != text]
        for path in differ + stale_json:
            print(f"{path.relative_to(REPO)} is not what the code generates: run `make dashboards`", file=sys.stderr)
        return 1 if differ or stale_json else 0
    for path in stale_json:
        path.unlink()
    for path, text in wanted.items():
        path.write_text(text)
        print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
