"""Shared pytest fixtures: free ports, process reaping, temporary dirs."""
