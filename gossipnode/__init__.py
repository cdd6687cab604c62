"""gossipnode: a decentralized gossip-learning peer daemon."""

__version__ = "0.1.0"
