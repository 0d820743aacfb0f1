"""Fault-injection tests (issue 7): a cutting/stalling proxy, restarts, crashes, fuzzing."""
