"""Per-token influence (EK-FAC and BIF) on a tiny character-level GPT-2 trained on Python's help texts.

    python examples/tiny_lm/run.py                      # ~2.5 min training on 1 thread (cached), then scoring
    python examples/tiny_lm/run.py --steps 500 --output-dir runs/tiny_lm

The work is done by `kronfluence_bif.demo.tiny_lm` (also `python -m kronfluence_bif.demo.tiny_lm`).
"""

from kronfluence_bif.demo.tiny_lm import main

if __name__ == "__main__":
    main()
