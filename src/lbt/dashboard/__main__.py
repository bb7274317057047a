"""python -m lbt.dashboard"""

from lbt.dashboard import main

raise SystemExit(main())
