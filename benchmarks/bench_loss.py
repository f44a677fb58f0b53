"""RS@k loss benchmark: naive (B, |P|, B) vs the blocked torch path. See recallk.bench.loss.

    python benchmarks/bench_loss.py --sizes 1000 2000 4000 --simix-size 10000
"""

import sys

from recallk.bench.loss import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
