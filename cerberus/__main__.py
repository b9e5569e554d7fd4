"""``python -m cerberus`` (also what ``torchrun -m cerberus`` runs)."""

from cerberus.cli import main

if __name__ == "__main__":
    main()
