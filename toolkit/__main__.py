"""`python -m toolkit` runs the same CLI as `tk` (so `torchrun -m toolkit ...` works)."""

from toolkit.cli import main

if __name__ == "__main__":
    main()
