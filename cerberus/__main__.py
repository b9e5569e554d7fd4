"""``python -m cerberus`` (also what ``torchrun -m cerberus`` runs)."""

from cerberus.entry import main

if __name__ == "__main__":
    main()
