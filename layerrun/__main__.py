import sys

from layerrun.cli import main

sys.exit(main())
