"""``python -m trainers fit|validate|test ...`` (LightningCLI), ``python -m trainers reproduce TABLE``
and ``python -m trainers plot RUN_DIR [--out FILE]`` (training curves from a run's CSV log)."""

import sys


def plot(argv: list[str]) -> int:
    import argparse

    from zoo.plot import plot_curves

    parser = argparse.ArgumentParser(prog="python -m trainers plot", description="training curves of a run")
    parser.add_argument("run_dir", help="a run's log directory (holding metrics.csv, searched recursively)")
    parser.add_argument("--out", default=None, help="PNG file (default: curves.png beside metrics.csv)")
    args = parser.parse_args(argv)
    try:
        print(f"wrote {plot_curves(args.run_dir, args.out)}")
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def run() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "reproduce":
        from trainers.reproduce import main as reproduce

        sys.exit(reproduce(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "plot":
        sys.exit(plot(sys.argv[2:]))
    from trainers.cli import main

    main()


if __name__ == "__main__":
    run()
