"""The run machinery, apart from the science: what turns ``params/<profile>.yaml`` into executed
notebooks and a results folder.

- ``config.py``: profiles, the notebooks' parameter cells, and the checks on their values;
- ``order.py``: the notebooks' dependency order and one run's progress through it;
- ``runner.py`` and ``workers.py``: running the notebooks (in this process or in workers, one
  per GPU), with locks, archives of earlier results and up-to-date checks;
- ``provenance.py``: what produced a result, and its fingerprint;
- ``cli.py`` and ``arguments.py``: the ``cxrstudy`` command line (also ``python -m cxrstudy``).
"""
