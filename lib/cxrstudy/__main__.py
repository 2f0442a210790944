"""``python -m cxrstudy …``: the study's command line (:mod:`cxrstudy.pipeline.cli`)."""
from .pipeline.cli import main

raise SystemExit(main())
