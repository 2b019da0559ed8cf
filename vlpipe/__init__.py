"""vlpipe: pay the frozen-encoder cost once, train many vision-and-language heads from the cache.

Stage one (`vlpipe.extract`) writes features into the sharded HDF5 cache defined in
`vlpipe.cache`; stage two (`vlpipe.fusion`) trains fusion models and task heads from it.
"""

__version__ = "0.1.0"
