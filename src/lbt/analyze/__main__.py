"""python -m lbt.analyze"""

from lbt.analyze import main

raise SystemExit(main())
