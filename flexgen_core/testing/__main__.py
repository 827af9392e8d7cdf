"""`python -m flexgen_core.testing`: build checkpoints and print their greedy statistics."""

from flexgen_core.testing import _main

_main()
