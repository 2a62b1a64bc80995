"""The pure core: health, schedulers, rules, stickiness, client limits, token buckets,
DNS decisions, metrics and the config snapshot with the state that outlives it.

Plain Python without sockets or event loop, unit-tested in memory; imports only config and
wire.
"""
