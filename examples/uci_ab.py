"""EK-FAC vs BIF on the UCI concrete MLP: the one-flag swap in a user script.

    python examples/uci_ab.py

The same as `python -m kronfluence_bif.demo`; kept here as the script a kronfluence user would write.
"""

from kronfluence_bif.demo.__main__ import main

if __name__ == "__main__":
    main()
