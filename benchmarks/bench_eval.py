"""Evaluation benchmark: recallk.evaluation.retrieval_metrics vs pytorch-metric-learning (see recallk.bench.eval).

Run: .venv/bin/python benchmarks/bench_eval.py --sizes 10000 50000 136093
"""

import sys

from recallk.bench.eval import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
