"""How this process's OpenMP threads wait, set before torch loads OpenMP (which reads it once): imported first by
every entry point (the trainers, the tools, the tests' conftest).

torch's CPU work runs on OpenMP threads, and GNU OpenMP (torch's wheels) lets an idle thread spin some 300,000 times
before it sleeps. Alone on a machine that saves a wake-up; beside another process it burns the cores the other one
needs (a preflight beside a trainer, an evaluation beside a job, two jobs on a CPU node): two demo pretrainings on
2 cores ran at 0.11 of their speed alone, each. With a spin count of 1,000 they run at 0.56-0.62 each, and one alone
as fast as before (tools/benchmark.py share; README, "Sharing a machine"). Intel OpenMP (torch built with it) waits
KMP_BLOCKTIME milliseconds (200 by default) instead: 1. A value already in the environment is left alone.
"""

import os

os.environ.setdefault("GOMP_SPINCOUNT", "1000")
os.environ.setdefault("KMP_BLOCKTIME", "1")
