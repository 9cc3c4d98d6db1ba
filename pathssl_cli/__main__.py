"""`python -m pathssl_cli` (what torchrun launches) is the same as the `pathssl` console script."""

from pathssl_cli.cli import main

if __name__ == "__main__":
    main()
