import sys

from wgmesh.cli.main import main

sys.exit(main())
