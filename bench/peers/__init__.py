"""Peer services that the HTTP benchmark runs next to cmdlog under the same load."""
