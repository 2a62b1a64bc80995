"""Fixtures shared by integration test modules: the multi-worker harness (``start_lbproxy``,
defined with its helpers in test_workers.py) for the modules that run ``--workers``."""

from tests.integration.test_workers import start_lbproxy

__all__ = ["start_lbproxy"]
