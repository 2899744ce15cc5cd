import sys

from dvs.cli import main

sys.exit(main())
