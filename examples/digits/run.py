"""EK-FAC vs identity vs BIF on the scikit-learn digits MLP classifier, judged by LDS against 100 retrains.

    python examples/digits/run.py                # about a minute on one CPU thread; ./influence_results/digits
    python examples/digits/run.py --bif-args '{"sampler": "rmsprop_sgld", "step_size": 1e-4}' \
        --output-dir runs/digits_tuned

The work is done by `kronfluence_bif.demo.ab` (also `python -m kronfluence_bif.demo.ab --task digits`).
"""

from kronfluence_bif.demo.ab import main

if __name__ == "__main__":
    main(task="digits")
