"""python -m bench: run every benchmark. One whose baseline tool or privileges are
missing fails with its reason (exit status 1) after the others have run: a table is
never printed without its baseline, and a missing benchmark is never silent."""

import importlib
import sys

BENCHES = ["bench.rings", "bench.blk", "bench.net", "bench.workers", "bench.migrate"]


def main() -> int:
    chosen = sys.argv[1:] or BENCHES
    failed: list[str] = []
    for name in chosen:
        module_name = name if name.startswith("bench.") else f"bench.{name}"
        print(f"=== {module_name}", flush=True)
        try:
            importlib.import_module(module_name).main()
        except SystemExit as exc:
            if exc.code not in (None, 0):
                print(exc.code if isinstance(exc.code, str) else
                      f"{module_name}: exit status {exc.code}", file=sys.stderr)
                failed.append(module_name)
        print()
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
