"""Tests of the sample chat backend (backends/chat)."""
