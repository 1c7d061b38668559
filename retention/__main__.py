import sys

from retention.cli import main

sys.exit(main())
