import sys

from psmamba.cli import main

sys.exit(main())
