"""The process: the command line, the supervisor of workers and the worker entry point."""
