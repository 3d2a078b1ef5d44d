"""EK-FAC vs identity vs BIF on kronfluence's UCI concrete MLP, judged by LDS against 100 retrains.

    python examples/uci_concrete/run.py          # a few minutes on one CPU thread; ./influence_results/uci_concrete
    python examples/uci_concrete/run.py --bif-args '{"sampler": "rmsprop_sgld", "step_size": 1e-4, "nbeta": 300}' \
        --output-dir runs/uci_tuned

The work is done by `kronfluence_bif.demo.ab` (also `python -m kronfluence_bif.demo.ab --task uci_concrete`).
"""

from kronfluence_bif.demo.ab import main

if __name__ == "__main__":
    main(task="uci_concrete")
