"""Federated pre-training of the tile autoencoder across hospitals on Flower (issue 19).

Each site trains the existing ``Trainer`` on its own cohort and cache for a few local steps per round;
only weights, counts and scalar metrics travel; the server averages them (FedAvg weighted by tiles seen,
or FedProx) and writes an ordinary model folder. One concept per module: ``config`` (FederatedConfig and
the run configuration Flower carries), ``site`` (one site's round), ``audit`` (what a site sends, recorded),
``server`` (the rounds, checkpoints, resume, the model folder), ``apps`` (the Flower ServerApp and
ClientApp), ``launch`` (SuperLink, SuperNodes and the run as real processes: server, site, local).
Flower-free parts: ``averaging`` (the weighted FedAvg average), ``pca_rounds`` (the PCA start fitted from
the sites' sums) and ``admission`` (per-site input statistics; a mismatching site named and refused).
Flower (``flwr``, the ``federated`` extra) is imported inside functions and by ``apps`` only.
"""
