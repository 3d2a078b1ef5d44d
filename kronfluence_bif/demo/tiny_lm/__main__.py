"""`python -m kronfluence_bif.demo.tiny_lm`: train (or load) the tiny GPT-2, then score per token, render, print."""

from kronfluence_bif.demo.tiny_lm.script import main

if __name__ == "__main__":
    main()
