"""`python -m absorbdeploy.sparse.kernels build`: compile the C++ kernels into the cache ahead of time (install.sh calls it).

Prints the shared object's path, the seconds it took and the ISA paths this CPU has. With no C++ compiler it says so
and exits 0 (bitmask_linear runs on the pure-torch reference; the install is still usable); with a compiler, a failed
build exits 1 with the reason on stderr, so an install or CI step that runs this fails rather than hide it.
"""

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m absorbdeploy.sparse.kernels")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("build", help="compile the kernels into the cache (instant when already built)")
    parser.parse_args(argv)
    from absorbdeploy.sparse.kernels import build, ops

    start = time.perf_counter()
    try:
        library = build.load()
    except build.BuildError as e:
        print(f"absorbdeploy kernels not built: {e}; bitmask_linear will use the pure-torch reference", file=sys.stderr)
        return 0 if build.compiler_missing() else 1
    print(f"{library} ({time.perf_counter() - start:.1f} s); ISA paths on this CPU: {', '.join(ops.available_paths())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
