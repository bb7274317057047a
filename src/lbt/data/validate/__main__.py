import sys

from lbt.data.validate.cli import main

sys.exit(main())
