import sys

from exaserve.cli import main

sys.exit(main())
