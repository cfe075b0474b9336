"""``python -m trainers fit|validate|test ...`` (LightningCLI) and ``python -m trainers reproduce TABLE``."""

import sys


def run() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "reproduce":
        from trainers.reproduce import main as reproduce

        sys.exit(reproduce(sys.argv[2:]))
    from trainers.cli import main

    main()


if __name__ == "__main__":
    run()
