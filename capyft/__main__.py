import sys

from capyft.cli import run

if __name__ == "__main__":
    sys.exit(run())
