"""Federated training across hospitals: what travels between sites and the server, and how it is combined."""
