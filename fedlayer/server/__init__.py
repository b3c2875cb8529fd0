"""The server side: the Flower ServerApp adapter (:mod:`fedlayer.server.app`), its round observers, the
analysis hook (a Ray actor), checkpoints and the node -> partition mapping. The aggregation itself is the
top-level :mod:`strategies` package."""
