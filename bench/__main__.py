"""python -m bench: run every benchmark whose prerequisites are present."""

import importlib
import sys

BENCHES = ["bench.rings", "bench.blk", "bench.net", "bench.workers"]


def main() -> int:
    chosen = sys.argv[1:] or BENCHES
    for name in chosen:
        module_name = name if name.startswith("bench.") else f"bench.{name}"
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            print(f"{module_name}: not available ({exc})")
            continue
        print(f"=== {module_name}")
        module.main()
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
