import sys

from lbt.data.generate.cli import main

sys.exit(main())
