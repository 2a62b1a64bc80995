"""What runs around the data path: the proxy application, reloads, runtime server
control, drains, health checkers, DNS discovery and the admin listener with its status page.
"""
