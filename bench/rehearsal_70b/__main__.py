"""``python -m bench.rehearsal_70b <command>``: see run.py."""
import sys

from bench.rehearsal_70b.run import main

sys.exit(main())
