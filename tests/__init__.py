"""
proxygate's test suite. A package so that its helpers import as C{tests.support} the same
way from pytest (run from the repository root or by tests/run.sh), from xdist workers and
from any subprocess a test starts with the repository on its path.
"""
