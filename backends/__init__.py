"""Sample backends that lbproxy load-balances in its demo and tests (see ``backends.chat``)."""
