"""Offline training for Loopstack: builds every artifact the server loads."""
