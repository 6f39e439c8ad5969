"""EMSEdit reproduction suite: editors, data, metrics and the experiment command line."""

__version__ = "0.1.0"
