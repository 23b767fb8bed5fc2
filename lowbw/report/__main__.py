"""python -m lowbw.report <sweep folder>  (the same as lowbw-report)."""

import sys

from lowbw.report import main

sys.exit(main())
