"""Entry point: `python main.py --help`."""

from lit_matmamba.cli import main

if __name__ == "__main__":
    main()
