"""``python -m trainers fit|validate|test ...`` (LightningCLI) and ``python -m trainers reproduce TABLE``."""


def run() -> None:
    from trainers.cli import main

    main()


if __name__ == "__main__":
    run()
