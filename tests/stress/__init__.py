"""The stress suite: real servers under bounded load, real faults, and the figures.

Every scenario prints one line starting with ``STRESS`` (run pytest with ``-s`` to see
them), ``key=value`` pairs that a script can turn into a table. ``-m "not stress"``
deselects the whole suite.
"""
