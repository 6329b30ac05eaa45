import sys

from fasteto.cli import main

sys.exit(main())
