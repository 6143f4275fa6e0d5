"""`python -m memprune ...` runs the command line (as the `memprune` script does)."""
from .cli import main

if __name__ == "__main__":
    main()
