"""The client side: the Flower ClientApp (:mod:`fedlayer.client.app`), the local-training recipes of the
algorithms, the per-client store of personal state, and ``lmc``'s client-side measurement."""
